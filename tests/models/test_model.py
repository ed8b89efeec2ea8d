"""The pretraining and CTC models: loss composition, schedules, LayerDrop, padding, sizes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models import config as presets
from models.factory import build_ctc_model, build_pretraining_model, count_parameters


def _source(batch: int = 2, samples: int = 8000, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))


def test_pretrain_output_holds_the_fairseq_loss(small_config):
    cfg = small_config("default")
    cfg.loss.feature_penalty_weight = 10.0
    model = build_pretraining_model(cfg)
    out = model(_source(), generator=torch.Generator().manual_seed(0))
    expected = out.contrastive_sum + out.num_masked * (0.1 * out.diversity_loss + 10.0 * out.feature_penalty)
    torch.testing.assert_close(out.loss_sum, expected)
    assert out.num_masked.dtype == torch.long and out.num_correct.dtype == torch.long
    assert 0 <= int(out.num_correct) <= int(out.num_masked) == int(out.mask_time_indices.sum())
    assert out.code_perplexity.shape == out.prob_perplexity.shape == (cfg.quantizer.groups,)
    assert out.last_hidden_state.shape[-1] == cfg.transformer.dim
    assert out.projected_context.shape == out.projected_quantized.shape
    assert out.negative_indices.shape[-1] == cfg.loss.num_negatives
    # at initialisation the contrastive loss per masked frame is near chance, ln(K + 1)
    per_frame = (out.contrastive_sum / out.num_masked).item()
    assert abs(per_frame - math.log(cfg.loss.num_negatives + 1)) < 1.5
    out.loss_sum.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_temperature_schedule_lives_in_a_buffer():
    cfg = presets.tiny()
    model = build_pretraining_model(cfg)
    assert float(model.quantizer.temperature) == 2.0
    model.set_num_updates(100_000)
    assert float(model.quantizer.temperature) == pytest.approx(2.0 * 0.999995**100_000)
    model.set_num_updates(10_000_000)
    assert float(model.quantizer.temperature) == 0.5
    state = model.state_dict()
    assert "quantizer.temperature" in state
    fresh = build_pretraining_model(cfg)
    fresh.load_state_dict(state)
    assert float(fresh.quantizer.temperature) == 0.5
    out = fresh(_source(), generator=torch.Generator().manual_seed(0))
    assert float(out.temperature) == 0.5


def test_layerdrop_follows_its_generator_only_in_training(small_config):
    cfg = small_config("default")
    cfg.transformer = dataclasses.replace(cfg.transformer, num_layers=8, layerdrop=0.5)
    model = build_pretraining_model(cfg).train()
    transformer = model.encoder.transformer
    a = [transformer.kept_layers(torch.Generator().manual_seed(s)) for s in range(6)]
    b = [transformer.kept_layers(torch.Generator().manual_seed(s)) for s in range(6)]
    assert a == b  # same (seed, step) on every rank -> same layers dropped
    assert len({tuple(x) for x in a}) > 1
    assert any(not all(x) for x in a)
    model.eval()
    assert transformer.kept_layers(torch.Generator().manual_seed(0)) == [True] * 8
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU torch.Generator"):
            model.train()
            transformer.kept_layers(torch.Generator(device="cuda"))


def test_same_generator_same_step(small_config):
    model = build_pretraining_model(small_config("default")).train()
    source = _source()
    one = model(source, generator=torch.Generator().manual_seed(3))
    two = model(source, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one.mask_time_indices, two.mask_time_indices)
    assert torch.equal(one.negative_indices, two.negative_indices)
    torch.testing.assert_close(one.loss_sum, two.loss_sum)


def test_grad_mult_scales_the_feature_encoder_gradient(small_config):
    grads = []
    for mult in (1.0, 0.1):
        cfg = small_config("default")
        cfg.encoder.grad_mult = mult
        torch.manual_seed(0)
        model = build_pretraining_model(cfg)
        model(_source(), generator=torch.Generator().manual_seed(0)).loss_sum.backward()
        grads.append(model.encoder.feature_encoder.layers[0].conv.weight.grad.clone())
    torch.testing.assert_close(grads[1], 0.1 * grads[0], rtol=1e-3, atol=1e-6 * float(grads[0].abs().max()))


def test_padding_does_not_change_the_valid_frames(small_config):
    """layer_norm extractor: an utterance padded in a batch gives the same states as alone.

    (The group-norm extractor normalises over the padded time axis too, in fairseq and HF
    alike, so there only the attention is padding-proof.)
    """
    cfg = small_config("layer_norm")
    model = build_pretraining_model(cfg).eval()
    short = _source(1, 6000, seed=1)
    batch = torch.cat([_source(1, 8000, seed=2), torch.nn.functional.pad(short, (0, 2000))])
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 6000:] = True
    frames_short = int(model.encoder.feature_encoder.output_lengths(torch.tensor(6000)))
    frames = int(model.encoder.feature_encoder.output_lengths(torch.tensor(8000)))
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[:, 3:8] = True
    with torch.no_grad():
        alone = model(short, mask_time_indices=mask[1:, :frames_short])
        padded = model(batch, pad, mask_time_indices=mask)
    assert padded.padding_mask[1].sum() == frames - frames_short
    torch.testing.assert_close(
        padded.last_hidden_state[1, :frames_short], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5
    )
    # a user mask reaching into padding is clipped
    assert not (padded.mask_time_indices & padded.padding_mask).any()


def test_ctc_model_from_pretrained_encoder(small_config):
    cfg = small_config("default")
    cfg.mask.channel_prob = 0.3
    pre = build_pretraining_model(cfg)
    ctc = build_ctc_model(cfg, vocab_size=12)
    ctc.load_encoder_state_dict(pre.state_dict())
    for name, value in pre.encoder.state_dict().items():
        assert torch.equal(ctc.encoder.state_dict()[name], value)
    ctc.freeze_feature_encoder()
    source = _source()
    pad = torch.zeros_like(source, dtype=torch.bool)
    pad[1, 6000:] = True
    ctc.train()
    out = ctc(source, pad, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (2, out.padding_mask.shape[1], 12)
    assert out.output_lengths.tolist() == [24, 18]
    out.logits.sum().backward()
    assert all(p.grad is None for p in ctc.encoder.feature_encoder.parameters())
    assert ctc.head.weight.grad is not None
    # masking only in training: eval is deterministic, training is not
    ctc.eval()
    with torch.no_grad():
        e1, e2 = ctc(source, pad).logits, ctc(source, pad).logits
        ctc.train()
        t1 = ctc(source, pad, generator=torch.Generator().manual_seed(1)).logits
    assert torch.equal(e1, e2) and not torch.allclose(e1, t1)
    with pytest.raises(ValueError, match="encoder"):
        ctc.load_encoder_state_dict({"head.weight": torch.zeros(1)})


def test_parameter_counts_match_the_paper(capsys):
    """BASE ~95M and LARGE ~317M parameters (paper); built on the meta device, no memory."""
    counts = {}
    with torch.device("meta"):
        for name in ("base", "large"):
            counts[name] = count_parameters(build_pretraining_model(presets.PRESETS[name]()))
    print(f"parameters: base {counts['base'] / 1e6:.2f}M (paper 95M), large {counts['large'] / 1e6:.2f}M (paper 317M)")
    assert abs(counts["base"] / 95e6 - 1) < 0.01
    assert abs(counts["large"] / 317e6 - 1) < 0.01


def test_bad_inputs_name_the_argument(small_config):
    model = build_pretraining_model(small_config("default"))
    with pytest.raises(ValueError, match="source: expected"):
        model(torch.zeros(8000))
    with pytest.raises(ValueError, match="padding_mask"):
        model(_source(), torch.zeros(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_time_indices"):
        model(_source(), mask_time_indices=torch.zeros(2, 3, dtype=torch.bool))
