"""w2v-BERT: wav2vec 2.0's contrastive loss on the first Conformer blocks, masked prediction
of its quantizer's ids on the rest (FAMILY.md section 6).

The encoder is wav2vec 2.0's with a Conformer context network, split in two: the first
``contrastive_layers`` blocks are the *contrastive module*, whose output at masked frames
is scored against the quantized unmasked features exactly as in wav2vec 2.0
(:meth:`models.wav2vec2.Wav2Vec2ForPretraining.contrast`: InfoNCE over distractors plus the
codebook diversity loss); the remaining blocks are the *masked-LM module*, whose output at
masked frames goes through a linear head that predicts the id the quantizer chose for that
frame (one softmax per quantizer group). The quantizer's ids are the discrete targets
BEST-RQ gets from a frozen random projection; here they are learned by the contrastive
task alone: the masked-LM loss reaches the encoder, never the quantizer (an id has no
gradient). In training the ids are the Gumbel choices (noise included), the same codewords
the contrastive targets are made of; in evaluation the argmax.

Data flow (B utterances, T frames, G groups of V entries)::

    source (B, S) -> front end -> z (B, T, C) -> LayerNorm -> z' -> Linear -> x (B, T, D)
    x: masked frames -> mask embedding -> blocks 1..N -> c (B, T, D) -> InfoNCE + diversity
                                                 c -> blocks N+1..L -> h (B, T, D) -> head -> (B, T, G, V)
    z' -> Gumbel quantizer -> q (contrastive targets), ids (B, T, G) (masked-LM targets)

The loss is a sum over masked frames (each term the loop divides by the global count)::

    contrastive_weight * (InfoNCE + n * (diversity_weight * diversity + penalty_weight * penalty))
        + mlm_weight * cross-entropy (averaged over the G groups)

The whole stack is one ``ConformerEncoder``, so the probe, fine-tuning and the export see
the encoder of any other Conformer objective; the heads (``final_proj``, ``project_q``, the
quantizer, ``mlm_head``) stay behind. Nothing in a forward pass reads a tensor value on
the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.conformer import ConformerEncoder
from models.losses import masked_cross_entropy
from models.quantizer import GumbelVectorQuantizer
from models.wav2vec2 import PretrainOutput, Wav2Vec2Encoder, Wav2Vec2ForPretraining


class W2vBertOutput(NamedTuple):
    """What a w2v-BERT step logs or differentiates; all tensors, no host values."""

    loss_sum: Tensor
    """() float32: the weighted total, summed over masked frames (module doc)."""
    mlm_sum: Tensor
    """() float32: the masked-LM cross-entropy summed over masked frames (unweighted)."""
    mlm_correct: Tensor
    """() float32: masked frames whose id the head predicted right, averaged over groups."""
    mlm_logits: Tensor
    """(B, T, G, V) float32: the head's scores of every frame."""
    target_ids: Tensor
    """(B, T, G) long: the quantizer's ids of every frame (only masked ones count)."""
    last_hidden_state: Tensor
    """(B, T, D): the masked-LM module's output (the encoder's)."""
    contrastive: PretrainOutput
    """wav2vec 2.0's output for the contrastive module (its ``loss_sum`` unweighted; its
    ``last_hidden_state`` the contrastive module's output)."""


class W2vBertModel(Wav2Vec2ForPretraining):
    """wav2vec 2.0's pretraining model with its context network split into the contrastive
    and the masked-LM modules, and a head predicting the quantizer's ids (module doc)."""

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        quantizer: GumbelVectorQuantizer,
        *,
        contrastive_layers: int,
        contrastive_weight: float,
        mlm_weight: float,
        **wav2vec2: float | int,
    ) -> None:
        super().__init__(encoder, quantizer, **wav2vec2)
        if not isinstance(encoder.transformer, ConformerEncoder):
            raise ValueError(f"W2vBertModel: expected a ConformerEncoder context network, got "
                             f"{type(encoder.transformer).__name__}")
        num_layers = len(encoder.transformer.layers)
        if not 1 <= contrastive_layers < num_layers:
            raise ValueError(f"contrastive_layers: expected 1..{num_layers - 1} of the {num_layers} blocks, "
                             f"got {contrastive_layers}")
        self.contrastive_layers = contrastive_layers
        self.contrastive_weight = contrastive_weight
        self.mlm_weight = mlm_weight
        self.mlm_head = nn.Linear(encoder.dim, quantizer.groups * quantizer.entries)

    def forward(  # type: ignore[override]  # a richer output than wav2vec 2.0's
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        mask_time_indices: Tensor | None = None,
        negative_indices: Tensor | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> W2vBertOutput:
        """One pass over ``source`` (B, S), as :meth:`Wav2Vec2ForPretraining.forward` takes it."""
        inputs = self.masked_inputs(source, padding_mask, mask_time_indices=mask_time_indices,
                                    negative_indices=negative_indices, generator=generator)
        contrastive_hidden, hidden = self.encoder.transformer.forward_split(
            inputs.x, inputs.padding_mask, split=self.contrastive_layers, layerdrop_generator=layerdrop_generator,
        )  # (B, T, D) each
        w2v = self.contrast(inputs, contrastive_hidden, generator=generator)
        batch, time, _ = hidden.shape
        groups, entries = self.quantizer.groups, self.quantizer.entries
        logits = self.mlm_head(hidden).float().view(batch, time, groups, entries)  # (B, T, G, V)
        target_ids = w2v.target_codes.detach()  # (B, T, G)
        mlm_sum, mlm_correct = masked_cross_entropy(logits, target_ids, inputs.mask)
        loss_sum = self.contrastive_weight * w2v.loss_sum + self.mlm_weight * mlm_sum
        return W2vBertOutput(
            loss_sum=loss_sum, mlm_sum=mlm_sum, mlm_correct=mlm_correct, mlm_logits=logits, target_ids=target_ids,
            last_hidden_state=hidden, contrastive=w2v,
        )
