"""vq-wav2vec's second stage: a BERT on the tokens of a vq-wav2vec model (FAMILY.md section 9;
Baevski et al. 2019, section 3.3; fairseq's ``masked_lm`` task with ``roberta_base``)::

    token ids (B, T) -> BERT corruption at the masked frames -> embedding (B, T, D)
        -> Transformer -> h (B, T, D)
    h -> dense + GELU + LayerNorm -> . embedding^T + bias -> logits (B, T, K)   (RoBERTa's LM head,
                                                                             tied to the input embedding)
    loss: cross-entropy of the masked frames' original ids, summed; its count is the masked frames

The tokens are the label set ``jobs.label`` makes with ``label.features=tokens``: one id
per 10 ms frame from a vocabulary of K tokens (``pipeline.label.tokens`` says how the
G codeword ids of a frame become one). They are both the input and the target, so the
model has no audio front end: the label join of the data path hands them over at the
model's frame rate (one frame per token), and the step reads them from there.

Masking: spans of ``mask.length`` frames (the paper: starts at p = 0.05 of the tokens,
10 tokens each, i.e. ``mask.prob`` 0.5 in fairseq's ``compute_mask_indices`` terms, drawn
before the forward as for the other objectives). As in BERT (fairseq's
``MaskTokensDataset``), a masked frame's input becomes ``[MASK]`` (id K, an embedding of
its own), except a ``random_token_prob`` share that gets a uniformly random token and a
``leave_unmasked_prob`` share that keeps its token; all of them are predicted.

The Transformer adds the positions: fixed sinusoids in the presets
(``transformer.absolute_positions``), where RoBERTa learns them. So the embedding is the
Transformer's (Vaswani et al.), not RoBERTa's: initialised at std D^-0.5 and scaled by
sqrt(D), level with the sinusoids (``model.vq_bert.scale_embedding``; RoBERTa's std 0.02
would leave the tokens a few percent of the input).

Downstream, the BERT reads audio through the tokeniser of its label set
(:class:`VqTokeniser`: the vq-wav2vec model's front end and quantizer, and the label set's
vocabulary): the probe through :class:`TokenisedBert`, fine-tuning through
:class:`VqBertForCTC`, which carries its tokeniser's weights and vocabulary in its own
state, so a fine-tuned model needs nothing else to transcribe.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.masked_prediction import MaskedPredictionOutput
from models.masking import compute_channel_mask, compute_span_mask, frame_padding_mask
from models.quantizer import perplexity
from models.transformer import TransformerEncoder
from models.wav2vec2 import CTCOutput, check_shape


def masked_token_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cross-entropy summed over the masked frames, masked frames, masked frames predicted right).

    ``logits`` (B, T, K), ``targets`` (B, T) long ids (any value where not masked), ``mask``
    (B, T) bool. Every frame is scored and the mask keeps the masked ones (no boolean
    indexing: its size would need a host sync).
    """
    batch, time, vocab = logits.shape
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    ce = F.cross_entropy(logits.float().reshape(-1, vocab), safe.reshape(-1), reduction="none").view(batch, time)
    weights = mask.to(ce.dtype)
    with torch.no_grad():
        correct = ((logits.argmax(dim=-1) == safe).to(ce.dtype) * weights).sum()
    return (ce * weights).sum(), mask.long().sum(), correct


class TokenEncoder(nn.Module):
    """(B, T) token ids -> (B, T, D) hidden states: an embedding of the K tokens and
    ``[MASK]`` (id K), input dropout, a Transformer. What the probe and fine-tuning would
    read of a vq_bert model (its ``transformer`` is the encoders' ``transformer``)."""

    def __init__(self, vocab: int, transformer: TransformerEncoder, *, dropout_input: float = 0.0,
                 scale_embedding: bool = True) -> None:
        super().__init__()
        self.vocab = vocab
        self.dim = transformer.out_dim
        self.embedding = nn.Embedding(vocab + 1, self.dim)
        self.scale = self.dim**0.5 if scale_embedding else 1.0
        nn.init.normal_(self.embedding.weight, std=self.dim**-0.5 if scale_embedding else 0.02)
        self.dropout = nn.Dropout(dropout_input)
        self.transformer = transformer

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, D) the Transformer's input before dropout."""
        return self.embedding(tokens) * self.scale

    @property
    def mask_id(self) -> int:
        return self.vocab

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None, *,
                layerdrop_generator: torch.Generator | None = None) -> Tensor:
        x = self.dropout(self.embed(tokens))  # (B, T, D)
        return self.transformer(x, padding_mask, layerdrop_generator=layerdrop_generator)


class LmHead(nn.Module):
    """RoBERTa's LM head: dense + GELU + LayerNorm, then the input embedding's transpose + a bias
    (``[MASK]`` is never a target: its row is left out); with ``tied`` False, a (K, D) matrix
    of its own instead of the embedding."""

    def __init__(self, embedding: nn.Embedding, vocab: int, *, tied: bool = True) -> None:
        super().__init__()
        dim = embedding.embedding_dim
        self.embedding = embedding if tied else None
        self.output = None if tied else nn.Parameter(torch.empty(vocab, dim).normal_(std=0.02))
        self.vocab = vocab
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: Tensor) -> Tensor:
        x = self.norm(F.gelu(self.dense(hidden)))
        weight = self.output if self.embedding is None else self.embedding.weight[: self.vocab]
        return F.linear(x, weight) + self.bias  # (B, T, K)


class VqBertModel(nn.Module):
    """vq-wav2vec's BERT (module doc). Shaped like :class:`models.masked_prediction.
    MaskedPredictionModel` for its step: one codebook of ``vocab`` classes, targets given."""

    codebooks = 1
    given_targets = True
    feature_penalty_weight = 0.0

    def __init__(self, encoder: TokenEncoder, *, mask_prob: float, mask_length: int, min_masks: int,
                 random_token_prob: float = 0.1, leave_unmasked_prob: float = 0.1, tie_embedding: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.codebook_size = encoder.vocab
        self.head = LmHead(encoder.embedding, encoder.vocab, tied=tie_embedding)
        self.mask_prob = mask_prob
        self.mask_length = mask_length
        self.min_masks = min_masks
        self.random_token_prob = random_token_prob
        self.leave_unmasked_prob = leave_unmasked_prob

    def sample_masks(self, batch: int, num_frames: int, lengths: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
        """(B, T) bool spans of masked tokens, drawn on ``lengths.device``."""
        return compute_span_mask(
            (batch, num_frames), mask_prob=self.mask_prob, mask_length=self.mask_length,
            min_masks=self.min_masks, lengths=lengths, generator=generator, device=lengths.device,
        )

    def corrupt(self, tokens: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The model's input: ``tokens`` (B, T) with the masked ones replaced BERT's way (module doc)."""
        u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        rand = torch.randint(0, self.codebook_size, tokens.shape, generator=generator, device=tokens.device)
        keep = u < self.leave_unmasked_prob
        random = (u >= self.leave_unmasked_prob) & (u < self.leave_unmasked_prob + self.random_token_prob)
        replaced = torch.where(random, rand, torch.full_like(tokens, self.encoder.mask_id))
        return torch.where(mask & ~keep, replaced, tokens)

    def forward(
        self,
        tokens: Tensor,
        padding_mask: Tensor | None = None,
        *,
        mask_time_indices: Tensor | None = None,
        target_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> MaskedPredictionOutput:
        """One pass over ``tokens`` (B, T) long ids; ``padding_mask`` (B, T) True = padded frame.
        Masks from ``generator`` unless given; the targets are the tokens (``target_ids`` is
        accepted for the masked-prediction step's call and must equal them when given)."""
        tokens = tokens.long()
        batch, time = tokens.shape
        if padding_mask is None:
            lengths = torch.full((batch,), time, dtype=torch.long, device=tokens.device)
        else:
            check_shape("padding_mask", padding_mask, (batch, time))
            lengths = (~padding_mask.bool()).long().sum(dim=1)
        valid = ~frame_padding_mask(time, lengths)  # (B, T)
        if mask_time_indices is None:
            mask = self.sample_masks(batch, time, lengths, generator)
        else:
            check_shape("mask_time_indices", mask_time_indices, (batch, time))
            mask = mask_time_indices.to(device=tokens.device, dtype=torch.bool)
        mask = mask & valid
        if target_ids is not None:
            check_shape("target_ids", target_ids, (batch, time, 1))
        tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
        frame_pad = None if padding_mask is None else ~valid
        hidden = self.encoder(self.corrupt(tokens, mask, generator), frame_pad,
                              layerdrop_generator=layerdrop_generator)  # (B, T, D)
        logits = self.head(hidden).float()  # (B, T, K)
        ce_sum, num_masked, num_correct = masked_token_loss(logits, tokens, mask)
        with torch.no_grad():
            w = mask.to(logits.dtype).unsqueeze(-1)  # (B, T, 1)
            count = w.sum().clamp(min=1.0)
            onehot = F.one_hot(tokens, self.codebook_size).to(logits.dtype)
            target_ppl = perplexity((onehot * w).sum(dim=(0, 1)) / count).view(1)
            pred_ppl = perplexity((logits.softmax(dim=-1) * w).sum(dim=(0, 1)) / count).view(1)
        return MaskedPredictionOutput(
            loss_sum=ce_sum, num_masked=num_masked, num_correct=num_correct, target_perplexity=target_ppl,
            prediction_perplexity=pred_ppl, target_ids=tokens.unsqueeze(-1), logits=logits.unsqueeze(2),
            last_hidden_state=hidden, mask_time_indices=mask, padding_mask=frame_pad, ce_sum=ce_sum,
            feature_penalty=ce_sum.new_zeros(()),
        )


class TokenisedBert(nn.Module):
    """Audio -> vq-wav2vec tokens -> vq_bert's BERT: what the probe reads of a vq_bert model.

    The BERT never saw audio: its input was the label set's tokens, so its features of audio
    are those of the same tokeniser (the frozen vq-wav2vec model and the vocabulary that
    made the label set). ``tokenise`` maps one utterance's samples (S,) to its (T,) token
    ids; it is given whole utterances, one at a time, as the tokenising job gives them
    (wav2vec 1.0's front end normalises each utterance over all its frames, so a padded
    batch would tokenise differently). Not trained: the tokeniser is a frozen function and
    the BERT is what downstream heads read.
    """

    def __init__(self, bert: TokenEncoder, tokenise: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.bert = bert
        self.tokenise = tokenise

    @torch.no_grad()
    def tokens(self, source: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(ids (B, T) long, 0 at padded frames; frames (B,)) of ``source`` (B, S), where
        ``padding_mask`` (B, S) is True at padded samples."""
        if source.dim() != 2:
            raise ValueError(f"TokenisedBert: expected source (B, S), got shape {tuple(source.shape)}")
        samples = [source.shape[1]] * source.shape[0]
        if padding_mask is not None:
            samples = (~padding_mask).long().sum(dim=1).tolist()
        rows = [np.asarray(self.tokenise(source[b, :n].float().cpu().numpy()), dtype=np.int64)
                for b, n in enumerate(samples)]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=source.device)
        ids = torch.zeros((len(rows), max((len(r) for r in rows), default=0)), dtype=torch.long, device=source.device)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.from_numpy(r).to(source.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.bert.vocab):
            raise ValueError(f"TokenisedBert: token ids outside the BERT's vocabulary of {self.bert.vocab}")
        return ids, lengths

    def forward(self, source: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) BERT hidden states of ``source`` (B, S)."""
        ids, lengths = self.tokens(source, padding_mask)
        return self.bert(ids, frame_padding_mask(ids.shape[1], lengths))


def pair_index(codes: Tensor, entries: int) -> Tensor:
    """(..., G) codeword ids -> (...) int64 index of each frame's tuple, mixed radix ``entries``
    (``g0 * V + g1`` for two groups): the token before the vocabulary."""
    codes = codes.long()
    out = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
    for g in range(codes.shape[-1]):
        out = out * entries + codes[..., g]
    return out


def pair_ids(pairs: Tensor, vocabulary: Tensor, unknown: int) -> Tensor:
    """Token ids of pair indices ``pairs`` (any shape, int64) in ``vocabulary`` (K',) int64, the
    pair of each id in id order (entries < 0 are unused ids): id i where ``vocabulary[i]`` is the
    pair, ``unknown`` for a pair the vocabulary lacks."""
    vocabulary = vocabulary.to(device=pairs.device, dtype=torch.long)
    if vocabulary.numel() == 0:
        return torch.full_like(pairs, unknown)
    order = torch.argsort(vocabulary, stable=True)
    ordered = vocabulary[order]
    where = torch.searchsorted(ordered, pairs).clamp(max=ordered.numel() - 1)
    found = ordered[where] == pairs
    return torch.where(found, order[where], torch.full_like(pairs, unknown))


class VqTokeniser(nn.Module):
    """Audio -> vq-wav2vec tokens: a vq-wav2vec model's front end and quantizer (its
    ``encoder.feature_encoder`` and quantizer) and the token vocabulary of a label set
    (``pairs``: the pair index of each id, -1 for ids the set does not use; id ``vocab - 1``
    stands for every other pair). Frozen: what made the BERT's input, not something to train.

    Each utterance is tokenised whole, alone, as the tokenising job does (wav2vec 1.0's front
    end normalises over the utterance's frames). The input is scaled as the tokenising job
    scaled it: the caller normalises when the vq-wav2vec model was trained on normalised audio.
    """

    def __init__(self, frontend: nn.Module, quantizer: nn.Module, vocab: int) -> None:
        super().__init__()
        self.frontend = frontend
        self.quantizer = quantizer
        self.vocab = vocab
        self.entries = int(quantizer.entries)
        self.register_buffer("pairs", torch.full((vocab - 1,), -1, dtype=torch.long))
        self.requires_grad_(False)

    def set_vocabulary(self, pairs: Tensor) -> None:
        """Ids 0 .. len(pairs) - 1 are ``pairs`` (the label set's ``vocabulary.npz``)."""
        pairs = torch.as_tensor(pairs, dtype=torch.long).flatten()
        if pairs.numel() > self.vocab - 1:
            raise ValueError(f"VqTokeniser: {pairs.numel()} pairs for {self.vocab - 1} ids (model.vq_bert.vocab - 1)")
        if bool((pairs < 0).any()) or pairs.unique().numel() != pairs.numel():
            raise ValueError("VqTokeniser: the vocabulary's pairs must be distinct pair indices >= 0")
        with torch.no_grad():
            self.pairs.fill_(-1)
            self.pairs[: pairs.numel()] = pairs.to(self.pairs.device)

    def frames(self, num_samples: Tensor) -> Tensor:
        """Tokens of ``num_samples`` samples (one per front-end frame)."""
        return self.frontend.output_lengths(num_samples)

    @torch.no_grad()
    def forward(self, source: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(ids (B, T) long, 0 at padded frames; tokens (B,)) of ``source`` (B, S),
        ``padding_mask`` (B, S) True at padded samples."""
        if source.dim() != 2:
            raise ValueError(f"VqTokeniser: expected source (B, S), got shape {tuple(source.shape)}")
        batch, width = source.shape
        samples = torch.full((batch,), width, dtype=torch.long, device=source.device)
        if padding_mask is not None:
            check_shape("padding_mask", padding_mask, (batch, width))
            samples = (~padding_mask.bool()).long().sum(dim=1)
        lengths = self.frames(samples).clamp(min=0)
        ids = torch.zeros((batch, int(lengths.max()) if batch else 0), dtype=torch.long, device=source.device)
        for b in range(batch):
            n, t = int(samples[b]), int(lengths[b])
            if t == 0:
                continue
            features = self.frontend(source[b : b + 1, :n].float())  # (1, T, C)
            codes = self.quantizer.codes(features)  # (1, T, G)
            ids[b, :t] = pair_ids(pair_index(codes[0, :t], self.entries), self.pairs, self.vocab - 1)
        return ids, lengths


class VqBertForCTC(nn.Module):
    """Fine-tuning model of vq_bert: audio -> the frozen tokeniser of its label set -> the
    BERT (:class:`TokenEncoder`) -> dropout -> Linear(D -> vocab), one CTC frame per token.

    Shaped as :class:`models.wav2vec2.Wav2Vec2ForCTC` for the fine-tuning step and the
    scoring (``encoder``, ``head``, the same regularisers and output). Time masking puts
    ``[MASK]`` at the masked tokens (what the BERT learned to fill in); channel masking zeroes
    embedding channels; both run only in training mode.
    """

    def __init__(self, tokeniser: VqTokeniser, encoder: TokenEncoder, vocab_size: int, *, final_dropout: float,
                 mask_prob: float, mask_length: int, min_masks: int, channel_prob: float,
                 channel_length: int) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size: expected >= 1, got {vocab_size}")
        if tokeniser.vocab != encoder.vocab:
            raise ValueError(f"VqBertForCTC: the tokeniser gives {tokeniser.vocab} tokens, the BERT reads {encoder.vocab}")
        self.tokeniser = tokeniser
        self.encoder = encoder
        self.dropout = nn.Dropout(final_dropout)
        self.head = nn.Linear(encoder.dim, vocab_size)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.mask_prob = mask_prob
        self.mask_length = mask_length
        self.min_masks = min_masks
        self.channel_prob = channel_prob
        self.channel_length = channel_length

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    def freeze_feature_encoder(self) -> None:
        """The tokeniser is always frozen (constructor): nothing more to do."""

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> CTCOutput:
        """Logits (B, T, V) for ``source`` (B, S); ``padding_mask`` (B, S) True = padded."""
        ids, lengths = self.tokeniser(source, padding_mask)  # (B, T), (B,)
        batch, time = ids.shape
        frame_pad = None if padding_mask is None else frame_padding_mask(time, lengths)
        if self.training and self.mask_prob > 0:
            mask = compute_span_mask(
                (batch, time), mask_prob=self.mask_prob, mask_length=self.mask_length, min_masks=self.min_masks,
                lengths=lengths, generator=generator, device=ids.device,
            )
            ids = ids.masked_fill(mask, self.encoder.mask_id)
        x = self.encoder.dropout(self.encoder.embed(ids))  # (B, T, D)
        if self.training and self.channel_prob > 0:
            channels = compute_channel_mask(batch, x.shape[-1], mask_prob=self.channel_prob,
                                            mask_length=self.channel_length, generator=generator, device=x.device)
            x = x.masked_fill(channels.unsqueeze(1), 0.0)
        hidden = self.encoder.transformer(x, frame_pad, layerdrop_generator=layerdrop_generator)  # (B, T, D)
        logits = self.head(self.dropout(hidden))  # (B, T, V)
        return CTCOutput(logits=logits, output_lengths=lengths, padding_mask=frame_pad)
