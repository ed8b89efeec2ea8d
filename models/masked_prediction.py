"""Masked prediction of discrete targets: BEST-RQ's random-projection codes, HuBERT's k-means ids.

The encoder is wav2vec 2.0's (a front end, the projection, the learned mask embedding, a
Transformer or Conformer); what differs is the target of each masked frame: one id per
codebook, from a frozen random-projection quantizer of the frame's log-mel features
(BEST-RQ, :class:`models.best_rq.RandomProjectionQuantizer`) or given with the batch
(HuBERT's k-means labels, made by ``jobs.label``), and the head that scores the ids: a
linear layer (the multi-softmax of BEST-RQ) or HuBERT's cosine similarity to learned
cluster embeddings (:class:`models.hubert.CosineHead`); either is ``prediction_head``.
The loss is cross-entropy summed over masked frames and averaged over codebooks, so it
is a sum over the count of masked frames like every objective's, and its chance level is
ln(codebook_size). HuBERT adds fairseq's feature penalty (``feature_penalty_weight`` times
the mean square of the front end's features, per masked frame).

Data flow (B utterances, S samples, T frames, G codebooks of V ids)::

    source (B, S) -> front end -> features (B, T, C) -> projection -> x (B, T, D)
    x: masked frames -> mask embedding -> context network -> h (B, T, D) -> head -> (B, T, G, V)
    source -> target log-mel (B, T, M) -> quantizer -> ids (B, T, G);  CE at masked frames
    (HuBERT: ids (B, T, G) given with the batch)

Nothing in a forward pass reads a tensor value on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.best_rq import RandomProjectionQuantizer
from models.frontends import LogMelFrontend
from models.losses import feature_penalty, masked_cross_entropy
from models.masking import compute_span_mask
from models.quantizer import perplexity
from models.wav2vec2 import Wav2Vec2Encoder, check_shape


class MaskedPredictionOutput(NamedTuple):
    """What a masked-prediction step logs or differentiates; all tensors, no host values."""

    loss_sum: Tensor
    """() float32: cross-entropy summed over masked frames, averaged over codebooks, plus
    ``num_masked * feature_penalty_weight * feature_penalty``."""
    num_masked: Tensor
    """() long: masked frames (the loss's count)."""
    num_correct: Tensor
    """() float32: masked frames whose id was predicted right, averaged over codebooks."""
    target_perplexity: Tensor
    """(G,): perplexity of the target ids over masked frames (1 = one id for everything)."""
    prediction_perplexity: Tensor
    """(G,): perplexity of the averaged predicted distribution over masked frames."""
    target_ids: Tensor
    """(B, T, G) long: the targets of every frame."""
    logits: Tensor
    """(B, T, G, V) float32: the head's scores of every frame."""
    last_hidden_state: Tensor
    """(B, T, D): the context network's output."""
    mask_time_indices: Tensor
    """(B, T) bool: the masked frames."""
    padding_mask: Tensor | None
    """(B, T) bool frame padding (True = padded), None without padding."""
    ce_sum: Tensor | None = None
    """() float32: the cross-entropy part of ``loss_sum``."""
    feature_penalty: Tensor | None = None
    """() float32: mean square of the front end's features of this batch (0 when unweighted)."""


def fit_frames(x: Tensor, num_frames: int) -> Tensor:
    """(B, T', ...) cut or extended (repeating the last frame) to (B, num_frames, ...): the
    target features of a front end whose window edges fall a frame apart."""
    have = x.shape[1]
    if have >= num_frames:
        return x[:, :num_frames]
    if have == 0:
        return x.new_zeros(x.shape[0], num_frames, *x.shape[2:])
    return torch.cat([x, x[:, -1:].expand(-1, num_frames - have, *x.shape[2:])], dim=1)


class MaskedPredictionModel(nn.Module):
    """Encoder + head predicting ``codebooks`` x ``codebook_size`` ids at masked frames.

    Computed targets (BEST-RQ): ``target_features``, the log-mel front end the targets are
    computed from at the model's frame rate, and ``quantizer``, the frozen random
    projection; the head is linear. Given targets (HuBERT): no quantizer, the sizes
    (``codebooks``, ``codebook_size``) and the ``head`` (``(B, T, D) -> (B, T, G * V)``)
    are passed; every forward then needs ``target_ids``.
    """

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        *,
        target_features: LogMelFrontend | None = None,
        quantizer: RandomProjectionQuantizer | None = None,
        codebooks: int | None = None,
        codebook_size: int | None = None,
        head: nn.Module | None = None,
        mask_prob: float,
        mask_length: int,
        min_masks: int,
        feature_penalty_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if (quantizer is None) != (target_features is None):
            raise ValueError("MaskedPredictionModel: give target_features and quantizer together (computed targets) "
                             "or neither (targets given with every batch)")
        if quantizer is not None:
            codebooks, codebook_size = quantizer.codebooks, quantizer.codebook_size
        elif codebooks is None or codebook_size is None:
            raise ValueError("MaskedPredictionModel: targets given with the batch need codebooks and codebook_size")
        self.encoder = encoder
        if quantizer is not None:
            self.target_features = target_features
            self.quantizer = quantizer
        else:
            self.target_features = None
            self.quantizer = None
        self.codebooks = int(codebooks)
        self.codebook_size = int(codebook_size)
        self.prediction_head = head if head is not None else nn.Linear(encoder.dim, self.codebooks * self.codebook_size)
        self.mask_prob = mask_prob
        self.mask_length = mask_length
        self.min_masks = min_masks
        self.feature_penalty_weight = feature_penalty_weight

    @property
    def given_targets(self) -> bool:
        """Whether every forward needs ``target_ids`` (no quantizer computes them)."""
        return self.quantizer is None

    def set_num_updates(self, step: int) -> None:
        """No schedule inside the model (the targets are frozen)."""

    def sample_masks(self, batch: int, num_frames: int, lengths: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
        """(B, T) bool spans of masked frames, drawn on ``lengths.device``."""
        return compute_span_mask(
            (batch, num_frames), mask_prob=self.mask_prob, mask_length=self.mask_length,
            min_masks=self.min_masks, lengths=lengths, generator=generator, device=lengths.device,
        )

    @torch.no_grad()
    def targets(self, source: Tensor, num_samples: Tensor | None, num_frames: int) -> Tensor:
        """(B, T, G) target ids of ``source`` (B, S) at the model's ``num_frames`` frames."""
        if self.quantizer is None:
            raise ValueError("target_ids: this model predicts labels given with the batch (k-means ids from "
                             "jobs.label); none were given")
        feats = self.target_features(source, num_samples)  # (B, T', M)
        return self.quantizer(fit_frames(feats, num_frames))

    def forward(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        mask_time_indices: Tensor | None = None,
        target_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> MaskedPredictionOutput:
        """One pass over ``source`` (B, S); ``padding_mask`` (B, S) True = padded.

        Masks come from ``generator`` unless given; targets from the quantizer unless
        given (``target_ids`` (B, T, G)).
        """
        features, frame_pad, lengths = self.encoder.extract_features(source, padding_mask)
        batch, time, _ = features.shape
        x, _ = self.encoder.feature_projection(features)  # (B, T, D)
        if mask_time_indices is None:
            mask = self.sample_masks(batch, time, lengths, generator)
        else:
            check_shape("mask_time_indices", mask_time_indices, (batch, time))
            mask = mask_time_indices.to(device=x.device, dtype=torch.bool)
        if frame_pad is not None:
            mask = mask & ~frame_pad
        if target_ids is None:
            num_samples = None if padding_mask is None else (~padding_mask.bool()).long().sum(dim=1)
            target_ids = self.targets(source, num_samples, time)
        else:
            check_shape("target_ids", target_ids, (batch, time, self.codebooks))
        target_ids = target_ids.to(device=x.device, dtype=torch.long)

        x = self.encoder.apply_time_mask(x, mask)
        hidden = self.encoder.transformer(x, frame_pad, layerdrop_generator=layerdrop_generator)  # (B, T, D)
        logits = self.prediction_head(hidden).float().view(batch, time, self.codebooks, self.codebook_size)

        ce_sum, num_correct = masked_cross_entropy(logits, target_ids, mask)
        weights = mask.to(ce_sum.dtype)
        loss_sum = ce_sum
        penalty = ce_sum.new_zeros(())
        if self.feature_penalty_weight > 0:
            penalty = feature_penalty(features, frame_pad)
            loss_sum = ce_sum + weights.sum() * self.feature_penalty_weight * penalty
        with torch.no_grad():
            count = weights.sum().clamp(min=1.0)
            w = weights.view(batch, time, 1, 1)
            onehot = F.one_hot(target_ids, self.codebook_size).to(weights.dtype)  # (B, T, G, V)
            target_ppl = perplexity((onehot * w).sum(dim=(0, 1)) / count)  # (G,)
            pred_ppl = perplexity((logits.softmax(dim=-1) * w).sum(dim=(0, 1)) / count)  # (G,)
        return MaskedPredictionOutput(
            loss_sum=loss_sum, num_masked=mask.long().sum(), num_correct=num_correct,
            target_perplexity=target_ppl, prediction_perplexity=pred_ppl, target_ids=target_ids,
            logits=logits, last_hidden_state=hidden, mask_time_indices=mask, padding_mask=frame_pad,
            ce_sum=ce_sum, feature_penalty=penalty,
        )
