"""Learning-rate schedules: warm-up, polynomial decay, tri-stage."""

from __future__ import annotations

import math

import pytest

from pipeline import config as C
from pipeline.train.schedule import lr_multiplier


def test_polynomial_warmup_then_linear_decay_to_end() -> None:
    cfg = C.ScheduleConfig(kind="polynomial", warmup_steps=10, end_lr=0.0, power=1.0)
    f = lr_multiplier(cfg, max_steps=110, peak_lr=1e-3)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == 0.0 and f(500) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_polynomial_power_and_end_lr() -> None:
    cfg = C.ScheduleConfig(kind="polynomial", warmup_steps=0, end_lr=1e-4, power=2.0)
    f = lr_multiplier(cfg, max_steps=100, peak_lr=1e-3)
    assert f(0) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.9 * 0.25 + 0.1)
    assert f(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"schedule.end_lr .* must be <= optim.lr"):
        lr_multiplier(C.ScheduleConfig(end_lr=1.0), max_steps=10, peak_lr=1e-3)


def test_tri_stage() -> None:
    cfg = C.ScheduleConfig(kind="tri_stage", warmup_steps=10, hold_ratio=0.4, decay_ratio=0.5, final_lr_scale=0.05)
    f = lr_multiplier(cfg, max_steps=100, peak_lr=1.0)
    assert f(0) == pytest.approx(0.05)
    assert f(10) == pytest.approx(1.0) and f(49) == pytest.approx(1.0)
    assert f(50) == pytest.approx(1.0)
    assert f(75) == pytest.approx(math.exp(math.log(0.05) * 25 / 50))
    assert f(100) == pytest.approx(0.05) and f(1000) == pytest.approx(0.05)
