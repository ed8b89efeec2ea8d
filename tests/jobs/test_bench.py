"""``python -m jobs.bench``: the subcommand registry and a tiny model-step run."""

from __future__ import annotations

import json

import pytest

from jobs import bench


def test_usage_and_unknown_subcommand(capsys):
    assert bench.main([]) == 2
    assert "model-step" in capsys.readouterr().out
    assert bench.main(["no-such-bench"]) == 2
    assert "valid: " in capsys.readouterr().err


def test_model_step_tiny_reports_both_models(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    rc = bench.main(["model-step", "--preset", "tiny", "--batch", "2", "--seconds", "0.5",
                     "--warmup", "1", "--repeats", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ratio ours/theirs" in text
    results = json.loads(out.read_text())
    assert results["ours"]["samples_per_s"] > 0 and results["transformers"]["samples_per_s"] > 0
    assert results["ours"]["audio_s_per_s"] == pytest.approx(results["ours"]["samples_per_s"] * 0.5)
