"""The data2vec pretraining step (1.0 and 2.0): a batch -> (regression loss summed over
masked frames, their count, metrics), and the teacher's EMA update after each optimizer step.

Masks are drawn in :meth:`Data2VecStep.prepare`, before any forward, from a generator
seeded by (seed, step, rank, micro-step), as for every objective: data2vec 2.0's
``clones`` masks per utterance (exactly ``model.mask.prob`` of each one's frames) and
the number of frames its clones keep, counted on the host from the batch's padding,
so the forward never waits for it.

The teacher (``models.data2vec``) is no parameter of the optimizer. After the optimizer
step of every update, :meth:`Data2VecStep.end_update` moves it towards the student with
the decay of that update (:func:`models.data2vec.ema_decay`), on the tensors each rank
holds (``deepspeed_compat.local_tensors``: whole parameters under ZeRO-0/1/2, the rank's
partition under ZeRO-3): no communication, and every rank's teacher stays the one of a
single-process run. An update skipped for a non-finite loss leaves the teacher as it
was; the skip flag is read on the device. The teacher is part of the model's state, so
DeepSpeed's checkpoint saves and restores it (each rank's partition under ZeRO-3).

Logged: the loss per masked frame (``loss/regression``), the teacher's decay, and the
std over masked frames (mean over channels) of the targets and of the predictions.
Regression has no chance level; the health alarm watches those stds instead, against
fairseq's floors (``model.data2vec.min_target_std``, ``min_prediction_std``): targets
that stop varying mean the teacher collapsed, predictions that stop varying mean the
student did.

On a multilingual batch each utterance's regression loss and masked frames go to the
loop's per-language losses (``loss/lang/<code>``, ``loss/regression/lang/<code>``: the
same); with data2vec 2.0's clones an utterance's are those of all its clones, which share
its language.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from models.data2vec import Data2Vec2Model, Data2VecBase, RegressionOutput, ema_update_, num_kept_frames
from pipeline.config import Config
from pipeline.data.loader import LANGUAGES
from pipeline.train import seeding
from pipeline.train.deepspeed_compat import local_tensors
from pipeline.train.engine import Engine
from pipeline.train.loop import Prepared, StepOutput, to_device
from pipeline.train.metrics import Health, ratio
from pipeline.train.pretrain import audio_inputs


class Data2VecStep:
    """data2vec 1.0 / 2.0 in the generic loop (:class:`pipeline.train.loop.TrainStep`), with
    the teacher's update after each optimizer step (``end_update``)."""

    row_losses = True
    """Gives each utterance's loss (``StepOutput.row_loss``) on a batch with languages."""
    row_part_names: tuple[str, ...] = ("regression",)
    """The loss parts given per utterance (``StepOutput.row_parts``): ``loss/<part>/lang/<code>``."""

    def __init__(self, cfg: Config, model: Data2VecBase) -> None:
        self.cfg = cfg
        self.model = model  # the unwrapped module: masks need its shapes, the EMA its parameters
        self.clones = model.clones if isinstance(model, Data2Vec2Model) else 1
        self._layerdrop_gen: torch.Generator | None = None
        self._last_decay = float("nan")
        averaged, copied = model.teacher_pairs()
        self._averaged = ([t for t, _ in averaged], [s for _, s in averaged])
        self._copied = ([t for t, _ in copied], [s for _, s in copied])

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        audio = audio_inputs(batch, self.model.encoder.feature_encoder, device)
        gen = seeding.mask_generator(self.cfg.train.seed, step, rank, micro, device)
        rows = audio.source.shape[0] * self.clones
        lengths = audio.lengths.repeat_interleave(self.clones)  # (B * M,)
        if "mask_time_indices" in batch:
            mask = to_device(np.asarray(batch["mask_time_indices"], dtype=bool), device)  # (B * M, T)
            mask = mask & (torch.arange(audio.frames, device=device).unsqueeze(0) < lengths.unsqueeze(1))
        else:
            mask = self.model.sample_masks(rows, audio.frames, lengths, gen)
        inputs: dict[str, Any] = {
            "source": audio.source, "padding_mask": audio.padding_mask, "mask_time_indices": mask, "generator": gen,
            "per_row": LANGUAGES in batch,
        }
        if isinstance(self.model, Data2Vec2Model):
            inputs["num_kept"] = num_kept_frames(self._host_lengths(batch, audio.frames), self.model.mask_prob)
        return Prepared(inputs=inputs, count=mask.sum(), num_samples=audio.num_samples)

    def _host_lengths(self, batch: Mapping[str, np.ndarray], frames: int) -> list[int]:
        """Valid frames per row, from the host batch (no device read)."""
        pad = batch.get("padding_mask")
        rows = batch["source"].shape[0]
        if pad is None or not pad.any():
            return [frames] * rows
        samples = torch.from_numpy((~pad.astype(bool)).sum(axis=1).astype(np.int64))
        return self.model.encoder.feature_encoder.output_lengths(samples).clamp(max=frames).tolist()

    def begin_update(self, module: torch.nn.Module, step: int) -> None:
        self._layerdrop_gen = seeding.layerdrop_generator(self.cfg.train.seed, step)

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        inp = prepared.inputs
        extra = {"num_kept": inp["num_kept"]} if "num_kept" in inp else {}
        out = model(
            inp["source"], inp["padding_mask"], mask_time_indices=inp["mask_time_indices"],
            generator=inp["generator"], layerdrop_generator=self._layerdrop_gen, **extra,
        )
        metrics: dict[str, torch.Tensor] = {
            "d2v/loss_sum": out.loss_sum.detach().float(),
            "d2v/num_masked": out.num_masked.float(),
            "d2v/target_std": out.target_std.float(),
            "d2v/prediction_std": out.prediction_std.float(),
        }
        return StepOutput(loss_sum=out.loss_sum, count=out.num_masked, metrics=metrics, **self.row_losses_of(out, inp))

    def row_losses_of(self, out: RegressionOutput, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Each utterance's regression loss sum and masked frames (``row_loss``, ``row_count``
        and the part ``regression``) on a multilingual batch; nothing otherwise. The clones of
        an utterance (rows ``b * M .. b * M + M - 1``) add up into it."""
        if not inputs.get("per_row"):
            return {}
        mask = out.mask_time_indices
        row_loss = out.row_loss_sum.float().view(-1, self.clones).sum(dim=1)  # (B,)
        row_count = mask.view(-1, self.clones, mask.shape[-1]).float().sum(dim=(1, 2))  # (B,)
        return {"row_loss": row_loss, "row_count": row_count, "row_parts": {"regression": (row_loss, row_count)}}

    def end_update(self, eng: Engine, step: int, skipped: torch.Tensor) -> None:
        """After the optimizer step of update ``step`` (0-based): the teacher's EMA step with
        the decay of update ``step + 1``; nothing moves when ``skipped`` (0-dim, 1.0) is set."""
        decay = self.model.ema_decay(step + 1)
        self._last_decay = decay
        if decay < 1.0:  # a decay of 1 freezes the teacher: nothing to compute
            ema_update_(local_tensors(self._averaged[0]), local_tensors(self._averaged[1]), decay, skipped)
        ema_update_(local_tensors(self._copied[0]), local_tensors(self._copied[1]), 0.0, skipped)

    def health(self) -> Health:
        d = self.cfg.model.data2vec
        return Health(
            loss_key="loss/regression", chance=None, chance_text="", hint="",
            collapse_keys=(), collapse_hint="",
            floors=(("std/target", d.min_target_std), ("std/prediction", d.min_prediction_std)),
            floor_hint="the representations collapsed to a constant: the teacher follows the student too "
                       "closely (raise model.data2vec.ema_decay) or the learning rate is too high",
        )

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums.get("d2v/num_masked", 0.0)
        micro = sums.get("num_micro", 0.0)
        return {
            "loss/regression": ratio(sums.get("d2v/loss_sum", 0.0), n),
            "std/target": ratio(sums.get("d2v/target_std", 0.0), micro),
            "std/prediction": ratio(sums.get("d2v/prediction_std", 0.0), micro),
            "ema_decay": self._last_decay,
        }
