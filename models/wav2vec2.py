"""wav2vec 2.0: the shared encoder, the pretraining model and the CTC model.

Data flow of pretraining (shapes for B utterances of S samples, T frames)::

    source (B, S) -> FeatureEncoder -> z (B, T, C) --LayerNorm--> z' --Linear, dropout--> x (B, T, D)
    x: masked frames replaced by one learned vector -> TransformerEncoder (or ConformerEncoder) -> c (B, T, D)
    z' --dropout--> GumbelVectorQuantizer -> q (B, T, codevector_dim) -> project_q -> (B, T, F)
    c -> final_proj -> (B, T, F);  InfoNCE over masked frames against K distractors

Nothing in a forward pass reads a tensor value on the host, so a training step never
waits on the accelerator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from models.conformer import ConformerEncoder
from models.feature_encoder import FeatureEncoder, FeatureProjection, grad_multiply
from models.frontends import LogMelFrontend
from models.losses import contrastive_loss, diversity_loss, feature_penalty
from models.masking import compute_channel_mask, compute_span_mask, frame_padding_mask, sample_negatives
from models.quantizer import GumbelVectorQuantizer
from models.transformer import TransformerEncoder

if TYPE_CHECKING:
    from models.causal_conv import CausalConvContext, Wav2VecFeatureEncoder
    from models.feature_encoder import IdentityProjection
    from models.gru import GRUContext
    from models.vq import QuantizedProjection


class MaskEmbedding(nn.Module):
    """The learned vector that replaces masked frames (fairseq ``mask_emb``).

    A module of its own so that the vector is used inside its owner's ``forward``, where
    ZeRO-3 gathers parameters.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim).uniform_())

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace the frames of (B, T, D) where ``mask`` (B, T) is True."""
        return torch.where(mask.unsqueeze(-1), self.weight.to(x.dtype), x)


class Wav2Vec2Encoder(nn.Module):
    """Front end + projection + mask embedding + context network (shared by every head).

    The front end (``feature_encoder``, named as in wav2vec 2.0) is the conv feature
    encoder, wav2vec 1.0's (``models.causal_conv``) or log-mel filterbanks
    (``models.frontends``): ``forward(source, num_samples)`` and ``output_lengths``. The
    projection gives the context network its frames (``forward(features) -> (x, z)``,
    ``out_dim``): LayerNorm + Linear, the frames as they are (wav2vec 1.0, APC) or their
    quantization (vq-wav2vec). The context network (``forward(x, padding_mask)``, ``layers``,
    ``out_dim``) is a Transformer, a Conformer, a causal conv stack or GRU layers.
    """

    def __init__(
        self,
        feature_encoder: FeatureEncoder | LogMelFrontend | Wav2VecFeatureEncoder,
        feature_projection: FeatureProjection | IdentityProjection | QuantizedProjection,
        transformer: TransformerEncoder | ConformerEncoder | CausalConvContext | GRUContext,
        *,
        grad_mult: float,
    ):
        super().__init__()
        self.feature_encoder = feature_encoder
        self.feature_projection = feature_projection
        self.transformer = transformer
        self.mask_embedding = MaskEmbedding(feature_projection.out_dim)
        self.grad_mult = grad_mult
        self.feature_encoder_frozen = False

    @property
    def dim(self) -> int:
        """Width of the hidden states (the context network's output)."""
        return self.transformer.out_dim

    def freeze_feature_encoder(self) -> None:
        """No gradient into the convolutions (fine-tuning); they also run without autograd."""
        self.feature_encoder_frozen = True
        for p in self.feature_encoder.parameters():
            p.requires_grad_(False)

    def extract_features(self, source: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """Waveform -> (latents (B, T, C), frame padding mask (B, T) or None, frame lengths (B,)).

        ``padding_mask`` (B, S) is True at padded samples (right padding).
        """
        if source.dim() != 2:
            raise ValueError(f"source: expected (B, S) float samples, got shape {tuple(source.shape)}")
        num_samples = None
        if padding_mask is not None:
            if padding_mask.shape != source.shape:
                raise ValueError(
                    f"padding_mask: expected the shape of source {tuple(source.shape)}, got {tuple(padding_mask.shape)}"
                )
            num_samples = (~padding_mask.bool()).long().sum(dim=1)  # (B,)
        if self.feature_encoder_frozen or self.grad_mult == 0.0:
            with torch.no_grad():
                features = self.feature_encoder(source, num_samples)
        else:
            features = grad_multiply(self.feature_encoder(source, num_samples), self.grad_mult)  # (B, T, C)
        batch, time, _ = features.shape
        if num_samples is None:
            lengths = torch.full((batch,), time, dtype=torch.long, device=features.device)
            return features, None, lengths
        lengths = self.feature_encoder.output_lengths(num_samples).clamp(max=time)
        return features, frame_padding_mask(time, lengths), lengths

    def apply_time_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """Replace masked frames of (B, T, D) by the learned mask embedding."""
        return self.mask_embedding(x, mask)


def check_shape(name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    """A given input tensor has the shape the batch implies; the error names it."""
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")


class PretrainOutput(NamedTuple):
    """Everything a pretraining step logs or differentiates; all tensors, no host values.

    A named tuple, like every output of the models: ZeRO-3 re-gathers a module's
    partitioned parameters for its backward through hooks on the tensors the module
    returns, and finds them inside tensors, tuples, lists and dicts only.

    ``loss_sum`` = ``contrastive_sum + num_masked * (diversity_weight * diversity_loss
    + feature_penalty_weight * feature_penalty)``: divide by the global ``num_masked``.
    """

    loss_sum: Tensor
    """() float32: the objective summed over masked frames."""
    contrastive_sum: Tensor
    """() float32: InfoNCE summed over masked frames (nats)."""
    diversity_loss: Tensor
    """() float32: ``(G*V - sum_g exp(H_g)) / (G*V)`` of this batch."""
    feature_penalty: Tensor
    """() float32: mean square of the encoder features of this batch."""
    num_masked: Tensor
    """() long: masked frames (the loss's count)."""
    num_correct: Tensor
    """() long: masked frames whose target scored highest (contrastive accuracy)."""
    code_perplexity: Tensor
    """(G,): perplexity of the hard codeword choices over masked frames."""
    prob_perplexity: Tensor
    """(G,): perplexity of the averaged codeword softmax over masked frames."""
    temperature: Tensor
    """(): the Gumbel temperature of this step."""
    last_hidden_state: Tensor
    """(B, T, D): the context network's output."""
    projected_context: Tensor
    """(B, T, F): ``final_proj`` of the context (every frame)."""
    projected_quantized: Tensor
    """(B, T, F): ``project_q`` of the quantized targets (every frame)."""
    mask_time_indices: Tensor
    """(B, T) bool: the masked frames."""
    negative_indices: Tensor
    """(B, T, K) long: per-utterance distractor frames."""
    padding_mask: Tensor | None
    """(B, T) bool frame padding (True = padded), None without padding."""
    logits: Tensor
    """(B, T, K + 1) float32: contrastive logits (target first); only masked frames count."""
    target_codes: Tensor
    """(B, T, G) long: the codeword of each group behind ``projected_quantized`` (the Gumbel
    choice in training, the argmax in evaluation); w2v-BERT's masked-LM targets."""


class MaskedInputs(NamedTuple):
    """A batch ready for the context network, and what the contrastive loss needs of it."""

    x: Tensor
    """(B, T, D): the projected features, masked frames replaced by the mask embedding."""
    unmasked: Tensor
    """(B, T, C): the normalised features before masking (after ``dropout_features``): the quantizer's input."""
    mask: Tensor
    """(B, T) bool: the masked frames (never padding)."""
    negative_indices: Tensor
    """(B, T, K) long: per-utterance distractor frames."""
    padding_mask: Tensor | None
    """(B, T) bool frame padding (True = padded), None without padding."""
    feature_penalty: Tensor
    """() float32: mean square of the front end's features."""


class Wav2Vec2ForPretraining(nn.Module):
    """The self-supervised model: encoder, quantizer, two projections and the loss."""

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        quantizer: GumbelVectorQuantizer,
        *,
        final_dim: int,
        dropout_features: float,
        mask_prob: float,
        mask_length: int,
        min_masks: int,
        num_negatives: int,
        logit_temp: float,
        diversity_weight: float,
        feature_penalty_weight: float,
    ):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.dropout_features = nn.Dropout(dropout_features)
        codevector_dim = quantizer.codevectors.shape[-1] * quantizer.groups
        self.project_q = nn.Linear(codevector_dim, final_dim)
        self.final_proj = nn.Linear(encoder.dim, final_dim)
        self.mask_prob = mask_prob
        self.mask_length = mask_length
        self.min_masks = min_masks
        self.num_negatives = num_negatives
        self.logit_temp = logit_temp
        self.diversity_weight = diversity_weight
        self.feature_penalty_weight = feature_penalty_weight

    def set_num_updates(self, step: int) -> None:
        """Advance the Gumbel temperature schedule to update ``step``."""
        self.quantizer.set_num_updates(step)

    def sample_masks(
        self,
        batch: int,
        num_frames: int,
        lengths: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(mask (B, T) bool, negatives (B, T, K) long) drawn on ``lengths.device``."""
        mask = compute_span_mask(
            (batch, num_frames), mask_prob=self.mask_prob, mask_length=self.mask_length,
            min_masks=self.min_masks, lengths=lengths, generator=generator, device=lengths.device,
        )
        return mask, sample_negatives(mask, self.num_negatives, generator=generator)

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        mask_time_indices: Tensor | None = None,
        negative_indices: Tensor | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> PretrainOutput:
        """One pretraining pass over ``source`` (B, S); ``padding_mask`` (B, S) True = padded.

        Masks and distractors are drawn from ``generator`` unless given;
        ``negative_indices`` holds per-utterance frame indices (0..T-1). LayerDrop draws
        come from ``layerdrop_generator`` (CPU).
        """
        inputs = self.masked_inputs(source, padding_mask, mask_time_indices=mask_time_indices,
                                    negative_indices=negative_indices, generator=generator)
        hidden = self.encoder.transformer(inputs.x, inputs.padding_mask, layerdrop_generator=layerdrop_generator)
        return self.contrast(inputs, hidden, generator=generator)

    def masked_inputs(
        self,
        source: Tensor,
        padding_mask: Tensor | None,
        *,
        mask_time_indices: Tensor | None,
        negative_indices: Tensor | None,
        generator: torch.Generator | None,
    ) -> MaskedInputs:
        """The front end, the projection and the masking of a pass (:meth:`forward`'s first half)."""
        features, frame_pad, lengths = self.encoder.extract_features(source, padding_mask)
        batch, time, _ = features.shape
        penalty = feature_penalty(features, frame_pad)
        x, normed = self.encoder.feature_projection(features)  # (B, T, D), (B, T, C)
        unmasked = self.dropout_features(normed)

        if mask_time_indices is None:
            mask, sampled_neg = self.sample_masks(batch, time, lengths, generator)
        else:
            check_shape("mask_time_indices", mask_time_indices, (batch, time))
            mask = mask_time_indices.to(device=x.device, dtype=torch.bool)
            if frame_pad is not None:
                mask = mask & ~frame_pad
            sampled_neg = None
        if negative_indices is None:
            negative_indices = sampled_neg if sampled_neg is not None else sample_negatives(
                mask, self.num_negatives, generator=generator
            )
        else:
            check_shape("negative_indices", negative_indices, (batch, time, negative_indices.shape[-1]))
            negative_indices = negative_indices.to(device=x.device, dtype=torch.long)
        return MaskedInputs(x=self.encoder.apply_time_mask(x, mask), unmasked=unmasked, mask=mask,
                            negative_indices=negative_indices, padding_mask=frame_pad, feature_penalty=penalty)

    def contrast(self, inputs: MaskedInputs, hidden: Tensor, *, generator: torch.Generator | None) -> PretrainOutput:
        """wav2vec 2.0's loss of the context ``hidden`` (B, T, D) against the quantized unmasked
        features (:meth:`forward`'s second half; w2v-BERT passes its contrastive module's output)."""
        mask, penalty = inputs.mask, inputs.feature_penalty
        context = self.final_proj(hidden)  # (B, T, F)

        quantized = self.quantizer(inputs.unmasked, mask, generator=generator)
        targets = self.project_q(quantized.vectors.to(self.project_q.weight.dtype))  # (B, T, F)

        contrastive_sum, num_correct, logits = contrastive_loss(
            context, targets, quantized.codes, mask, inputs.negative_indices, logit_temp=self.logit_temp
        )
        num_masked = mask.long().sum()
        diversity = diversity_loss(quantized.prob_perplexity, self.quantizer.num_codevectors)
        extra = self.diversity_weight * diversity + self.feature_penalty_weight * penalty
        loss_sum = contrastive_sum + num_masked.to(extra.dtype) * extra
        return PretrainOutput(
            loss_sum=loss_sum,
            contrastive_sum=contrastive_sum,
            diversity_loss=diversity,
            feature_penalty=penalty,
            num_masked=num_masked,
            num_correct=num_correct,
            code_perplexity=quantized.code_perplexity,
            prob_perplexity=quantized.prob_perplexity,
            temperature=quantized.temperature,
            last_hidden_state=hidden,
            projected_context=context,
            projected_quantized=targets,
            mask_time_indices=mask,
            negative_indices=inputs.negative_indices,
            padding_mask=inputs.padding_mask,
            logits=logits,
            target_codes=quantized.codes,
        )


class CTCOutput(NamedTuple):
    """Frame logits for CTC and the lengths to pass to ``ctc_loss``."""

    logits: Tensor
    """(B, T, V) unnormalised scores per frame."""
    output_lengths: Tensor
    """(B,) long: valid frames per utterance."""
    padding_mask: Tensor | None
    """(B, T) bool frame padding (True = padded), None without padding."""


class Wav2Vec2ForCTC(nn.Module):
    """Fine-tuning model: encoder + dropout + Linear(D -> vocab); masking in training.

    Time masking (``mask_prob``, ``mask_length``) and channel masking (zeroed feature
    channels, ``channel_prob``, ``channel_length``) act as SpecAugment-like regularisers
    and run only in training mode.
    """

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        vocab_size: int,
        *,
        final_dropout: float,
        mask_prob: float,
        mask_length: int,
        min_masks: int,
        channel_prob: float,
        channel_length: int,
    ):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size: expected >= 1, got {vocab_size}")
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
        """Keep the convolutional feature encoder fixed (the usual fine-tuning recipe)."""
        self.encoder.freeze_feature_encoder()

    def load_encoder_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Initialise the encoder from a ``Wav2Vec2ForPretraining`` state dict.

        Keys under ``encoder.`` must match exactly; the quantizer and projections of the
        pretraining model are ignored.
        """
        sub = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
        if not sub:
            raise ValueError("state_dict: no 'encoder.*' keys; expected a Wav2Vec2ForPretraining state dict")
        self.encoder.load_state_dict(sub, strict=True)

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> CTCOutput:
        """Logits (B, T, V) for ``source`` (B, S); ``padding_mask`` (B, S) True = padded."""
        features, frame_pad, lengths = self.encoder.extract_features(source, padding_mask)
        batch, time, _ = features.shape
        x, _ = self.encoder.feature_projection(features)  # (B, T, D)
        if self.training and self.mask_prob > 0:
            mask = compute_span_mask(
                (batch, time), mask_prob=self.mask_prob, mask_length=self.mask_length,
                min_masks=self.min_masks, lengths=lengths, generator=generator, device=x.device,
            )
            x = self.encoder.apply_time_mask(x, mask)
        if self.training and self.channel_prob > 0:
            channels = compute_channel_mask(
                batch, x.shape[-1], mask_prob=self.channel_prob, mask_length=self.channel_length,
                generator=generator, device=x.device,
            )  # (B, D)
            x = x.masked_fill(channels.unsqueeze(1), 0.0)
        hidden = self.encoder.transformer(x, frame_pad, layerdrop_generator=layerdrop_generator)
        logits = self.head(self.dropout(hidden))  # (B, T, V)
        return CTCOutput(logits=logits, output_lengths=lengths, padding_mask=frame_pad)
