"""JUST: w2v-BERT's two self-supervised losses and a supervised CTC loss in one model
(FAMILY.md section 8; arXiv 2111.08137).

The model is :class:`models.w2v_bert.W2vBertModel` (a Conformer whose first blocks are the
contrastive module and whose last blocks are the masked-LM module) with a CTC head on the
masked-LM module's output, as JUST puts its supervised decoder there. JUST's paper decodes
with an RNN-T; this model uses CTC on characters, the supervised loss the rest of the
project fine-tunes and evaluates with (``jobs.finetune``, ``jobs.evaluate``), so the head
is named and shaped as :class:`models.wav2vec2.Wav2Vec2ForCTC`'s (``dropout``, ``head``):
``encoder.*`` and ``head.*`` of a JUST state dict are a CTC model's state dict, and a JUST
checkpoint is evaluated as one.

One forward pass serves the three losses: every utterance of the batch is masked and goes
through the encoder; the contrastive and masked-LM losses count the masked frames of
every utterance; the CTC loss (computed by the training step, which knows which
utterances have transcripts) reads the head's scores of the labelled utterances only.
The masking then acts on the supervised loss as fine-tuning's time masking does, at the
pretraining rate.

Data flow (B utterances, T frames, V CTC tokens)::

    source -> w2v-BERT (masked) -> h (B, T, D) -> dropout -> head -> ctc_logits (B, T, V)
                                  + contrastive and masked-LM losses (models.w2v_bert)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.quantizer import GumbelVectorQuantizer
from models.w2v_bert import W2vBertModel, W2vBertOutput
from models.wav2vec2 import Wav2Vec2Encoder


class JustOutput(NamedTuple):
    """w2v-BERT's output and the CTC head's scores; all tensors, no host values."""

    w2v_bert: W2vBertOutput
    """The self-supervised part (its ``loss_sum`` weighted as ``model.w2v_bert`` says)."""
    ctc_logits: Tensor
    """(B, T, V) float32: the CTC head's scores of every frame of every utterance."""
    output_lengths: Tensor
    """(B,) long: valid frames per utterance (what ``ctc_loss`` takes as input lengths)."""


class JustModel(W2vBertModel):
    """w2v-BERT with a CTC head on its masked-LM module (module doc)."""

    def __init__(
        self,
        encoder: Wav2Vec2Encoder,
        quantizer: GumbelVectorQuantizer,
        *,
        vocab_size: int,
        final_dropout: float,
        **w2v_bert: float | int,
    ) -> None:
        super().__init__(encoder, quantizer, **w2v_bert)
        if vocab_size < 3:
            raise ValueError(f"vocab_size: expected the blank, the word boundary and at least one character "
                             f"(>= 3), got {vocab_size}")
        self.dropout = nn.Dropout(final_dropout)
        self.head = nn.Linear(encoder.dim, vocab_size)
        nn.init.xavier_uniform_(self.head.weight)  # as Wav2Vec2ForCTC's head
        nn.init.zeros_(self.head.bias)

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    def forward(  # type: ignore[override]  # w2v-BERT's output and the CTC scores
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        *,
        mask_time_indices: Tensor | None = None,
        negative_indices: Tensor | None = None,
        generator: torch.Generator | None = None,
        layerdrop_generator: torch.Generator | None = None,
    ) -> JustOutput:
        """One pass over ``source`` (B, S), as :meth:`W2vBertModel.forward` takes it."""
        out = super().forward(source, padding_mask, mask_time_indices=mask_time_indices,
                              negative_indices=negative_indices, generator=generator,
                              layerdrop_generator=layerdrop_generator)
        hidden = out.last_hidden_state  # (B, T, D)
        logits = self.head(self.dropout(hidden)).float()  # (B, T, V)
        frame_pad = out.contrastive.padding_mask  # (B, T) or None
        batch, time = hidden.shape[:2]
        if frame_pad is None:
            lengths = torch.full((batch,), time, dtype=torch.long, device=hidden.device)
        else:
            lengths = (~frame_pad).long().sum(dim=1)
        return JustOutput(w2v_bert=out, ctc_logits=logits, output_lengths=lengths)
