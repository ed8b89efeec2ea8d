"""Learning-rate schedules over optimizer updates.

Both are pure functions of the update number: the loop writes ``peak * f(step)`` into
the optimizer before every update, so a resumed run needs nothing but its step, and an
update that DeepSpeed or the finite check skips cannot shift the schedule.

- ``polynomial`` (pretraining, fairseq's ``polynomial_decay``): linear warm-up from 0 to
  the peak over ``warmup_steps``, then ``(peak - end) * (1 - progress) ** power + end``
  until ``train.max_steps``.
- ``noam`` (BEST-RQ, SpeechBrain's ``NoamScheduler``): linear warm-up to the peak over
  ``warmup_steps``, then ``peak * sqrt(warmup / step)``.
- ``cosine`` (wav2vec 1.0 and vq-wav2vec, fairseq's ``cosine`` with one period): linear
  warm-up to the peak over ``warmup_steps``, then ``end + (peak - end) * (1 + cos(pi *
  progress)) / 2`` until ``train.max_steps``.
- ``tri_stage`` (fine-tuning, fairseq's ``tri_stage``): linear warm-up from
  ``final_lr_scale * peak``, hold at the peak for ``hold_ratio`` of the run, exponential
  decay to ``final_lr_scale * peak`` over ``decay_ratio`` of the run, then constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.config import ScheduleConfig


def lr_multiplier(cfg: ScheduleConfig, max_steps: int, peak_lr: float) -> Callable[[int], float]:
    """Return ``f(step) -> lr / peak_lr`` for the configured schedule.

    ``step`` counts optimizer updates already taken (0 before the first update), so the
    first update runs at ``f(0)``: 0 for the polynomial schedule's warm-up, which is why
    the first update is a no-op there, as in fairseq.
    """
    if max_steps < 1:
        raise ValueError(f"train.max_steps: expected >= 1, got {max_steps}")
    if peak_lr <= 0:
        raise ValueError(f"optim.lr: expected > 0, got {peak_lr}")
    cfg.check_peak(peak_lr)  # the config's own check (a Config runs it when it is built)
    if cfg.kind == "polynomial":
        warmup = cfg.warmup_steps
        end_ratio = cfg.end_lr / peak_lr

        def poly(step: int) -> float:
            if warmup > 0 and step < warmup:
                return step / warmup
            if step >= max_steps:
                return end_ratio
            span = max(1, max_steps - warmup)
            progress = (step - warmup) / span
            return (1.0 - end_ratio) * (1.0 - progress) ** cfg.power + end_ratio

        return poly

    if cfg.kind == "cosine":
        warmup = cfg.warmup_steps
        end_ratio = cfg.end_lr / peak_lr

        def cosine(step: int) -> float:
            if warmup > 0 and step < warmup:
                return step / warmup
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return end_ratio + (1.0 - end_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return cosine

    if cfg.kind == "tri_stage":
        warmup = cfg.warmup_steps
        hold = int(cfg.hold_ratio * max_steps)
        decay = int(cfg.decay_ratio * max_steps)
        init_scale = cfg.final_lr_scale
        final_scale = cfg.final_lr_scale
        decay_rate = -math.log(final_scale) / decay if decay > 0 else 0.0

        def tri(step: int) -> float:
            if warmup > 0 and step < warmup:
                return init_scale + (1.0 - init_scale) * step / warmup
            step -= warmup
            if step < hold:
                return 1.0
            step -= hold
            if step <= decay:
                return math.exp(-decay_rate * step)
            return final_scale

        return tri

    if cfg.kind == "noam":
        warmup = cfg.warmup_steps

        def noam(step: int) -> float:
            # Linear to the peak at ``warmup``, then peak * sqrt(warmup / step).
            if step < warmup:
                return step / warmup
            return math.sqrt(warmup / step)

        return noam

    raise ValueError(f"schedule.kind: expected 'polynomial', 'cosine', 'tri_stage' or 'noam', got {cfg.kind!r}")

