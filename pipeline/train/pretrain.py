"""The wav2vec 2.0 pretraining step: a batch -> (loss sum over masked frames, count, metrics);
and what every pretraining step shares (:func:`audio_inputs`).

Masks and distractors are drawn in :meth:`PretrainStep.prepare`, before any forward,
from a generator seeded by (seed, step, rank, micro-step): the loop needs every
micro-batch's count of masked frames up front to normalise by the global count. The
same generator then drives the Gumbel noise of the forward, so a step is reproducible
from its seed alone. A batch may carry precomputed ``mask_time_indices`` (B, T) and
``negative_indices`` (B, T, K) arrays; they are used as given.

Loss parts are logged per masked frame. The diversity loss and the feature penalty are
batch statistics (fairseq's form: each micro-batch contributes ``num_masked * value``),
so their logged value is the masked-frame-weighted mean over micro-batches and ranks.

A batch that carries languages (a multilingual dataset) also gets each utterance's
contrastive loss and masked frames (:func:`row_contrastive`, from the logits the model
returns), from which the loop logs ``loss/lang/<code>``, and the same as the loss part
``contrastive`` (``loss/contrastive/lang/<code>``, the name every objective's parts follow):
the per-language part of ``loss/contrastive`` (their masked-frame-weighted mean is it).
The diversity loss and the feature penalty are batch statistics with no per-utterance part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.wav2vec2 import PretrainOutput, Wav2Vec2ForPretraining
from pipeline.config import Config
from pipeline.data.loader import LANGUAGES
from pipeline.train import seeding
from pipeline.train.loop import Prepared, StepOutput, to_device
from pipeline.train.metrics import Health, contrastive_health, ratio


@dataclass
class AudioInputs:
    """A host batch's audio on the device with the frame counts a model's front end gives it."""

    source: torch.Tensor
    """(B, S) float32 samples."""
    padding_mask: torch.Tensor | None
    """(B, S) bool, True at padding; None when no row is padded."""
    lengths: torch.Tensor
    """(B,) long: valid frames per row."""
    frames: int
    """T, the frames of the longest row."""
    num_samples: int
    """Audio samples in the batch (not padding): the speed metrics' unit."""


def audio_inputs(batch: Mapping[str, np.ndarray], frontend: torch.nn.Module, device: torch.device) -> AudioInputs:
    """``batch['source']`` (and its padding mask) on ``device`` with the frame counts of
    ``frontend`` (``output_lengths``): what every pretraining step needs before drawing masks."""
    source_np = batch["source"]
    if source_np.ndim != 2:
        raise ValueError(f"batch['source']: expected (B, S) samples, got shape {source_np.shape}")
    pad_np = batch.get("padding_mask")
    has_pad = pad_np is not None and bool(pad_np.any())
    num_samples = int(source_np.size - (int(pad_np.sum()) if has_pad else 0))
    source = to_device(source_np.astype(np.float32, copy=False), device)  # (B, S)
    padding_mask = to_device(pad_np.astype(bool, copy=False), device) if has_pad else None  # (B, S)
    batch_size, num_samples_max = source.shape
    frames = int(frontend.output_lengths(torch.tensor(num_samples_max)).item())  # host arithmetic, CPU tensor
    if padding_mask is not None:
        lengths = frontend.output_lengths((~padding_mask).long().sum(dim=1)).clamp(max=frames)  # (B,)
    else:
        lengths = torch.full((batch_size,), frames, dtype=torch.long, device=device)
    return AudioInputs(source=source, padding_mask=padding_mask, lengths=lengths, frames=frames,
                       num_samples=num_samples)


def row_contrastive(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), masked frames (B,)) of each utterance: InfoNCE summed over its masked
    frames, from the model's contrastive ``logits`` (B, T, K + 1), target first, exactly
    as :func:`models.losses.contrastive_loss` sums it over the batch."""
    with torch.no_grad():
        per_frame = torch.logsumexp(logits.float(), dim=-1) - logits[..., 0].float()  # (B, T)
        mask = mask.bool()
        loss = torch.where(mask, per_frame, torch.zeros_like(per_frame)).sum(dim=1)  # (B,)
        return loss, mask.sum(dim=1).float()


class PretrainStep:
    """The pretraining task of the generic loop (:class:`pipeline.train.loop.TrainStep`)."""

    row_losses = True
    """Gives each utterance's loss (``StepOutput.row_loss``) on a batch with languages."""
    row_part_names: tuple[str, ...] = ("contrastive",)
    """The loss parts given per utterance (``StepOutput.row_parts``): ``loss/<part>/lang/<code>``."""

    def __init__(self, cfg: Config, model: Wav2Vec2ForPretraining) -> None:
        self.cfg = cfg
        self.model = model  # the unwrapped module: masks need only its shapes, no parameters
        self.groups = cfg.model.quantizer.groups
        self._layerdrop_gen: torch.Generator | None = None

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        audio = audio_inputs(batch, self.model.encoder.feature_encoder, device)
        source, padding_mask, lengths, frames = audio.source, audio.padding_mask, audio.lengths, audio.frames
        batch_size = source.shape[0]
        gen = seeding.mask_generator(self.cfg.train.seed, step, rank, micro, device)

        if "mask_time_indices" in batch:
            mask = to_device(np.asarray(batch["mask_time_indices"], dtype=bool), device)  # (B, T)
            if padding_mask is not None:
                mask = mask & (torch.arange(frames, device=device).unsqueeze(0) < lengths.unsqueeze(1))
            if "negative_indices" not in batch:
                raise ValueError("batch: 'mask_time_indices' given without 'negative_indices'")
            negatives = to_device(np.asarray(batch["negative_indices"], dtype=np.int64), device)  # (B, T, K)
        else:
            mask, negatives = self.model.sample_masks(batch_size, frames, lengths, gen)
        inputs: dict[str, Any] = {
            "source": source,
            "padding_mask": padding_mask,
            "mask_time_indices": mask,
            "negative_indices": negatives,
            "generator": gen,
            "per_row": LANGUAGES in batch,
        }
        return Prepared(inputs=inputs, count=mask.sum(), num_samples=audio.num_samples)

    def begin_update(self, module: torch.nn.Module, step: int) -> None:
        module.set_num_updates(step)
        self._layerdrop_gen = seeding.layerdrop_generator(self.cfg.train.seed, step)

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        out = self.run(model, prepared)
        return StepOutput(loss_sum=out.loss_sum, count=out.num_masked, metrics=self.metrics(out),
                          **self.row_losses_of(out, prepared))

    @staticmethod
    def row_losses_of(out: PretrainOutput, prepared: Prepared) -> dict[str, Any]:
        """Each utterance's contrastive loss sum and masked frames (``row_loss``, ``row_count``,
        and the part ``contrastive`` of ``row_parts``) on a multilingual batch, for
        ``loss/lang/<code>``; nothing otherwise."""
        if not prepared.inputs.get("per_row"):
            return {}
        row_loss, row_count = row_contrastive(out.logits, out.mask_time_indices)
        return {"row_loss": row_loss, "row_count": row_count, "row_parts": {"contrastive": (row_loss, row_count)}}

    def run(self, model: Callable[..., Any], prepared: Prepared) -> Any:
        """The model's output for a prepared micro-batch (w2v-BERT's step reads more of it)."""
        inp = prepared.inputs
        return model(
            inp["source"], inp["padding_mask"],
            mask_time_indices=inp["mask_time_indices"], negative_indices=inp["negative_indices"],
            generator=inp["generator"], layerdrop_generator=self._layerdrop_gen,
        )

    def metrics(self, out: PretrainOutput) -> dict[str, torch.Tensor]:
        """The contrastive loss's metric sums of one micro-batch (what :meth:`summarize` reads)."""
        num_masked = out.num_masked.float()
        metrics: dict[str, torch.Tensor] = {
            "pt/contrastive_sum": out.contrastive_sum.detach().float(),
            "pt/num_masked": num_masked,
            "pt/num_correct": out.num_correct.float(),
            "pt/diversity_w": out.diversity_loss.detach().float() * num_masked,
            "pt/penalty_w": out.feature_penalty.detach().float() * num_masked,
            "pt/temperature": out.temperature.float(),
        }
        code_ppl = out.code_perplexity.detach().float()  # (G,)
        prob_ppl = out.prob_perplexity.detach().float()  # (G,)
        for g in range(self.groups):
            metrics[f"pt/code_ppl_{g}"] = code_ppl[g]
            metrics[f"pt/prob_ppl_{g}"] = prob_ppl[g]
        return metrics

    def health(self) -> Health:
        return contrastive_health(self.cfg.model.loss.num_negatives)

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums.get("pt/num_masked", 0.0)
        micro = sums.get("num_micro", 0.0)
        out = {
            "loss/contrastive": ratio(sums.get("pt/contrastive_sum", 0.0), n),
            "loss/diversity": ratio(sums.get("pt/diversity_w", 0.0), n),
            "loss/feature_penalty": ratio(sums.get("pt/penalty_w", 0.0), n),
            "accuracy": ratio(sums.get("pt/num_correct", 0.0), n),
            "temperature": ratio(sums.get("pt/temperature", 0.0), micro),
        }
        for g in range(self.groups):
            out[f"perplexity/code_{g}"] = ratio(sums.get(f"pt/code_ppl_{g}", 0.0), micro)
            out[f"perplexity/prob_{g}"] = ratio(sums.get(f"pt/prob_ppl_{g}", 0.0), micro)
        return out
