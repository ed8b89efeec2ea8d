"""The shipped pretraining configs load, hold deltas only, and say what SPEC.md says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.pretrain import main
from pipeline import config as C

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "pretrain"


@pytest.mark.parametrize("name", ["tiny", "laptop", "base", "large", "large_lv60k", "best_rq", "best_rq_laptop",
                                  "hubert", "hubert_it2", "hubert_laptop", "hubert_laptop_it2", "wavlm",
                                  "wavlm_laptop", "data2vec", "data2vec_laptop", "data2vec2",
                                  "data2vec2_laptop", "wav2vec_laptop", "vq_wav2vec_laptop", "apc_laptop",
                                  "tera_laptop", "w2v_bert_laptop", "just_laptop"])
def test_config_loads_and_names_its_preset(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    name = name.removesuffix("_it2")  # the second iteration of a preset
    assert raw["preset"] == name
    cfg = C.load_config(path)
    assert cfg.preset == name
    # Deltas only: every value the file sets differs from the preset's.
    preset = C.to_flat_dict(C.preset_config(name))
    flat: dict = {}
    _flatten("", {k: v for k, v in raw.items() if k != "preset"}, flat)
    assert flat, "a config with no deltas is the preset itself"
    for key, value in flat.items():
        assert value != preset[key], f"{path.name}: {key} repeats the preset's value {value!r}"


def _flatten(prefix: str, value: object, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def test_spec_scale() -> None:
    base, large, lv = (C.load_config(CONFIGS / f"{n}.yaml") for n in ("base", "large", "large_lv60k"))
    assert base.scaling.num_workers == 64 and base.scaling.use_gpu and base.optim.lr == 5e-4
    assert base.train.max_steps == 400_000 and base.schedule.warmup_steps == 32_000
    assert large.scaling.num_workers == lv.scaling.num_workers == 128 and large.optim.lr == 3e-4
    assert lv.model.quantizer.temperature.end == 0.1 and lv.model.loss.feature_penalty_weight == 0.0
    tiny = C.load_config(CONFIGS / "tiny.yaml")
    assert tiny.scaling.num_workers == 2 and tiny.scaling.cpus_per_worker == 0.5 and tiny.deepspeed.zero_stage == 2


def test_bad_override_fails_before_any_work(capsys) -> None:
    assert main(["--config", str(CONFIGS / "tiny.yaml"), "train.max_stepz=3"]) == 2
    assert "unknown config key 'train.max_stepz'" in capsys.readouterr().err


def test_bad_schedule_fails_in_under_a_second_before_any_work(capsys) -> None:
    import time

    start = time.perf_counter()
    assert main(["--config", str(CONFIGS / "laptop.yaml"), "schedule.end_lr=0.5"]) == 2
    assert time.perf_counter() - start < 1.0, "checked by the config, not by a training worker"
    assert "schedule.end_lr (0.5) must be <= optim.lr (0.001)" in capsys.readouterr().err


def test_hubert_recipes() -> None:
    """FAMILY.md section 1: BASE iteration 1 on 100 MFCC clusters, iteration 2 on 500 of layer 6;
    WavLM adds the gated bias and mixing; the laptop iterations label what the model can align."""
    it1, it2, wavlm = (C.load_config(CONFIGS / f"{n}.yaml") for n in ("hubert", "hubert_it2", "wavlm"))
    assert it1.model.objective == "hubert" and it1.model.hubert.clusters == 100 and it1.label.features == "mfcc"
    assert it1.model.mask.prob == 0.8 and it1.model.mask.length == 10 and it1.model.loss.feature_penalty_weight == 10
    assert it1.train.max_steps == 250_000 and it2.train.max_steps == 400_000
    assert it2.model.hubert.clusters == 500 and it2.label.features == "model" and it2.label.layer == 6
    assert it2.label.teacher.endswith(it1.checkpoint.run_name)
    assert wavlm.model.transformer.relative_bias == "gated" and wavlm.model.mixing.prob == 0.2
    lap2 = C.load_config(CONFIGS / "hubert_laptop_it2.yaml")
    assert lap2.label.layer < lap2.model.transformer.num_layers + 1 and lap2.model.hubert.clusters == 500
