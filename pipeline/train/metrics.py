"""Metrics accumulated on the device and reduced once per log interval.

Inside a step nothing is read back to the host: every metric is a 0-dim tensor *sum*
added into one device vector. Every ``train.log_every`` updates the vector is summed
across ranks with one all-reduce and read with one host sync; the task step and the
loop then turn sums into means (loss per masked frame, accuracy, perplexity, ...).

Health alarms (SPEC.md, "Chance level"): after warm-up, a contrastive loss within
``train.chance_margin`` nats of ln(K + 1), or a code/prob perplexity below
``train.min_perplexity`` (or a share of frames on one codeword above an objective's
ceiling), is flagged. An objective without a chance level (regression:
data2vec) names floors instead: metrics whose values below them mean collapse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class MetricWindow:
    """Sums of named values over micro-batches and updates.

    Tensor values are summed on their device (no copy to or from the host inside a step:
    even a small host-to-device copy from pageable memory waits for the stream); plain
    numbers are summed on the host. :meth:`reduce` joins both once per log interval.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._dev: dict[str, torch.Tensor] = {}
        self._host: dict[str, float] = {}

    def _dtype(self) -> torch.dtype:
        # float64 keeps long CPU sums exact; some GPU collectives lack float64.
        return torch.float64 if self.device.type == "cpu" else torch.float32

    @property
    def names(self) -> list[str]:
        return [*self._dev, *self._host]

    def add(self, values: Mapping[str, torch.Tensor | float]) -> None:
        """Add each value into its running sum."""
        for key, value in values.items():
            if torch.is_tensor(value):
                v = value.detach().reshape(()).to(self._dtype())
                self._dev[key] = self._dev[key] + v if key in self._dev else v
                if key in self._host:  # a name seen as a host number first: keep one sum
                    self._dev[key] = self._dev[key] + self._host.pop(key)
            elif key in self._dev:
                self._dev[key] = self._dev[key] + float(value)
            else:
                self._host[key] = self._host.get(key, 0.0) + float(value)

    def reduce(self, *, all_ranks: bool = True) -> tuple[dict[str, float], dict[str, float]]:
        """(sums over all ranks, this rank's sums); empties the window.

        One all-reduce and one host sync. Names are sorted, so ranks that added the same
        names in another order still line up in the collective.
        """
        names = sorted({*self._dev, *self._host})
        if not names:
            return {}, {}
        zero = torch.zeros((), dtype=self._dtype(), device=self.device)
        dev = torch.stack([self._dev[k].to(self.device) if k in self._dev else zero for k in names])  # (M,)
        host = torch.tensor([self._host.get(k, 0.0) for k in names], dtype=self._dtype())  # (M,)
        local = dev + host.to(self.device)
        if all_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = local.clone()
            dist.all_reduce(total)
            both = torch.cat([total, local]).tolist()
        else:
            both = torch.cat([local, local]).tolist()
        n = len(names)
        self._dev.clear()
        self._host.clear()
        return dict(zip(names, both[:n], strict=True)), dict(zip(names, both[n:], strict=True))


def language_metric_name(language: str) -> str:
    """A language code as part of an MLflow metric name (``loss/lang/<code>``); "" (no
    language named) is ``none``, characters MLflow refuses in a name become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", language) if language else "none"


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
    """Which alarms are raised, and since which step.

    An alarm is logged and tagged once when it starts to hold; when a later log interval
    no longer shows it (a run that sat at chance during warm-up and then learned), it is
    reported once more as cleared, so the run's tag does not keep calling a healthy run
    broken.
    """

    fired: dict[str, int] = field(default_factory=dict)

    def update(self, alarms: list[Alarm], step: int) -> tuple[list[Alarm], list[Alarm]]:
        """(newly raised, newly cleared) alarms after the log at ``step``."""
        active = {a.key for a in alarms}
        raised = [a for a in alarms if a.key not in self.fired]
        for a in raised:
            self.fired[a.key] = step
        cleared = [
            Alarm(key, f"cleared at step {step} (raised at step {since})")
            for key, since in self.fired.items() if key not in active
        ]
        for a in cleared:
            del self.fired[a.key]
        return raised, cleared


@dataclass(frozen=True)
class Health:
    """What an objective's health alarms watch (each pretraining step says, ``health()``)."""

    loss_key: str
    """The metric that sits at ``chance`` when the model learns nothing."""
    chance: float | None
    """Its value at chance, nats per counted unit; None: the objective has none (regression)."""
    chance_text: str
    """How the chance level is computed, for the message (``ln(K+1)``)."""
    hint: str
    """What to check when the run sits at chance."""
    collapse_keys: tuple[str, ...]
    """Prefixes of perplexity metrics whose values near 1 mean the targets collapsed."""
    collapse_hint: str
    """What to do about a collapse."""
    floors: tuple[tuple[str, float], ...] = ()
    """(metric, floor): a value below its floor means the representations collapsed
    (data2vec's target and prediction stds)."""
    floor_hint: str = ""
    """What to do when a floor is crossed."""
    ceilings: tuple[tuple[str, float], ...] = ()
    """(metric prefix, ceiling): a value above its ceiling means the targets collapsed, as a
    perplexity below ``min_perplexity`` does (vq-wav2vec's share of frames on one codeword);
    raised as that alarm, with ``collapse_hint``."""


def contrastive_health(num_negatives: int) -> Health:
    """wav2vec 2.0's: InfoNCE over K distractors sits at ln(K + 1); its codebook can collapse."""
    return Health(
        loss_key="loss/contrastive", chance=math.log(num_negatives + 1), chance_text=f"ln({num_negatives}+1)",
        hint="check masking, the learning rate and the quantizer temperature",
        collapse_keys=("perplexity/code", "perplexity/prob"),
        collapse_hint="the quantizer collapsed onto a few codewords (raise the diversity weight or the Gumbel "
                      "temperature)",
    )


def check_health(
    metrics: Mapping[str, float],
    *,
    step: int,
    warmup_steps: int,
    chance_margin: float,
    min_perplexity: float,
    num_negatives: int | None = None,
    health: Health | None = None,
) -> list[Alarm]:
    """Alarms for a run at chance level or with collapsed targets (after warm-up only).

    ``health`` says what to watch; ``num_negatives`` alone means wav2vec 2.0's
    (:func:`contrastive_health`).
    """
    if health is None:
        if num_negatives is None:
            raise ValueError("check_health: give the objective's health or wav2vec 2.0's num_negatives")
        health = contrastive_health(num_negatives)
    if step <= warmup_steps:
        return []
    alarms: list[Alarm] = []
    value = metrics.get(health.loss_key)
    if health.chance is not None and value is not None and math.isfinite(value) and \
            abs(value - health.chance) <= chance_margin:
        alarms.append(Alarm(
            "alarm_chance_level",
            f"{health.loss_key} {value:.4f} nats is within {chance_margin} of chance {health.chance_text} = "
            f"{health.chance:.4f} at step {step}: the model is not learning ({health.hint})",
        ))
    for key, ppl in metrics.items():
        if key.startswith(health.collapse_keys) and math.isfinite(ppl) and ppl < min_perplexity:
            alarms.append(Alarm(
                "alarm_codebook_collapse", f"{key} = {ppl:.3f} < {min_perplexity} at step {step}: {health.collapse_hint}",
            ))
            break
    over = [(key, value, ceiling) for prefix, ceiling in health.ceilings for key, value in metrics.items()
            if key.startswith(prefix) and math.isfinite(value) and value > ceiling]
    if over and not any(a.key == "alarm_codebook_collapse" for a in alarms):  # one collapse alarm, whichever saw it
        key, value, ceiling = over[0]
        alarms.append(Alarm(
            "alarm_codebook_collapse", f"{key} = {value:.3f} > {ceiling} at step {step}: {health.collapse_hint}",
        ))
    for key, floor in health.floors:
        value = metrics.get(key)
        if value is not None and math.isfinite(value) and value < floor:
            alarms.append(Alarm(
                "alarm_representation_collapse", f"{key} = {value:.4f} < {floor} at step {step}: {health.floor_hint}",
            ))
            break
    return alarms
