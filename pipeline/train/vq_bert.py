"""vq-wav2vec's BERT step: the batch's tokens -> (cross-entropy summed over masked tokens, their
count, metrics).

The tokens come through the data path as HuBERT's labels do: the loader joins the label set
the run's settings name (``jobs.label label.features=tokens``) with every batch as
``target_ids`` (B, T) at the model's frame rate, one frame per token, -1 past each crop's
tokens. They are the model's input and its targets; the audio the batch also carries is
not used (the loader still decodes it: the crops are planned in samples and the labels
are read by the same task, so skipping the decode would need a second, audio-free batch
path; the cost is the decode of the crops, small beside a BERT's forward at BASE size).
Masks are drawn in :meth:`VqBertStep.prepare` from the same seeded generator as every
other objective's; the metrics are the masked-prediction step's (``loss/masked_ce``,
chance ln(K); accuracy; the perplexity of the masked tokens and of the prediction; on a
multilingual batch ``loss/lang/<code>`` and ``loss/masked_ce/lang/<code>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline.data.loader import LANGUAGES
from pipeline.train import seeding
from pipeline.train.loop import Prepared, to_device
from pipeline.train.masked_prediction import TARGET_IDS, MaskedPredictionStep, _num_samples
from pipeline.train.metrics import Health


def batch_tokens(batch: Mapping[str, np.ndarray], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """((B, T) int64 tokens, 0 past each row's end; (B,) tokens per row) of a batch's
    ``target_ids``, trimmed to its longest row. Refuses tokens outside the vocabulary and
    rows whose tokens do not form one run from frame 0 (labels out of line with the crops)."""
    raw = batch.get(TARGET_IDS)
    if raw is None:
        raise ValueError(
            "batch: no 'target_ids': model.objective=vq_bert trains on the tokens the loader joins with each batch "
            "(make them with jobs.label label.features=tokens label.teacher=<a vq-wav2vec model>)"
        )
    ids = np.asarray(raw, dtype=np.int64)  # (B, W)
    valid = ids >= 0
    lengths = valid.sum(axis=1)
    if (valid != (np.arange(ids.shape[1])[None, :] < lengths[:, None])).any():
        raise ValueError("batch: a row's tokens have a gap (-1 before its last token): labels and crops are out of line")
    if (ids >= vocab).any():
        raise ValueError(f"batch: token {int(ids.max())} is outside the model's vocabulary of {vocab} "
                         "(model.vq_bert.vocab)")
    width = max(1, int(lengths.max(initial=0)))
    return np.where(valid, ids, 0)[:, :width], lengths


class VqBertStep(MaskedPredictionStep):
    """Masked prediction of tokens in the generic loop (module doc); the forward, metrics and
    summary are the masked-prediction step's."""

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        tokens_np, lengths_np = batch_tokens(batch, self.model.codebook_size)
        batch_size, frames = tokens_np.shape
        tokens = to_device(tokens_np, device)  # (B, T)
        lengths = to_device(lengths_np, device)  # (B,)
        padding = None
        if (lengths_np < frames).any():
            padding = to_device(np.arange(frames)[None, :] >= lengths_np[:, None], device)  # (B, T)
        gen = seeding.mask_generator(self.cfg.train.seed, step, rank, micro, device)
        mask = self.model.sample_masks(batch_size, frames, lengths, gen)
        inputs: dict[str, Any] = {"source": tokens, "padding_mask": padding, "mask_time_indices": mask,
                                  "generator": gen, "per_row": LANGUAGES in batch}
        return Prepared(inputs=inputs, count=mask.sum(), num_samples=int(_num_samples(batch).sum()))

    def health(self) -> Health:
        base = super().health()
        return Health(
            loss_key=base.loss_key, chance=base.chance, chance_text=base.chance_text,
            hint="check masking, the learning rate and that the tokens vary (perplexity/target_*)",
            collapse_keys=base.collapse_keys,
            collapse_hint="the tokens use a few ids only: check the token set's summary.json (usage) and the "
                          "vq-wav2vec model that made them (its code perplexity in pretraining)",
        )
