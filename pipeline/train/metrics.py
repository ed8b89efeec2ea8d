"""Metrics accumulated on the device and reduced once per log interval.

Inside a step nothing is read back to the host: every metric is a 0-dim tensor *sum*
added into one device vector. Every ``train.log_every`` updates the vector is summed
across ranks with one all-reduce and read with one host sync; the task step and the
loop then turn sums into means (loss per masked frame, accuracy, perplexity, ...).

Health alarms (SPEC.md, "Chance level"): after warm-up, a contrastive loss within
``train.chance_margin`` nats of ln(K + 1), or a code/prob perplexity below
``train.min_perplexity``, is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class MetricWindow:
    """Sums of named 0-dim tensors over micro-batches and updates, on the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._acc: torch.Tensor | None = None  # (M,) float64 on CPU, float32 on GPU

    def _dtype(self) -> torch.dtype:
        # float64 keeps long CPU sums exact; some GPU collectives lack float64.
        return torch.float64 if self.device.type == "cpu" else torch.float32

    def add(self, values: Mapping[str, torch.Tensor | float]) -> None:
        """Add each value into its running sum (new names extend the vector)."""
        new = [k for k in values if k not in self._index]
        if new:
            for k in new:
                self._index[k] = len(self.names)
                self.names.append(k)
            grown = torch.zeros(len(self.names), dtype=self._dtype(), device=self.device)
            if self._acc is not None:
                grown[: self._acc.numel()] = self._acc
            self._acc = grown
        assert self._acc is not None
        idx = torch.tensor([self._index[k] for k in values], device=self.device)
        vals = torch.stack([
            v.detach().to(self._dtype()).reshape(()) if torch.is_tensor(v)
            else torch.tensor(float(v), dtype=self._dtype(), device=self.device)
            for v in values.values()
        ])
        self._acc.index_add_(0, idx, vals)

    def reduce(self, *, all_ranks: bool = True) -> tuple[dict[str, float], dict[str, float]]:
        """(sums over all ranks, this rank's sums); resets the window. One host sync."""
        if self._acc is None:
            return {}, {}
        local = self._acc
        if all_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = local.clone()
            dist.all_reduce(total)
            both = torch.cat([total, local]).tolist()
        else:
            both = torch.cat([local, local]).tolist()
        n = len(self.names)
        out_global = dict(zip(self.names, both[:n], strict=True))
        out_local = dict(zip(self.names, both[n:], strict=True))
        self._acc = torch.zeros_like(local)
        return out_global, out_local


def ratio(num: float, den: float) -> float:
    """``num / den``, NaN when nothing was counted."""
    return num / den if den else float("nan")


@dataclass
class Alarm:
    """A health problem: a short key (MLflow tag) and a sentence for the log."""

    key: str
    message: str


@dataclass
class AlarmState:
    """Which alarms have fired (each is logged once per run, the tag is kept)."""

    fired: set[str] = field(default_factory=set)


def check_health(
    metrics: Mapping[str, float],
    *,
    step: int,
    warmup_steps: int,
    num_negatives: int,
    chance_margin: float,
    min_perplexity: float,
) -> list[Alarm]:
    """Alarms for a run at chance level or with a collapsed codebook (after warm-up only)."""
    if step <= warmup_steps:
        return []
    alarms: list[Alarm] = []
    chance = math.log(num_negatives + 1)
    contrastive = metrics.get("loss/contrastive")
    if contrastive is not None and math.isfinite(contrastive) and abs(contrastive - chance) <= chance_margin:
        alarms.append(Alarm(
            "alarm_chance_level",
            f"contrastive loss {contrastive:.4f} nats per masked frame is within {chance_margin} of "
            f"chance ln({num_negatives}+1) = {chance:.4f} at step {step}: the model is not learning "
            "(check masking, the learning rate and the quantizer temperature)",
        ))
    for key, value in metrics.items():
        if ("perplexity/code" in key or "perplexity/prob" in key) and math.isfinite(value) and value < min_perplexity:
            alarms.append(Alarm(
                "alarm_codebook_collapse",
                f"{key} = {value:.3f} < {min_perplexity} at step {step}: the quantizer collapsed onto "
                "a few codewords (raise the diversity weight or the Gumbel temperature)",
            ))
            break
    return alarms
