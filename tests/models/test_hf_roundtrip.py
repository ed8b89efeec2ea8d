"""Hugging Face directories both ways: ours -> HF dir -> transformers, and transformers -> ours."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import config as model_presets  # noqa: E402
from models.factory import build_ctc_model, build_pretraining_model  # noqa: E402
from models.hf import (  # noqa: E402
    hf_to_model_config,
    load_hf,
    model_config_to_hf,
    pretraining_state_to_hf,
    read_hf_state_dict,
    save_hf_ctc,
    save_hf_pretraining,
)


def _input(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(2, 8000, generator=gen)
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 6000:] = True
    source[pad] = 0.0
    return source, pad


def _loading_info(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    return model, {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items()}


@pytest.mark.parametrize("mode", ["default", "layer_norm"])
def test_our_pretraining_dir_loads_in_transformers(small_config, tmp_path, mode):
    cfg = small_config(mode)
    ours = build_pretraining_model(cfg)
    ours.set_num_updates(1000)
    save_hf_pretraining(ours, cfg, tmp_path / "hf")

    hf, info = _loading_info(transformers.Wav2Vec2ForPreTraining, tmp_path / "hf")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and not info["mismatched_keys"], info
    expected = pretraining_state_to_hf(ours.state_dict())
    for name, value in hf.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    ctc, info = _loading_info(transformers.Wav2Vec2ForCTC, tmp_path / "hf")
    assert info["missing_keys"] == ["lm_head.bias", "lm_head.weight"], info
    assert all(k.startswith(("quantizer.", "project_q.", "project_hid.")) for k in info["unexpected_keys"]), info

    # the temperature and the settings HF has no field for travel in config.json
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["wavray"]["temperature"] == pytest.approx(float(ours.quantizer.temperature))
    cfg2, back = load_hf(tmp_path / "hf")
    assert cfg2 == cfg
    assert float(back.quantizer.temperature) == pytest.approx(float(ours.quantizer.temperature))
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_our_ctc_dir_loads_in_transformers_with_same_logits(small_config, tmp_path):
    cfg = small_config("layer_norm")
    ours = build_ctc_model(cfg, vocab_size=7).eval()
    save_hf_ctc(ours, cfg, tmp_path / "ctc", pad_token_id=0)
    hf, info = _loading_info(transformers.Wav2Vec2ForCTC, tmp_path / "ctc")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    hf.eval()
    source, pad = _input()
    with torch.no_grad():
        mine = ours(source, pad)
        theirs = hf(source, attention_mask=(~pad).long()).logits
    torch.testing.assert_close(mine.logits, theirs, rtol=1e-5, atol=1e-5)
    assert mine.output_lengths.tolist() == hf._get_feat_extract_output_lengths((~pad).sum(1)).tolist()


@pytest.mark.parametrize("mode", ["default", "layer_norm"])
def test_transformers_pretraining_dir_loads_into_ours(small_config, tmp_path, mode):
    cfg = small_config(mode)
    hf_cfg = transformers.Wav2Vec2Config.from_dict(model_config_to_hf(cfg))
    del hf_cfg.wavray  # a config written by transformers alone
    torch.manual_seed(5)
    transformers.Wav2Vec2ForPreTraining(hf_cfg).save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="fine-tuning values|pretraining uses"):
        loaded_cfg, ours = load_hf(tmp_path / "hf")
    assert loaded_cfg.transformer == cfg.transformer
    assert loaded_cfg.encoder.conv_layers == cfg.encoder.conv_layers
    assert loaded_cfg.encoder.mode == mode
    # without wavray extras the fairseq recipe of the extractor kind fills the gaps
    assert loaded_cfg.loss.feature_penalty_weight == (0.0 if mode == "layer_norm" else 10.0)
    hf_state = read_hf_state_dict(tmp_path / "hf")
    converted = pretraining_state_to_hf(ours.state_dict())
    assert set(converted) == set(hf_state)
    for name, value in hf_state.items():
        torch.testing.assert_close(converted[name], value, rtol=0, atol=0, msg=name)


def test_base_model_and_ctc_dirs_load_into_pretraining_with_fresh_heads(small_config, tmp_path):
    cfg = small_config("default")
    hf_cfg = transformers.Wav2Vec2Config.from_dict(model_config_to_hf(cfg, vocab_size=9))
    transformers.Wav2Vec2Model(hf_cfg).save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="freshly initialised"):
        _, model = load_hf(tmp_path / "base")
    source, pad = _input()
    model.eval()
    out = model(source, pad, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss_sum)

    hf_ctc = transformers.Wav2Vec2ForCTC(hf_cfg).eval()
    hf_ctc.save_pretrained(tmp_path / "ctc")
    with pytest.warns(UserWarning) as record:
        load_hf(tmp_path / "ctc")
    messages = " ".join(str(w.message) for w in record)
    assert "lm_head" in messages and "freshly initialised" in messages
    _, ctc = load_hf(tmp_path / "ctc", task="ctc")
    ctc.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ctc(source, pad).logits, hf_ctc(source, attention_mask=(~pad).long()).logits, rtol=1e-5, atol=1e-5
        )


def test_bin_weights_are_read_with_weights_only(small_config, tmp_path):
    cfg = small_config("default")
    ours = build_pretraining_model(cfg)
    save_hf_pretraining(ours, cfg, tmp_path / "hf")
    state = read_hf_state_dict(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    _, back = load_hf(tmp_path / "hf")
    torch.testing.assert_close(back.state_dict()["final_proj.weight"], ours.state_dict()["final_proj.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Evil()}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        read_hf_state_dict(tmp_path / "hf")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "relu"}, r"hidden_act: expected 'gelu', got 'relu'"),
        ({"model_type": "whisper"}, r"model_type: expected 'wav2vec2', got 'whisper'"),  # HuBERT and WavLM read since
        ({"layer_norm_eps": 1e-6}, r"layer_norm_eps"),
        ({"add_adapter": True}, r"add_adapter"),
        ({"feat_extract_norm": "batch"}, r"feat_extract_norm"),
    ],
)
def test_unrepresentable_hf_configs_are_refused(change, message):
    hf = model_config_to_hf(model_presets.tiny())
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        hf_to_model_config(hf)


@pytest.mark.parametrize("preset", ["tiny", "base", "large", "large_lv60k"])
def test_config_round_trip_is_lossless(preset):
    cfg = model_presets.PRESETS[preset]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf_to_model_config(model_config_to_hf(cfg)) == cfg


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(model_config_to_hf(model_presets.tiny())))
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_hf(tmp_path / "empty")
