"""model.safetensors of a wavray checkpoint, and initialising a model from another's weights."""

from __future__ import annotations

import pytest
import torch

from models.checkpoint import clean_state_dict, load_pretrained_into, load_weights, save_weights
from models.factory import build_ctc_model, build_pretraining_model
from models.hf import save_hf_pretraining


def test_weights_round_trip_atomically(small_config, tmp_path):
    model = build_pretraining_model(small_config("default"))
    model.set_num_updates(123)
    path = save_weights(model, tmp_path / "ckpt")
    assert path.name == "model.safetensors"
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["model.safetensors"]  # no temporary left
    state = load_weights(tmp_path / "ckpt")
    assert set(state) == set(model.state_dict())
    fresh = build_pretraining_model(small_config("default"))
    fresh.load_state_dict(state, strict=True)
    assert float(fresh.quantizer.temperature) == float(model.quantizer.temperature)


def test_wrapper_prefixes_are_stripped(tmp_path):
    state = {"module._orig_mod.final_proj.weight": torch.ones(2), "_orig_mod.x": torch.zeros(1)}
    assert set(clean_state_dict(state)) == {"final_proj.weight", "x"}
    save_weights(state, tmp_path / "w.safetensors")
    assert set(load_weights(tmp_path / "w.safetensors")) == {"final_proj.weight", "x"}


def test_unreadable_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_weights(tmp_path)


def test_init_from_wavray_checkpoint_and_hf_dir(small_config, tmp_path):
    cfg = small_config("default")
    pre = build_pretraining_model(cfg)
    save_weights(pre, tmp_path / "ckpt")
    save_hf_pretraining(pre, cfg, tmp_path / "hf")

    ctc = build_ctc_model(cfg, vocab_size=5)
    head_before = ctc.head.weight.clone()
    with pytest.warns(UserWarning, match="kept the initialisation"):
        left = load_pretrained_into(ctc, tmp_path / "ckpt")
    assert left == ["head.bias", "head.weight"]
    assert torch.equal(ctc.head.weight, head_before)
    for name, value in pre.encoder.state_dict().items():
        assert torch.equal(ctc.encoder.state_dict()[name], value), name

    other = build_pretraining_model(cfg)
    with pytest.warns(UserWarning, match="quantizer.temperature"):
        # HF has no temperature buffer: the model keeps its own schedule state
        assert load_pretrained_into(other, tmp_path / "hf") == ["quantizer.temperature"]
    for name, value in pre.state_dict().items():
        if name != "quantizer.temperature":
            assert torch.equal(other.state_dict()[name], value), name

    wider = small_config("default")
    wider.transformer.dim, wider.transformer.num_heads = 64, 4
    with pytest.raises(ValueError, match="shape"):
        load_pretrained_into(build_pretraining_model(wider), tmp_path / "ckpt")
