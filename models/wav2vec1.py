"""wav2vec (1.0) and vq-wav2vec's first stage: binary contrastive prediction of future features.

fairseq's ``Wav2VecModel`` and ``wav2vec`` criterion (FAMILY.md section 9), on wavray's
encoder (front end, projection slot, context network)::

    source (B, S) -> front end -> z (B, T, C)     [vq-wav2vec: z <- quantize(z), ids (B, T, G)]
    z -> dropout -> causal context network -> c (B, T, D) -> dropout
    c -> one Linear per step (+ a bias shared by the steps) -> p (B, T, S, C) -> dropout
    step s: p[t, s] . z[t + offset + s]  against  p[t, s] . z[n], n one of K frames of the
        same utterance drawn for target frame t + offset + s (never itself)
    loss: binary cross-entropy with logits, the true pair labelled 1 and the K others 0,
          summed over every pair; its count is the true pairs (fairseq's ``sample_size``)

The predictions use dot products (no normalisation, no temperature); the targets are not
detached, so the front end learns from both sides of every pair, as in fairseq. Every
target frame has its own K distractors, shared by the steps that predict it (fairseq's
``sample_negatives``); they are drawn before the forward, with the masks of the other
objectives (:func:`models.masking.sample_negatives` over the valid frames).

A model that scores every pair alike learns the base rate and sits at
``(K + 1) * H(1 / (K + 1))`` nats per true pair (:func:`binary_chance`): 3.35 for K = 10.

vq-wav2vec's ids of every frame are its tokens (:meth:`Wav2VecModel.tokens`), the input
of its second stage.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.losses import diversity_loss
from models.masking import frame_padding_mask, sample_negatives
from models.quantizer import GumbelVectorQuantizer
from models.vq import QuantizedProjection
from models.wav2vec2 import Wav2Vec2Encoder, check_shape


def binary_chance(num_negatives: int) -> float:
    """Loss per true pair of a model that gives every pair the base rate 1 / (K + 1): (K + 1) H(1 / (K + 1))."""
    k = num_negatives
    return math.log(k + 1) + k * math.log((k + 1) / k)


def future_prediction_loss(
    predictions: Tensor, targets: Tensor, negative_indices: Tensor, lengths: Tensor, *, offset: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss sum, true pairs, pairs whose true target scored above all K others) (module doc).

    ``predictions`` (B, T, S, C): step s of frame t predicts frame t + offset + s;
    ``targets`` (B, T, C); ``negative_indices`` (B, T, K) distractor frames of each target
    frame, within its utterance; ``lengths`` (B,) valid frames (no prediction reaches past them).
    """
    batch, time, steps, dim = predictions.shape
    num_neg = negative_indices.shape[-1]
    y = targets.float()
    negatives = y.gather(1, negative_indices.reshape(batch, time * num_neg, 1).expand(-1, -1, dim))
    candidates = torch.cat([y.unsqueeze(2), negatives.view(batch, time, num_neg, dim)], dim=2)  # (B, T, K+1, C)
    loss_sum = predictions.new_zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.long, device=predictions.device)
    correct = torch.zeros((), dtype=torch.long, device=predictions.device)
    for s in range(steps):
        shift = offset + s
        if shift >= time:
            break
        p = predictions[:, : time - shift, s].float()  # (B, T-shift, C): contexts t
        logits = torch.einsum("btc,btkc->btk", p, candidates[:, shift:])  # (B, T-shift, K+1): targets t + shift
        valid = (torch.arange(time - shift, device=p.device) + shift).unsqueeze(0) < lengths.unsqueeze(1)
        bce = F.softplus(-logits[..., 0]) + F.softplus(logits[..., 1:]).sum(dim=-1)  # labels 1, 0 .. 0
        loss_sum = loss_sum + torch.where(valid, bce, torch.zeros_like(bce)).sum()
        count = count + valid.long().sum()
        with torch.no_grad():
            best = (logits[..., :1] > logits[..., 1:]).all(dim=-1)
            correct = correct + (best & valid).long().sum()
    return loss_sum, count, correct


class StepPredictions(nn.Module):
    """(B, T, D) context -> (B, T, S, C): one Linear per step and a bias shared by the steps
    (fairseq's ``ConvTranspose2d(D, C, (1, S))``)."""

    def __init__(self, dim: int, target_dim: int, steps: int):
        super().__init__()
        self.steps = steps
        self.target_dim = target_dim
        self.weight = nn.Linear(dim, steps * target_dim, bias=False)
        self.bias = nn.Parameter(torch.empty(target_dim).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim)))

    def forward(self, context: Tensor) -> Tensor:
        batch, time, _ = context.shape
        return self.weight(context).view(batch, time, self.steps, self.target_dim) + self.bias


class Wav2VecOutput(NamedTuple):
    """What a wav2vec / vq-wav2vec step logs or differentiates; all tensors, no host values."""

    loss_sum: Tensor
    """() float32: ``prediction_sum + num_predictions * quantizer_weight * quantizer_loss``."""
    prediction_sum: Tensor
    """() float32: the binary cross-entropy summed over true and distractor pairs."""
    num_predictions: Tensor
    """() long: true pairs (the loss's count)."""
    num_correct: Tensor
    """() long: true pairs scored above all their distractors."""
    quantizer_loss: Tensor
    """() float32: k-means' codebook + commitment loss, or the Gumbel diversity loss (0 without a quantizer)."""
    code_perplexity: Tensor
    """(G,) perplexity of the ids over valid frames; (0,) without a quantizer."""
    prob_perplexity: Tensor
    """(G,) Gumbel only: of the averaged softmax; (0,) otherwise."""
    temperature: Tensor
    """() the Gumbel temperature (0 otherwise)."""
    codes: Tensor
    """(B, T, G) long ids of every frame; (B, T, 0) without a quantizer."""
    last_hidden_state: Tensor
    """(B, T, D): the context network's output."""
    negative_indices: Tensor
    """(B, T, K) long: the distractor frames of each target frame."""
    padding_mask: Tensor | None
    """(B, T) bool frame padding (True = padded), None without padding."""
    argmax_share: Tensor
    """(G,) share of the valid frames on each group's most frequent codeword (Gumbel: of the
    argmax, no noise); (0,) without a quantizer."""


class Wav2VecModel(nn.Module):
    """wav2vec / vq-wav2vec: encoder (its projection slot quantizes for vq-wav2vec) + step predictions."""

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        *,
        target_dim: int,
        prediction_steps: int,
        num_negatives: int,
        offset: int,
        dropout_context: float,
        dropout_predictions: float,
        quantizer_weight: float = 0.0,
    ):
        super().__init__()
        if offset < 0:
            raise ValueError(f"offset: expected >= 0 frames, got {offset}")
        self.encoder = encoder
        self.predictions = StepPredictions(encoder.dim, target_dim, prediction_steps)
        self.dropout_context = nn.Dropout(dropout_context)
        self.dropout_predictions = nn.Dropout(dropout_predictions)
        self.num_negatives = num_negatives
        self.offset = offset
        self.quantizer_weight = quantizer_weight

    @property
    def quantizer(self) -> nn.Module | None:
        """vq-wav2vec's quantizer (in the encoder's projection slot); None for wav2vec."""
        proj = self.encoder.feature_projection
        return proj.quantizer if isinstance(proj, QuantizedProjection) else None

    @property
    def num_groups(self) -> int:
        q = self.quantizer
        return 0 if q is None else q.groups

    def set_num_updates(self, step: int) -> None:
        """Advance the Gumbel temperature schedule (nothing else has one)."""
        if isinstance(self.quantizer, GumbelVectorQuantizer):
            self.quantizer.set_num_updates(step)

    def sample_negatives(self, batch: int, num_frames: int, lengths: Tensor,
                         generator: torch.Generator | None = None) -> Tensor:
        """(B, T, K) distractor frames per target frame, uniform over the other valid frames of its utterance."""
        valid = ~frame_padding_mask(num_frames, lengths.to(torch.long))  # (B, T)
        return sample_negatives(valid, self.num_negatives, generator=generator)

    def num_predictions(self, lengths: Tensor) -> Tensor:
        """() long: true pairs of utterances of ``lengths`` (B,) frames: the loss's count, known before the forward."""
        steps = torch.arange(self.predictions.steps, device=lengths.device) + self.offset  # (S,)
        return torch.clamp(lengths.long().unsqueeze(1) - steps.unsqueeze(0), min=0).sum()

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        negative_indices: Tensor | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> Wav2VecOutput:
        """One pass over ``source`` (B, S); ``padding_mask`` (B, S) True = padded; distractors
        from ``generator`` unless given (``negative_indices`` (B, T, K), per-utterance frames)."""
        enc = self.encoder
        features, frame_pad, lengths = enc.extract_features(source, padding_mask)  # (B, T, C)
        batch, time, _ = features.shape
        valid = ~frame_padding_mask(time, lengths)  # (B, T)
        zero = features.new_zeros((), dtype=torch.float32)
        q = self.quantizer
        if q is None:
            x, z = enc.feature_projection(features)  # the frames as they are
            quantizer_loss, code_ppl, prob_ppl, temperature = zero, zero.new_zeros(0), zero.new_zeros(0), zero
            argmax_share = zero.new_zeros(0)
            codes = torch.zeros(batch, time, 0, dtype=torch.long, device=features.device)
        else:
            out = q(features, valid, generator=generator)
            z = out.vectors  # (B, T, C): quantized, the targets and the context network's input
            x = enc.feature_projection.dropout(z)
            codes, code_ppl, argmax_share = out.codes, out.code_perplexity, out.argmax_share
            if isinstance(q, GumbelVectorQuantizer):
                prob_ppl, temperature = out.prob_perplexity, out.temperature
                quantizer_loss = diversity_loss(out.prob_perplexity, q.num_codevectors)
            else:
                prob_ppl, temperature, quantizer_loss = zero.new_zeros(0), zero, out.loss
        if negative_indices is None:
            negative_indices = self.sample_negatives(batch, time, lengths, generator)
        else:
            check_shape("negative_indices", negative_indices, (batch, time, negative_indices.shape[-1]))
            negative_indices = negative_indices.to(device=features.device, dtype=torch.long)

        hidden = enc.transformer(x, frame_pad, layerdrop_generator=layerdrop_generator)  # (B, T, D)
        predictions = self.dropout_predictions(self.predictions(self.dropout_context(hidden)))  # (B, T, S, C)
        prediction_sum, count, correct = future_prediction_loss(
            predictions, z, negative_indices, lengths, offset=self.offset
        )
        loss_sum = prediction_sum + count.float() * (self.quantizer_weight * quantizer_loss.float())
        return Wav2VecOutput(
            loss_sum=loss_sum, prediction_sum=prediction_sum, num_predictions=count, num_correct=correct,
            quantizer_loss=quantizer_loss.float(), code_perplexity=code_ppl, prob_perplexity=prob_ppl,
            temperature=temperature.float(), codes=codes, last_hidden_state=hidden,
            negative_indices=negative_indices, padding_mask=frame_pad, argmax_share=argmax_share.float(),
        )

    @torch.no_grad()
    def tokens(self, source: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """vq-wav2vec's tokens of ``source`` (B, S): (ids (B, T, G) long, -1 at padded frames;
        valid frames (B,)). Deterministic: the Gumbel quantizer's argmax, k-means' nearest
        codeword, whatever the module's train/eval mode; what its second stage reads."""
        q = self.quantizer
        if q is None:
            raise ValueError("tokens: this model has no quantizer (model.objective=wav2vec); vq_wav2vec has tokens")
        features, _, lengths = self.encoder.extract_features(source, padding_mask)  # (B, T, C)
        valid = ~frame_padding_mask(features.shape[1], lengths)  # (B, T)
        ids = q.codes(features, valid)  # (B, T, G)
        return ids.masked_fill(~valid.unsqueeze(-1), -1), lengths
