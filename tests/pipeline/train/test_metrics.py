"""Health alarms and the device-side metric window."""

from __future__ import annotations

import math

import torch

from pipeline.train.metrics import AlarmState, MetricWindow, check_health


def _check(metrics: dict[str, float], step: int = 100):
    return check_health(metrics, step=step, warmup_steps=10, num_negatives=100, chance_margin=0.05,
                        min_perplexity=2.0)


def test_chance_level_alarm_only_after_warmup() -> None:
    at_chance = {"loss/contrastive": math.log(101) - 0.01, "perplexity/code_0": 200.0}
    assert [a.key for a in _check(at_chance)] == ["alarm_chance_level"]
    assert "ln(100+1) = 4.6151" in _check(at_chance)[0].message
    assert _check(at_chance, step=5) == []
    assert _check({"loss/contrastive": math.log(101) - 0.5}) == []


def test_codebook_collapse_alarm() -> None:
    alarms = _check({"loss/contrastive": 2.0, "perplexity/code_0": 150.0, "perplexity/prob_1": 1.2})
    assert [a.key for a in alarms] == ["alarm_codebook_collapse"]
    assert "perplexity/prob_1 = 1.200" in alarms[0].message
    assert _check({"perplexity/code_0": float("nan")}) == []


def test_an_alarm_is_reported_when_raised_and_when_cleared_once_each() -> None:
    state = AlarmState()
    at_chance = {"loss/contrastive": math.log(101), "perplexity/code_0": 200.0}
    learning = {"loss/contrastive": 3.0, "perplexity/code_0": 200.0}
    raised, cleared = state.update(_check(at_chance, step=20), 20)
    assert [a.key for a in raised] == ["alarm_chance_level"] and cleared == []
    assert state.update(_check(at_chance, step=30), 30) == ([], [])
    raised, cleared = state.update(_check(learning, step=40), 40)
    assert raised == [] and [(a.key, a.message) for a in cleared] == [
        ("alarm_chance_level", "cleared at step 40 (raised at step 20)")]
    assert state.update(_check(learning, step=50), 50) == ([], [])
    assert [a.key for a in state.update(_check(at_chance, step=60), 60)[0]] == ["alarm_chance_level"]


def test_window_sums_device_and_host_values_and_resets() -> None:
    w = MetricWindow(torch.device("cpu"))
    w.add({"a": torch.tensor(1.5), "b": 2.0})
    w.add({"a": torch.tensor(0.5), "c": torch.tensor(3.0), "b": torch.tensor(1.0)})
    total, local = w.reduce()
    assert total == {"a": 2.0, "b": 3.0, "c": 3.0} == local
    assert list(total) == ["a", "b", "c"], "sorted: every rank lines up in the all-reduce"
    w.add({"b": 1.0})
    assert w.reduce()[0] == {"b": 1.0}
    assert w.reduce() == ({}, {})
