"""The APC and Mockingjay/TERA steps: a batch -> (absolute error summed over the reconstructed
log-mel values, their count, metrics).

APC's count is a function of the frame lengths; TERA's alterations (time spans, what each
utterance's spans get, the frequency band, which utterances get noise) are drawn in
``prepare`` from the generator seeded by (seed, step, rank, micro-step), so the count is
known before any forward and a step is reproducible from its seed; the noise itself is
drawn in the forward from the same generator. A batch may carry ``mask_time_indices``
(B, T) for TERA's spans, used as given.

Logged: ``loss/l1`` per value, ``baseline/l1`` the same error for the trivial predictor
(APC: repeat frame t; TERA: each channel's utterance mean) and ``l1_vs_baseline`` their
ratio (below 1: the model predicts better than the trivial predictor). A regression loss
has no chance level, so :meth:`health` is None: the baseline beside it says as much. On a
multilingual batch each utterance's absolute error and reconstructed values go to the
loop's per-language losses (``loss/lang/<code>``, ``loss/l1/lang/<code>``: the same, per value).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from models.reconstruction import ApcModel, MaskedReconstructionModel
from pipeline.config import Config
from pipeline.data.loader import LANGUAGES
from pipeline.train import seeding
from pipeline.train.loop import Prepared, StepOutput, to_device
from pipeline.train.metrics import ratio
from pipeline.train.pretrain import audio_inputs


class _ReconstructionStep:
    """What APC's and TERA's steps share: metrics, health, summaries."""

    row_losses = True
    """Gives each utterance's loss (``StepOutput.row_loss``) on a batch with languages."""
    row_part_names: tuple[str, ...] = ("l1",)
    """The loss parts given per utterance (``StepOutput.row_parts``): ``loss/<part>/lang/<code>``."""

    def __init__(self, cfg: Config, model: ApcModel | MaskedReconstructionModel) -> None:
        self.cfg = cfg
        self.model = model  # the unwrapped module: counts need only its shapes
        self._layerdrop_gen: torch.Generator | None = None

    def begin_update(self, module: torch.nn.Module, step: int) -> None:
        self._layerdrop_gen = seeding.layerdrop_generator(self.cfg.train.seed, step)

    def _output(self, out: Any, prepared: Prepared) -> StepOutput:
        metrics = {
            "rec/l1_sum": out.loss_sum.detach().float(),
            "rec/baseline_sum": out.baseline_sum.float(),
            "rec/num_values": out.num_values.float(),
            "rec/num_frames": out.num_frames.float(),
        }
        rows: dict[str, Any] = {}
        if prepared.inputs.get("per_row"):  # a multilingual batch: each utterance's loss for loss/lang/<code>
            row_loss, row_count = out.row_loss_sum, out.row_values.float()
            rows = {"row_loss": row_loss, "row_count": row_count, "row_parts": {"l1": (row_loss, row_count)}}
        return StepOutput(loss_sum=out.loss_sum, count=out.num_values, metrics=metrics, **rows)

    def health(self) -> None:
        """No chance level for a regression loss; ``baseline/l1`` is logged beside it."""
        return None

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums.get("rec/num_values", 0.0)
        l1, baseline = ratio(sums.get("rec/l1_sum", 0.0), n), ratio(sums.get("rec/baseline_sum", 0.0), n)
        return {"loss/l1": l1, "baseline/l1": baseline, "l1_vs_baseline": ratio(l1, baseline),
                "reconstructed_frames": sums.get("rec/num_frames", 0.0)}


class ApcStep(_ReconstructionStep):
    """APC in the generic loop (:class:`pipeline.train.loop.TrainStep`)."""

    model: ApcModel

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        audio = audio_inputs(batch, self.model.encoder.feature_encoder, device)
        inputs: dict[str, Any] = {"source": audio.source, "padding_mask": audio.padding_mask,
                                  "per_row": LANGUAGES in batch}
        return Prepared(inputs=inputs, count=self.model.num_values(audio.lengths), num_samples=audio.num_samples)

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        inp = prepared.inputs
        return self._output(model(inp["source"], inp["padding_mask"], layerdrop_generator=self._layerdrop_gen),
                            prepared)


class TeraStep(_ReconstructionStep):
    """Mockingjay/TERA in the generic loop (:class:`pipeline.train.loop.TrainStep`)."""

    model: MaskedReconstructionModel

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        audio = audio_inputs(batch, self.model.encoder.feature_encoder, device)
        gen = seeding.mask_generator(self.cfg.train.seed, step, rank, micro, device)
        alt = self.model.sample_alterations(audio.source.shape[0], audio.frames, audio.lengths, gen)
        if "mask_time_indices" in batch:
            given = to_device(np.asarray(batch["mask_time_indices"], dtype=bool), device)  # (B, T)
            alt = alt._replace(time=given & (torch.arange(audio.frames, device=device) < audio.lengths.unsqueeze(1)))
        inputs: dict[str, Any] = {
            "source": audio.source, "padding_mask": audio.padding_mask, "alterations": alt, "generator": gen,
            "per_row": LANGUAGES in batch,
        }
        return Prepared(inputs=inputs, count=self.model.num_values(alt, audio.lengths), num_samples=audio.num_samples)

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        inp = prepared.inputs
        out = model(inp["source"], inp["padding_mask"], alterations=inp["alterations"], generator=inp["generator"],
                    layerdrop_generator=self._layerdrop_gen)
        return self._output(out, prepared)
