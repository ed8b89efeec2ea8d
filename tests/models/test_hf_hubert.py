"""HuBERT and WavLM against ``transformers`` (fp32, CPU), both ways.

Ours -> Hugging Face: a HuBERT encoder (``HubertModel``), a HuBERT CTC model
(``HubertForCTC``) and a WavLM encoder with its gated relative position bias
(``WavLMModel``, ``WavLMForCTC``) are written with ``models.hf``, loaded with
``from_pretrained`` without missing or unexpected keys, and give the same hidden states
(every layer), the same masked states and the same CTC logits on a padded batch, within
1e-5. Hugging Face -> ours: models built by ``transformers`` with random weights, saved with
``save_pretrained``, read by ``load_hf`` into ours, agree the same way.

Every weight is moved off its initial value first (the WavLM gate's constant starts at 1
on both sides), so a misplaced tensor shows.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.config import HubertConfig  # noqa: E402
from models.factory import build_ctc_model, build_pretraining_model  # noqa: E402
from models.hf import load_hf, read_hf_config, save_hf_ctc, save_hf_encoder  # noqa: E402
from models.masking import compute_span_mask  # noqa: E402

TOL = 1e-5


def _config(small_config, mode: str, gated: bool):
    cfg = small_config(mode)
    cfg.objective = "hubert"
    cfg.hubert = HubertConfig(clusters=12)
    if gated:
        cfg.transformer = dataclasses.replace(cfg.transformer, relative_bias="gated", relative_buckets=32,
                                              relative_max_distance=40)
    return cfg


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "feature_encoder" not in name and "feature_extractor" not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _batch(frontend: torch.nn.Module):
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(2, 16000, generator=gen)
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 12000:] = True
    source[pad] = 0.0
    lengths = frontend.output_lengths((~pad).sum(1))
    frames = int(frontend.output_lengths(torch.tensor(16000)))
    mask = compute_span_mask((2, frames), mask_prob=0.5, mask_length=4, min_masks=2, lengths=lengths, generator=gen)
    return source, pad, mask, lengths


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= TOL * scale, f"{what}: max abs difference {err:.3g} (scale {scale:.3g})"


def _valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Padded frames zeroed: Hugging Face leaves them as they come out, ours too, but they mean nothing."""
    keep = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    return x * keep.unsqueeze(-1)


def _our_states(encoder, source, pad, mask):
    captured = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: captured.append(out)) for layer in
               encoder.transformer.layers]
    try:
        features, frame_pad, _ = encoder.extract_features(source, pad)
        x, _ = encoder.feature_projection(features)
        x = encoder.apply_time_mask(x, mask)
        last = encoder.transformer(x, frame_pad)
    finally:
        for h in handles:
            h.remove()
    return last, captured


@pytest.mark.parametrize(("mode", "gated"), [("default", False), ("layer_norm", False), ("default", True),
                                             ("layer_norm", True)])
def test_our_encoder_exports_to_hubert_or_wavlm_model(small_config, tmp_path, mode, gated):
    cfg = _config(small_config, mode, gated)
    torch.manual_seed(0)
    ours = build_pretraining_model(cfg).eval()
    _perturb(ours, 1)
    encoder_state = {k[len("encoder."):]: v for k, v in ours.state_dict().items() if k.startswith("encoder.")}
    out = save_hf_encoder(encoder_state, cfg, tmp_path / "hf")
    expected = "WavLMModel" if gated else "HubertModel"
    assert read_hf_config(out)["architectures"] == [expected]
    hf_class = getattr(transformers, expected)
    hf, info = hf_class.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    source, pad, mask, lengths = _batch(ours.encoder.feature_encoder)
    with torch.no_grad():
        last, layers = _our_states(ours.encoder, source, pad, mask)
        h = hf(source, attention_mask=(~pad).long(), mask_time_indices=mask, output_hidden_states=True)
    _close(_valid(last, lengths), _valid(h.last_hidden_state, lengths), "last hidden state")
    if not cfg.transformer.layer_norm_first:  # pre-LN: HF's hidden states are taken before the final norm too
        for i, state in enumerate(layers):
            _close(_valid(state, lengths), _valid(h.hidden_states[i + 1], lengths), f"layer {i + 1}")


@pytest.mark.parametrize("gated", [False, True])
def test_our_ctc_model_exports_to_hubert_or_wavlm_for_ctc(small_config, tmp_path, gated):
    cfg = _config(small_config, "layer_norm", gated)
    torch.manual_seed(0)
    ours = build_ctc_model(cfg, vocab_size=9).eval()
    _perturb(ours, 2)
    out = save_hf_ctc(ours, cfg, tmp_path / "hf")
    expected = "WavLMForCTC" if gated else "HubertForCTC"
    assert read_hf_config(out)["architectures"] == [expected]
    hf, info = getattr(transformers, expected).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    source, pad, _, lengths = _batch(ours.encoder.feature_encoder)
    with torch.no_grad():
        o = ours(source, pad)
        h = hf(source, attention_mask=(~pad).long())
    _close(_valid(o.logits, lengths), _valid(h.logits, lengths), "CTC logits")


def _hf_model(kind: str, ctc: bool, seed: int):
    """A small ``transformers`` model of ``kind`` with random (perturbed) weights."""
    kw = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
        do_stable_layer_norm=True, conv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.5, vocab_size=9,
    )
    if kind == "wavlm":
        config = transformers.WavLMConfig(**kw, num_buckets=32, max_bucket_distance=40)
        cls = transformers.WavLMForCTC if ctc else transformers.WavLMModel
    else:
        config = transformers.HubertConfig(**kw)
        cls = transformers.HubertForCTC if ctc else transformers.HubertModel
    torch.manual_seed(seed)
    model = cls(config)
    _perturb(model, seed + 1)
    return model.eval()


@pytest.mark.parametrize(("kind", "ctc"), [("hubert", False), ("hubert", True), ("wavlm", False), ("wavlm", True)])
def test_transformers_models_load_into_ours(tmp_path, kind, ctc):
    hf = _hf_model(kind, ctc, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pretraining head starts fresh; HF's masking values are replaced
        cfg, ours = load_hf(tmp_path / "hf", task="ctc" if ctc else "pretraining")
    ours.eval()
    assert cfg.objective == "hubert"
    assert cfg.transformer.relative_bias == ("gated" if kind == "wavlm" else "none")
    source, pad, mask, lengths = _batch(ours.encoder.feature_encoder)
    with torch.no_grad():
        if ctc:
            _close(_valid(ours(source, pad).logits, lengths),
                   _valid(hf(source, attention_mask=(~pad).long()).logits, lengths), "CTC logits")
        else:
            last, _ = _our_states(ours.encoder, source, pad, mask)
            h = hf(source, attention_mask=(~pad).long(), mask_time_indices=mask)
            _close(_valid(last, lengths), _valid(h.last_hidden_state, lengths), "last hidden state")


def test_what_hubert_cannot_represent_is_refused():
    from models.hf import hf_to_model_config

    base = _hf_model("hubert", False, seed=0).config.to_dict()
    with pytest.raises(ValueError, match="feat_proj_layer_norm"):
        hf_to_model_config({**base, "feat_proj_layer_norm": False})
    with pytest.raises(ValueError, match="conv_pos_batch_norm"):
        hf_to_model_config({**base, "conv_pos_batch_norm": True})
