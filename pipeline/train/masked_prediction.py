"""The masked-prediction pretraining step (BEST-RQ): a batch -> (cross-entropy summed over
masked frames, their count, metrics).

Masks are drawn in :meth:`MaskedPredictionStep.prepare`, before any forward, from a
generator seeded by (seed, step, rank, micro-step), as for wav2vec 2.0: the loop needs
every micro-batch's count of masked frames up front. The targets are a pure function of
the audio (a frozen quantizer of its log-mel frames), computed in the forward on the
training device; a batch may carry ``mask_time_indices`` (B, T), used as given.

Logged per masked frame: the cross-entropy (``loss/masked_ce``, chance ln(codebook_size)),
the accuracy, and per codebook the perplexity of the target ids (how many codewords the
data uses: near 1, the targets say nothing) and of the averaged prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from models.masked_prediction import MaskedPredictionModel
from pipeline.config import Config
from pipeline.train import seeding
from pipeline.train.loop import Prepared, StepOutput, to_device
from pipeline.train.metrics import Health, ratio
from pipeline.train.pretrain import audio_inputs


class MaskedPredictionStep:
    """Masked prediction of discrete targets in the generic loop (:class:`pipeline.train.loop.TrainStep`)."""

    def __init__(self, cfg: Config, model: MaskedPredictionModel) -> None:
        self.cfg = cfg
        self.model = model  # the unwrapped module: masks need only its shapes, no parameters
        self.codebooks = model.codebooks
        self._layerdrop_gen: torch.Generator | None = None

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        audio = audio_inputs(batch, self.model.encoder.feature_encoder, device)
        gen = seeding.mask_generator(self.cfg.train.seed, step, rank, micro, device)
        if "mask_time_indices" in batch:
            mask = to_device(np.asarray(batch["mask_time_indices"], dtype=bool), device)  # (B, T)
            mask = mask & (torch.arange(audio.frames, device=device).unsqueeze(0) < audio.lengths.unsqueeze(1))
        else:
            mask = self.model.sample_masks(audio.source.shape[0], audio.frames, audio.lengths, gen)
        inputs: dict[str, Any] = {
            "source": audio.source, "padding_mask": audio.padding_mask, "mask_time_indices": mask, "generator": gen,
        }
        return Prepared(inputs=inputs, count=mask.sum(), num_samples=audio.num_samples)

    def begin_update(self, module: torch.nn.Module, step: int) -> None:
        self._layerdrop_gen = seeding.layerdrop_generator(self.cfg.train.seed, step)

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        inp = prepared.inputs
        out = model(
            inp["source"], inp["padding_mask"], mask_time_indices=inp["mask_time_indices"],
            generator=inp["generator"], layerdrop_generator=self._layerdrop_gen,
        )
        num_masked = out.num_masked.float()
        metrics: dict[str, torch.Tensor] = {
            "mp/ce_sum": out.loss_sum.detach().float(),
            "mp/num_masked": num_masked,
            "mp/num_correct": out.num_correct.detach().float(),
        }
        target_ppl = out.target_perplexity.detach().float()  # (G,)
        pred_ppl = out.prediction_perplexity.detach().float()  # (G,)
        for g in range(self.codebooks):
            metrics[f"mp/target_ppl_{g}"] = target_ppl[g]
            metrics[f"mp/pred_ppl_{g}"] = pred_ppl[g]
        return StepOutput(loss_sum=out.loss_sum, count=out.num_masked, metrics=metrics)

    def health(self) -> Health:
        size = self.model.codebook_size
        return Health(
            loss_key="loss/masked_ce", chance=math.log(size), chance_text=f"ln({size})",
            hint="check masking, the learning rate and that the targets vary (perplexity/target_*)",
            collapse_keys=("perplexity/target",),
            collapse_hint="the targets collapsed onto a few codewords: the quantizer's input carries no signal "
                          "(check model.frontend / model.best_rq and the audio)",
        )

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums.get("mp/num_masked", 0.0)
        micro = sums.get("num_micro", 0.0)
        out = {
            "loss/masked_ce": ratio(sums.get("mp/ce_sum", 0.0), n),
            "accuracy": ratio(sums.get("mp/num_correct", 0.0), n),
        }
        for g in range(self.codebooks):
            out[f"perplexity/target_{g}"] = ratio(sums.get(f"mp/target_ppl_{g}", 0.0), micro)
            out[f"perplexity/prediction_{g}"] = ratio(sums.get(f"mp/pred_ppl_{g}", 0.0), micro)
        return out
