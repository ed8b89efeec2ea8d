"""``python -m jobs.export`` end to end: wavray checkpoint <-> Hugging Face directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from jobs.export import main
from models.checkpoint import load_weights, save_weights
from models.factory import build_ctc_model, build_pretraining_model
from models.hf import pretraining_state_to_hf, read_hf_state_dict
from pipeline import config as C

transformers = pytest.importorskip("transformers")


def _write_checkpoint(path, cfg, model) -> None:
    save_weights(model, path)
    C.save_config(cfg, path / "config.yaml")


def test_checkpoint_to_hf_pretraining_and_ctc(tmp_path, capsys):
    cfg = C.tiny()
    model = build_pretraining_model(cfg.model)
    model.set_num_updates(5000)
    _write_checkpoint(tmp_path / "ckpt", cfg, model)
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "Wav2Vec2ForPreTraining" in capsys.readouterr().out
    hf, info = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = pretraining_state_to_hf(model.state_dict())
    for name, value in hf.state_dict().items():
        assert torch.equal(value, expected[name]), name

    ctc = build_ctc_model(cfg.model, vocab_size=30)
    _write_checkpoint(tmp_path / "ctc_ckpt", cfg, ctc)
    # a CTC checkpoint is refused as a pretraining export, and exports with --ctc
    assert main(["--checkpoint", str(tmp_path / "ctc_ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert "--ctc" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "ctc_ckpt" / "model.safetensors"), "--out", str(tmp_path / "hf_ctc"),
                 "--ctc"]) == 0
    hf_ctc, info = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf_ctc", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf_ctc.config.vocab_size == 30


def test_hf_to_checkpoint_and_back_is_lossless(tmp_path, capsys):
    tiny = C.tiny().model
    hf_cfg = transformers.Wav2Vec2Config(
        conv_dim=[c for c, _, _ in tiny.encoder.conv_layers], hidden_size=tiny.transformer.dim,
        num_hidden_layers=tiny.transformer.num_layers, num_attention_heads=tiny.transformer.num_heads,
        intermediate_size=tiny.transformer.ffn_dim, num_conv_pos_embeddings=tiny.transformer.pos_conv_kernel,
        num_conv_pos_embedding_groups=tiny.transformer.pos_conv_groups, num_codevectors_per_group=32,
        codevector_dim=32, proj_codevector_dim=32, mask_time_prob=0.65,
    )
    torch.manual_seed(0)
    transformers.Wav2Vec2ForPreTraining(hf_cfg).save_pretrained(tmp_path / "hf")

    assert main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert "preset 'tiny'" in capsys.readouterr().out
    cfg = C.load_config(tmp_path / "ckpt" / "config.yaml")  # a full resolved config loads like any YAML
    assert cfg.preset == "tiny"
    assert cfg.model.transformer.dim == tiny.transformer.dim
    assert cfg.model.transformer.dropout == hf_cfg.hidden_dropout  # the model section is the HF model's
    model = build_pretraining_model(cfg.model)
    model.load_state_dict(load_weights(tmp_path / "ckpt"), strict=True)

    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf2")]) == 0
    original, again = read_hf_state_dict(tmp_path / "hf"), read_hf_state_dict(tmp_path / "hf2")
    assert set(original) == set(again)
    for name, value in original.items():
        assert torch.equal(value, again[name]), name


def test_bad_paths_give_clear_errors(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    cfg = C.tiny()
    save_weights(build_pretraining_model(cfg.model), tmp_path / "no_config")
    assert main(["--checkpoint", str(tmp_path / "no_config"), "--out", str(tmp_path / "o")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    # weights that do not fit the config
    C.save_config(C.base(), tmp_path / "no_config" / "config.yaml")
    assert main(["--checkpoint", str(tmp_path / "no_config"), "--out", str(tmp_path / "o")]) == 2
    assert "do not match" in capsys.readouterr().err
    (tmp_path / "not_hf").mkdir()
    assert main(["--from-hf", str(tmp_path / "not_hf"), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_cli_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.export", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_export_and_import_work_without_transformers(tmp_path):
    """transformers is an extra (``wavray[bench]``): the conversion both ways is ours."""
    cfg = C.tiny()
    _write_checkpoint(tmp_path / "ckpt", cfg, build_pretraining_model(cfg.model))
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # any import of it fails\n"
        "from jobs.export import main\n"
        f"assert main(['--checkpoint', {str(tmp_path / 'ckpt')!r}, '--out', {str(tmp_path / 'hf')!r}]) == 0\n"
        f"assert main(['--from-hf', {str(tmp_path / 'hf')!r}, '--out', {str(tmp_path / 'back')!r}]) == 0\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(load_weights(tmp_path / "back")["final_proj.weight"],
                       load_weights(tmp_path / "ckpt")["final_proj.weight"])
