"""data2vec 1.0 against ``transformers``' Data2VecAudio (fp32, CPU), both ways.

Ours -> Hugging Face: the exported directory loads as ``Data2VecAudioModel`` with no
missing or unexpected weight, and its ``last_hidden_state`` equals our encoder's on a
padded batch within 1e-5 (every weight moved off its initial value first, so a
misplaced tensor shows). The teacher and the regression head are not in it.

Hugging Face -> ours: a ``Data2VecAudioModel`` directory (random weights) loads into a
data2vec model whose encoder computes what it computes, whose teacher starts as that
encoder and whose regression head is fresh; a ``Data2VecAudioForCTC`` one into our CTC
model. data2vec 2.0 (ALiBi, decoder) has no Hugging Face class: its export is refused by
name.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import config as M  # noqa: E402
from models.factory import build_ctc_model, build_pretraining_model  # noqa: E402
from models.hf import load_hf, read_hf_config, save_hf_ctc, save_hf_encoder  # noqa: E402

TOL = 1e-5


def _config() -> M.ModelConfig:
    cfg = M.data2vec_laptop()
    cfg.transformer.pos_conv_kernel = 4  # even: the trimmed last frame is covered too
    cfg.transformer.dropout = cfg.transformer.attention_dropout = cfg.transformer.activation_dropout = 0.0
    return cfg


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    source = torch.randn(2, 16000, generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 11000:] = True
    source[1, 11000:] = 0.0
    return source, pad


def _ours(encoder, source, pad) -> torch.Tensor:
    features, frame_pad, _ = encoder.extract_features(source, pad)
    x, _ = encoder.feature_projection(features)
    return encoder.transformer(x, frame_pad)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), f"{what}: max abs difference {err:.3g}"


def test_our_data2vec_exports_as_data2vec_audio_model(tmp_path) -> None:
    cfg = _config()
    torch.manual_seed(0)
    ours = build_pretraining_model(cfg).eval()
    _perturb(ours, 1)
    encoder = {k[len("encoder."):]: v for k, v in ours.state_dict().items() if k.startswith("encoder.")}
    out = save_hf_encoder(encoder, cfg, tmp_path / "hf")
    hf_cfg = read_hf_config(out)
    assert hf_cfg["model_type"] == "data2vec-audio" and hf_cfg["architectures"] == ["Data2VecAudioModel"]
    assert hf_cfg["num_conv_pos_embeddings"] == 3 and hf_cfg["conv_pos_kernel_size"] == 4
    hf, info = transformers.Data2VecAudioModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    source, pad = _batch()
    with torch.no_grad():
        got = hf(source, attention_mask=(~pad).long()).last_hidden_state
        want = _ours(ours.encoder, source, pad)
    valid = torch.ones_like(want[..., 0], dtype=torch.bool)
    valid[1, int(ours.encoder.feature_encoder.output_lengths(torch.tensor(11000))):] = False
    _close(got[valid], want[valid], "last_hidden_state (padded batch)")
    # The teacher and the regression head stay behind.
    names = set(hf.state_dict())
    assert not any("teacher" in n or "regression" in n for n in names)
    assert len(names) == len(encoder) + 4 * len(ours.encoder.transformer.layers)  # qkv weight, bias: 3 each


def test_a_data2vec_audio_directory_loads_into_our_data2vec_model(tmp_path) -> None:
    cfg = _config()
    hf_cfg = transformers.Data2VecAudioConfig(
        conv_dim=[32] * 7, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_conv_pos_embeddings=3, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, mask_time_prob=0.05,
    )
    torch.manual_seed(0)
    hf = transformers.Data2VecAudioModel(hf_cfg)
    _perturb(hf, 2)
    hf.eval().save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_cfg, ours = load_hf(tmp_path / "hf")
    assert any("freshly initialised" in str(w.message) for w in caught)
    assert model_cfg.objective == "data2vec" and model_cfg.transformer.pos_conv_depth == 3
    assert model_cfg.mask.prob == M.data2vec().mask.prob  # HF's fine-tuning mask is not a pretraining one
    ours.eval()
    source, pad = _batch()
    with torch.no_grad():
        _close(_ours(ours.encoder, source, pad)[0], hf(source, attention_mask=(~pad).long()).last_hidden_state[0],
               "last_hidden_state")
    for t, s in zip(ours.teacher.parameters(), ours.encoder.transformer.parameters(), strict=True):
        assert torch.equal(t, s), "the teacher starts as the imported encoder"
    # ... and it trains as any of ours.
    out = ours.train()(source, pad)
    assert torch.isfinite(out.loss_sum) and int(out.num_masked) > 0
    del cfg


def test_a_fine_tuned_data2vec_goes_to_data2vec_audio_for_ctc_and_back(tmp_path) -> None:
    cfg = _config()
    torch.manual_seed(0)
    ctc = build_ctc_model(cfg, vocab_size=7).eval()
    _perturb(ctc, 3)
    out = save_hf_ctc(ctc, cfg, tmp_path / "ctc")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Data2VecAudioForCTC"]
    hf, info = transformers.Data2VecAudioForCTC.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    source, pad = _batch()
    with torch.no_grad():
        _close(hf.eval()(source).logits, ctc(source).logits, "CTC logits")
    _, back = load_hf(out, task="ctc")
    for name, value in ctc.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_data2vec2_has_no_hugging_face_class(tmp_path) -> None:
    cfg = M.data2vec2_laptop()
    model = build_pretraining_model(cfg)
    encoder = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    with pytest.raises(ValueError, match="ALiBi"):
        save_hf_encoder(encoder, cfg, tmp_path / "no")
    wav2vec2_layout = M.data2vec_laptop()
    wav2vec2_layout.encoder.mode = "default"
    with pytest.raises(ValueError, match="LayerNorm after every conv"):
        save_hf_encoder({}, wav2vec2_layout, tmp_path / "no")
