"""The config tree: presets, YAML deltas, overrides, errors before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config as C

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_presets_round_trip(name: str) -> None:
    cfg = C.preset_config(name)
    assert cfg.preset == name
    assert C.from_dict(C.to_dict(cfg)) == cfg
    flat = C.to_flat_dict(cfg)
    # every flat key is itself a valid override that reproduces the config
    assert C.apply_overrides(cfg, flat) == cfg


def test_overrides_from_strings_and_mappings_agree() -> None:
    base = C.preset_config("tiny")
    a = C.apply_overrides(base, ["model.mask.prob=0.5", "model.quantizer.temperature.end=0.1", "data.batch_mode=pad"])
    b = C.apply_overrides(base, {"model.mask.prob": 0.5, "model": {"quantizer": {"temperature": {"end": 0.1}}},
                                 "data.batch_mode": "pad"})
    assert a == b
    assert a.model.mask.prob == 0.5 and a.model.quantizer.temperature.end == 0.1
    assert base.model.mask.prob == 0.65, "overrides must not mutate their input"


def test_int_widens_to_float_but_not_back() -> None:
    cfg = C.apply_overrides(C.tiny(), ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float)
    with pytest.raises(C.ConfigError, match=r"model\.mask\.length: expected an integer, got float 2\.5"):
        C.apply_overrides(cfg, ["model.mask.length=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mask.prb=0.5", r"unknown config key 'model\.mask\.prb'.*valid keys.*length, min_masks, prob"),
        ("modle.mask.prob=0.5", r"unknown config key 'modle'.*valid keys in the top level are:.*model"),
        ("model.mask.prob=abc", r"model\.mask\.prob: expected a number, got str 'abc'"),
        ("train.precision=fp16", r"train\.precision: expected one of \['auto', 'fp32', 'bf16'\], got 'fp16'"),
        ("model.mask.prob=1.5", r"model\.mask\.prob: expected in \[0, 1\], got 1\.5"),
        ("model.transformer.num_heads=5", r"model\.transformer\.dim \(64\) must be divisible"),
        ("train.compile=yes please", r"train\.compile: expected true or false"),
        ("model.mask.prob.x=1", r"model\.mask\.prob is a value, not a section"),
        ("model.mask", r"expected the form a\.b\.c=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(C.ConfigError, match=message):
        C.apply_overrides(C.tiny(), [override])


def test_yaml_holds_preset_plus_deltas(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\nmodel:\n  mask:\n    length: 5\ntrain:\n  max_steps: 7\n")
    cfg = C.load_config(f, ["train.max_steps=9"])
    assert cfg.preset == "tiny"
    assert cfg.model.mask.length == 5
    assert cfg.train.max_steps == 9, "command-line overrides win over the file"
    assert cfg.model.transformer.dim == C.tiny().model.transformer.dim


def test_yaml_errors_name_the_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("preset: tiny\ndata:\n  max_sampel_size: 3\n")
    with pytest.raises(C.ConfigError, match=r"unknown config key 'data\.max_sampel_size'.*bad\.yaml"):
        C.load_config(f)
    f.write_text("preset: huge\n")
    with pytest.raises(C.ConfigError, match=r"unknown preset 'huge'; valid presets are: tiny, base"):
        C.load_config(f)
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(tmp_path / "missing.yaml")


def test_saved_config_reloads(tmp_path: Path) -> None:
    cfg = C.apply_overrides(C.large(), ["model.mask.prob=0.3"])
    C.save_config(cfg, tmp_path / "config.yaml")
    assert C.load_config(tmp_path / "config.yaml") == cfg


def test_every_shipped_yaml_loads() -> None:
    files = sorted((ROOT / "jobs" / "configs").rglob("*.yaml"))
    for f in files:
        if f.parent.name == "sweep":
            continue  # sweep files are checked by the sweep tests
        C.load_config(f)


@pytest.mark.parametrize(("overrides", "message"), [
    (["schedule.end_lr=0.01"], r"schedule\.end_lr \(0\.01\) must be <= optim\.lr \(0\.002\)"),
    (["schedule.kind=tri_stage", "schedule.hold_ratio=0.6", "schedule.decay_ratio=0.5"],
     r"schedule\.hold_ratio \+ schedule\.decay_ratio must be <= 1, got 0\.6 \+ 0\.5"),
    (["schedule.kind=tri_stage", "schedule.final_lr_scale=0"], r"schedule\.final_lr_scale: expected in \(0, 1\], got 0"),
    (["finetune.freeze_encoder_steps=-1"], r"finetune\.freeze_encoder_steps: expected >= 0, got -1"),
])
def test_cross_field_checks_run_when_the_config_is_built(overrides: list[str], message: str) -> None:
    # These held only inside a training worker before; now no config with them can exist.
    with pytest.raises(C.ConfigError, match=message):
        C.apply_overrides(C.tiny(), overrides)


def test_fine_tuning_settings_are_one_section_and_old_configs_still_load(tmp_path: Path) -> None:
    cfg = C.apply_overrides(C.tiny(), ["finetune.vocab=abc", "finetune.freeze_encoder_steps=5"])
    assert (cfg.finetune.vocab, cfg.finetune.freeze_encoder_steps) == ("abc", 5)
    assert not hasattr(cfg.train, "ctc_vocab") and not hasattr(cfg.train, "freeze_encoder_steps")
    # A config saved by a checkpoint before the move names the old keys.
    old = C.to_dict(C.tiny())
    old["train"].update(ctc_vocab="xyz", freeze_encoder_steps=7)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.warns(UserWarning, match="'train.ctc_vocab' is now 'finetune.vocab'"):
        loaded = C.load_config(tmp_path / "config.yaml")
    assert (loaded.finetune.vocab, loaded.finetune.freeze_encoder_steps) == ("xyz", 7)


def test_the_laptop_preset_is_the_tiny_model_that_learns() -> None:
    laptop, tiny = C.laptop(), C.tiny()
    assert laptop.model.transformer == tiny.model.transformer and laptop.model.encoder.conv_layers == tiny.model.encoder.conv_layers
    assert laptop.model.encoder.mode == "layer_norm" and laptop.data.normalize
    assert laptop.model.loss.feature_penalty_weight == 0.0 and laptop.model.quantizer.temperature.decay == 0.999
    demo = C.load_config(ROOT / "jobs" / "configs" / "pretrain" / "laptop.yaml")
    assert demo.preset == "laptop" and demo.model == laptop.model
