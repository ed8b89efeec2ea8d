"""Conformer models against ``transformers``' Wav2Vec2-Conformer (fp32, CPU), and their directories both ways.

Same random weights (converted by ``models.hf``; every weight and BatchNorm statistic
moved off its initial value so that a misplaced tensor shows), same input, same
``mask_time_indices`` and distractors: hidden states, projected context, projected
targets and losses agree within 1e-5.

Padding: Hugging Face's conformer convolution module mixes padded frames into the valid
frames next to them (it has no padding mask); ours keeps them out (``models.conformer``).
So a padded batch of ours is compared with Hugging Face run on each utterance alone, and
unpadded batches are compared as they are.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

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
from models.hf_conformer import unused_hf_weights  # noqa: E402
from models.masking import compute_span_mask, sample_negatives  # noqa: E402

TOL = 1e-5
PREFIX = "wav2vec2_conformer."


def _config(small_config, position: str = "relative"):
    cfg = small_config("layer_norm")  # pre-LN stack, layer-norm extractor: Hugging Face's conformer layout
    cfg.transformer = dataclasses.replace(cfg.transformer, kind="conformer", conv_kernel=5, position=position)
    return cfg


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "feature_" not in name and "quantizer" not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)


def _hf_state(ours, cfg) -> dict[str, torch.Tensor]:
    extra = {PREFIX + k: v for k, v in unused_hf_weights(cfg).items()}
    return {**pretraining_state_to_hf(ours.state_dict()), **extra}


def _pair(cfg):
    torch.manual_seed(0)
    ours = build_pretraining_model(cfg)
    _perturb(ours, 1)
    hf = transformers.Wav2Vec2ConformerForPreTraining(
        transformers.Wav2Vec2ConformerConfig.from_dict(model_config_to_hf(cfg))
    )
    hf.load_state_dict(_hf_state(ours, cfg), strict=True)
    return ours, hf


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= TOL * scale, f"{what}: max abs difference {err:.3g} (scale {scale:.3g})"


def _masks(ours, cfg, lengths: torch.Tensor, frames: int, gen: torch.Generator):
    mask = compute_span_mask(
        (len(lengths), frames), mask_prob=cfg.mask.prob, mask_length=cfg.mask.length, min_masks=2,
        lengths=lengths, generator=gen,
    )
    neg = sample_negatives(mask, cfg.loss.num_negatives, generator=gen)
    return mask, neg, neg + (torch.arange(len(lengths)) * frames).view(-1, 1, 1)  # HF indexes the flat batch


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_unpadded_outputs_and_losses_match_transformers(small_config, position):
    cfg = _config(small_config, position)
    ours, hf = _pair(cfg)
    ours.eval()
    hf.eval()
    gen = torch.Generator().manual_seed(2)
    source = torch.randn(2, 8000, generator=gen)
    frames = int(ours.encoder.feature_encoder.output_lengths(torch.tensor(8000)))
    mask, neg, neg_hf = _masks(ours, cfg, torch.tensor([frames, frames]), frames, gen)
    with torch.no_grad():
        o = ours(source, mask_time_indices=mask, negative_indices=neg)
        h = hf(source, mask_time_indices=mask, sampled_negative_indices=neg_hf)
        base = hf.wav2vec2_conformer(source, mask_time_indices=mask)
    _close(o.last_hidden_state, base.last_hidden_state, "last hidden state")
    _close(o.projected_context, h.projected_states, "projected context")
    _close(o.projected_quantized, h.projected_quantized_states, "projected quantized targets")
    _close(o.contrastive_sum, h.contrastive_loss, "contrastive loss (sum)")


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_padded_batch_matches_transformers_utterance_by_utterance(small_config, position):
    cfg = _config(small_config, position)
    ours, hf = _pair(cfg)
    ours.eval()
    hf.eval()
    gen = torch.Generator().manual_seed(3)
    source = torch.randn(2, 8000, generator=gen)
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 5600:] = True
    source[pad] = 0.0
    fe = ours.encoder.feature_encoder
    lengths = fe.output_lengths((~pad).sum(1))
    mask, _, _ = _masks(ours, cfg, lengths, int(fe.output_lengths(torch.tensor(8000))), gen)
    with torch.no_grad():
        o = ours(source, pad, mask_time_indices=mask)
        for b, n in enumerate(lengths.tolist()):
            alone = source[b : b + 1, : int((~pad[b]).sum())]
            h = hf(alone, mask_time_indices=mask[b : b + 1, :n])
            base = hf.wav2vec2_conformer(alone, mask_time_indices=mask[b : b + 1, :n])
            _close(o.last_hidden_state[b, :n], base.last_hidden_state[0], "last hidden state (padded batch)")
            _close(o.projected_context[b, :n], h.projected_states[0], "projected context (padded batch)")
            _close(o.projected_quantized[b, :n], h.projected_quantized_states[0], "projected targets (padded batch)")


def test_training_mode_losses_and_gradients_match_transformers(small_config):
    """Batch statistics in the BatchNorm, Gumbel noise from the same seed: losses and every gradient agree."""
    cfg = _config(small_config)
    ours, hf = _pair(cfg)
    ours.train()
    hf.train()
    gen = torch.Generator().manual_seed(4)
    source = torch.randn(2, 8000, generator=gen)
    frames = int(ours.encoder.feature_encoder.output_lengths(torch.tensor(8000)))
    mask, neg, neg_hf = _masks(ours, cfg, torch.tensor([frames, frames]), frames, gen)
    torch.manual_seed(7)  # HF draws its Gumbel noise from the global generator
    h = hf(source, mask_time_indices=mask, sampled_negative_indices=neg_hf)
    o = ours(source, mask_time_indices=mask, negative_indices=neg, generator=torch.Generator().manual_seed(7))
    _close(o.contrastive_sum, h.contrastive_loss, "contrastive loss (train)")
    _close(o.loss_sum, h.loss, "total loss (train)")
    h.loss.backward()
    o.loss_sum.backward()
    ours_grads = pretraining_state_to_hf(
        {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in ours.named_parameters()}
    )
    unused = {PREFIX + k for k in unused_hf_weights(cfg)}
    for name, p in hf.named_parameters():
        if name in unused:
            assert p.grad is None, name  # Hugging Face never runs them
            continue
        theirs = p.grad if p.grad is not None else torch.zeros_like(p)
        scale = max(theirs.abs().max().item(), 1e-2)  # key biases: zero gradient up to rounding noise
        err = (ours_grads[name] - theirs).abs().max().item()
        assert err <= 1e-4 * scale, f"gradient of {name}: max abs difference {err:.3g} (scale {scale:.3g})"
    # and the BatchNorm running statistics moved alike
    for name, value in hf.state_dict().items():
        if "running_" in name:
            _close(ours.state_dict()[_ours_name(name)], value, "BatchNorm running statistics (train)")


def _ours_name(hf_name: str) -> str:
    layer = hf_name.split(".")[3]
    return f"encoder.transformer.layers.{layer}.conv.batch_norm.{hf_name.rsplit('.', 1)[1]}"


def _loading_info(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    return model, {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items()}


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_our_pretraining_dir_loads_in_transformers_and_back(small_config, tmp_path, position):
    cfg = _config(small_config, position)
    ours, _ = _pair(cfg)
    ours.set_num_updates(1000)
    save_hf_pretraining(ours, cfg, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["model_type"] == "wav2vec2-conformer"
    assert saved["architectures"] == ["Wav2Vec2ConformerForPreTraining"]
    assert (saved["position_embeddings_type"], saved["conv_depthwise_kernel_size"]) == (position, 5)

    hf, info = _loading_info(transformers.Wav2Vec2ConformerForPreTraining, tmp_path / "hf")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and not info["mismatched_keys"], info
    expected = _hf_state(ours, cfg)
    for name, value in hf.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    cfg2, back = load_hf(tmp_path / "hf")
    assert cfg2 == cfg
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_our_ctc_dir_loads_in_transformers_with_same_logits(small_config, tmp_path):
    cfg = _config(small_config, "rotary")
    torch.manual_seed(0)
    ours = build_ctc_model(cfg, vocab_size=7)
    _perturb(ours, 2)
    ours.eval()
    save_hf_ctc(ours, cfg, tmp_path / "ctc")
    assert json.loads((tmp_path / "ctc" / "config.json").read_text())["architectures"] == ["Wav2Vec2ConformerForCTC"]
    hf, info = _loading_info(transformers.Wav2Vec2ConformerForCTC, tmp_path / "ctc")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    source = torch.randn(2, 8000, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _close(ours(source).logits, hf.eval()(source).logits, "CTC logits (our export)")


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_transformers_dirs_load_into_ours_with_same_outputs(small_config, tmp_path, position):
    cfg = _config(small_config, position)
    hf_cfg = transformers.Wav2Vec2ConformerConfig.from_dict(model_config_to_hf(cfg, vocab_size=9))
    del hf_cfg.wavray  # a config written by transformers alone
    torch.manual_seed(5)
    pre = transformers.Wav2Vec2ConformerForPreTraining(hf_cfg)
    _perturb(pre, 3)
    pre.eval().save_pretrained(tmp_path / "pre")
    with pytest.warns(UserWarning, match="pretraining uses"):
        loaded_cfg, ours = load_hf(tmp_path / "pre")
    assert loaded_cfg.transformer == cfg.transformer
    hf_state = read_hf_state_dict(tmp_path / "pre")
    converted = {**pretraining_state_to_hf(ours.state_dict()), **{PREFIX + k: v for k, v in unused_hf_weights(cfg).items()}}
    assert set(converted) == set(hf_state)
    source = torch.randn(2, 8000, generator=torch.Generator().manual_seed(6))
    frames = int(ours.encoder.feature_encoder.output_lengths(torch.tensor(8000)))
    mask, _, _ = _masks(ours, cfg, torch.tensor([frames, frames]), frames, torch.Generator().manual_seed(7))
    ours.eval()
    with torch.no_grad():
        o = ours(source, mask_time_indices=mask)
        h = pre(source, mask_time_indices=mask)
    _close(o.projected_context, h.projected_states, "projected context (HF-saved)")
    _close(o.projected_quantized, h.projected_quantized_states, "projected targets (HF-saved)")

    ctc = transformers.Wav2Vec2ConformerForCTC(hf_cfg)
    _perturb(ctc, 4)
    ctc.eval().save_pretrained(tmp_path / "ctc")
    _, ours_ctc = load_hf(tmp_path / "ctc", task="ctc")
    with torch.no_grad():
        _close(ours_ctc.eval()(source).logits, ctc(source).logits, "CTC logits (HF-saved)")


def test_base_model_dir_loads_into_pretraining_with_fresh_heads(small_config, tmp_path):
    cfg = _config(small_config)
    transformers.Wav2Vec2ConformerModel(
        transformers.Wav2Vec2ConformerConfig.from_dict(model_config_to_hf(cfg))
    ).save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="freshly initialised"):
        _, model = load_hf(tmp_path / "base")
    out = model.eval()(torch.randn(1, 8000), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss_sum)


def test_config_round_trip_is_lossless(small_config):
    for position in ("relative", "rotary"):
        cfg = _config(small_config, position)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert hf_to_model_config(model_config_to_hf(cfg)) == cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "gelu"}, r"hidden_act: expected 'swish' or 'silu'.*got 'gelu'"),
        ({"position_embeddings_type": None}, r"position_embeddings_type: expected 'relative' or 'rotary', got None"),
        (
            {"position_embeddings_type": "rotary", "rotary_embedding_base": 500},
            r"rotary_embedding_base: expected 10000, got 500",
        ),
        ({"model_type": "wav2vec2-bert"}, r"model_type: expected 'wav2vec2', got 'wav2vec2-bert'"),
    ],
)
def test_unrepresentable_conformer_configs_are_refused(small_config, change, message):
    hf = model_config_to_hf(_config(small_config))
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        hf_to_model_config(hf)


def test_what_cannot_map_is_named(small_config, tmp_path):
    cfg = _config(small_config)
    post = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, layer_norm_first=False))
    with pytest.raises(ValueError, match=r"layer_norm_first=False .* always applies the LayerNorm after the last layer"):
        model_config_to_hf(post)
    with pytest.raises(ValueError, match="layer_norm_first=False"):
        save_hf_pretraining(build_pretraining_model(post), post, tmp_path / "post")

    hf = model_config_to_hf(cfg)
    hf["conformer_conv_dropout"] = 0.3
    with pytest.warns(UserWarning, match="conformer_conv_dropout 0.3 is replaced by hidden_dropout"):
        hf_to_model_config(hf, for_pretraining=False)

    # a config that says conformer over wav2vec 2.0 weights (or the reverse)
    transformer_cfg = small_config("layer_norm")
    save_hf_pretraining(build_pretraining_model(transformer_cfg), transformer_cfg, tmp_path / "w2v")
    (tmp_path / "w2v" / "config.json").write_text(json.dumps(model_config_to_hf(cfg)))
    with pytest.raises(ValueError, match="model_type 'wav2vec2-conformer' but the weights are a wav2vec 2.0"):
        load_hf(tmp_path / "w2v")
