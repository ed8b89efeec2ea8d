"""data2vec 1.0 and 2.0: the EMA update and its decay schedule against hand-computed cases,
the teacher's targets and the loss by hand, data2vec 2.0's exact masks, clones that share
one teacher pass, a student that sees only its unmasked frames, and ALiBi."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import config as M
from models.data2vec import (
    Data2Vec2Model,
    Data2VecModel,
    ema_decay,
    ema_update_,
    kept_frames,
    num_kept_frames,
)
from models.factory import build_pretraining_model
from models.masking import compute_exact_span_mask
from models.transformer import AlibiBias, alibi_slopes


def _model(preset=M.data2vec_laptop, **data2vec) -> Data2VecModel | Data2Vec2Model:
    cfg = preset()
    for k, v in data2vec.items():
        setattr(cfg.data2vec, k, v)
    torch.manual_seed(0)
    return build_pretraining_model(cfg)


def _audio(batch: int = 2, samples: int = 16000, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))


def test_decay_rises_linearly_then_holds() -> None:
    """fairseq's get_annealed_rate(0.999, 0.9999, n, 30000), by hand."""
    kw = dict(start=0.999, end=0.9999, anneal_steps=30_000)
    assert ema_decay(0, **kw) == pytest.approx(0.999, abs=1e-12)
    assert ema_decay(1, **kw) == pytest.approx(0.999 + 0.0009 / 30_000, abs=1e-12)
    assert ema_decay(15_000, **kw) == pytest.approx(0.99945, abs=1e-12)
    assert ema_decay(30_000, **kw) == ema_decay(10**6, **kw) == 0.9999
    assert ema_decay(7, start=0.9997, end=1.0, anneal_steps=300_000) < 1.0  # data2vec 2.0 LARGE ends frozen
    model = _model()  # the laptop preset: 0.99 -> 0.999 over 500 updates
    assert model.ema_decay(250) == pytest.approx(0.9945, abs=1e-12) and model.ema_decay(500) == 0.999


def test_ema_update_by_hand_and_a_skipped_update_moves_nothing() -> None:
    teacher = [torch.tensor([1.0, 2.0, -4.0]), torch.tensor([[0.5]])]
    student = [torch.tensor([3.0, -1.0, 0.0]), torch.tensor([[2.5]])]
    ema_update_(teacher, student, 0.9)
    # 0.9 * t + 0.1 * s
    assert torch.allclose(teacher[0], torch.tensor([1.2, 1.7, -3.6]), atol=1e-6)
    assert torch.allclose(teacher[1], torch.tensor([[0.7]]), atol=1e-6)
    before = [t.clone() for t in teacher]
    ema_update_(teacher, student, 0.9, skip=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(teacher, before, strict=True)), "a skipped update moved the teacher"
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher, student, strict=True)), "decay 0 copies"
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_the_loop_hook_averages_the_layers_and_copies_1_0s_positional_convolution() -> None:
    from pipeline import config as C
    from pipeline.train.data2vec import Data2VecStep

    cfg = C.data2vec_laptop()
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.encoder.transformer.parameters(),
                                                 strict=True)), "the teacher starts as the student"
    with torch.no_grad():
        for p in model.encoder.transformer.parameters():
            p.add_(torch.randn_like(p))
    t0 = {n: p.detach().numpy().astype(np.float64).copy() for n, p in model.teacher.named_parameters()}
    s0 = {n: p.detach().numpy().astype(np.float64).copy() for n, p in model.encoder.transformer.named_parameters()}
    step = Data2VecStep(cfg, model)
    step.end_update(None, 249, torch.tensor(0.0))  # after update 250: d = 0.99 + 0.009 * 250 / 500
    d = 0.9945
    for name, p in model.teacher.named_parameters():
        want = s0[name] if name.startswith("pos_conv.") else d * t0[name] + (1 - d) * s0[name]
        assert np.allclose(p.detach().numpy(), want, atol=1e-6), name
    assert any(n.startswith("pos_conv.") for n in t0) and any(n.startswith("layers.") for n in t0)
    frozen = {n: p.clone() for n, p in model.teacher.named_parameters()}
    step.end_update(None, 250, torch.tensor(1.0))  # skipped: nothing moves, copied parts included
    assert all(torch.equal(p, frozen[n]) for n, p in model.teacher.named_parameters())


def test_data2vec2_averages_every_part_of_the_context_network() -> None:
    model = _model(M.data2vec2_laptop)
    averaged, copied = model.teacher_pairs()
    assert copied == [] and {id(t) for t, _ in averaged} == {id(p) for p in model.teacher.parameters()}
    assert any(t.shape == model.teacher.alibi.scale.shape for t, _ in averaged)


def test_targets_are_the_top_k_instance_normed_ffn_outputs_of_the_unmasked_input() -> None:
    model = _model(M.data2vec_laptop).eval()
    with torch.no_grad():  # a teacher unlike the student, so a mix-up shows
        for p in model.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    captured: list[torch.Tensor] = []
    hooks = [layer.ffn.register_forward_hook(lambda _m, _a, out: captured.append(out)) for layer in model.teacher.layers]
    source = _audio()
    none = torch.zeros(2, 49, dtype=torch.bool)
    some = torch.zeros(2, 49, dtype=torch.bool)
    some[:, 10:30] = True
    out = model(source, mask_time_indices=some)
    for h in hooks:
        h.remove()
    assert len(captured) == 2  # one teacher pass, both layers
    # By hand: each layer's FFN output normalised per utterance and channel over time
    # (biased variance, eps 1e-5), then the mean of the top k = 2.
    normed = []
    for y in captured:
        y = y.double().numpy()
        normed.append((y - y.mean(axis=1, keepdims=True)) / np.sqrt(y.var(axis=1, keepdims=True) + 1e-5))
    want = sum(normed) / 2
    assert np.allclose(out.targets.numpy(), want, atol=1e-5)
    # The teacher sees the unmasked input: another mask, the same targets; the student's predictions move.
    other = model(source, mask_time_indices=none)
    assert torch.equal(other.targets, out.targets)
    assert not torch.allclose(other.predictions, out.predictions)
    # top_k = 1: the last layer alone
    model.top_k = 1
    assert np.allclose(model(source, mask_time_indices=some).targets.numpy(), normed[-1], atol=1e-5)


def test_loss_is_the_scaled_squared_error_at_masked_frames_and_the_teacher_gets_no_gradient() -> None:
    model = _model(M.data2vec_laptop).train()
    source = _audio()
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[0, [3, 4, 5]] = True
    mask[1, [0, 48]] = True
    out = model(source, mask_time_indices=mask)
    p, t = out.predictions.detach().double().numpy(), out.targets.double().numpy()
    by_hand = sum(((p[b, i] - t[b, i]) ** 2).sum() for b, i in mask.nonzero().tolist()) / math.sqrt(64)
    assert float(out.loss_sum.detach()) == pytest.approx(by_hand, rel=1e-5) and int(out.num_masked) == 5
    per_row = [sum(((p[b, i] - t[b, i]) ** 2).sum() for i in mask[b].nonzero().flatten().tolist()) / math.sqrt(64)
               for b in range(2)]  # each utterance's part, for the per-language losses
    assert out.row_loss_sum.tolist() == pytest.approx(per_row, rel=1e-5) and not out.row_loss_sum.requires_grad
    # std over the masked frames per channel (unbiased), mean over channels
    rows = np.stack([t[b, i] for b, i in mask.nonzero().tolist()])
    assert float(out.target_std) == pytest.approx(np.sqrt(rows.var(axis=0, ddof=1) + 1e-6).mean(), rel=1e-5)
    out.loss_sum.backward()
    assert model.regression_head.weight.grad is not None and model.encoder.mask_embedding.weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())


def test_exact_span_masks_hold_exactly_the_fraction_in_spans_and_never_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([100, 100, 61, 7, 0])
    mask = compute_exact_span_mask((5, 100), mask_prob=0.5, mask_length=5, adjust=0.05, lengths=lengths,
                                   generator=gen)
    assert mask.sum(dim=1).tolist() == [50, 50, 30, 3, 0]
    t = torch.arange(100)
    assert not (mask & (t.unsqueeze(0) >= lengths.unsqueeze(1))).any()
    # Spans: most masked frames have a masked neighbour (isolated picks only top up the count).
    m = mask[:2].numpy()
    neighbour = np.zeros_like(m)
    neighbour[:, 1:] |= m[:, :-1]
    neighbour[:, :-1] |= m[:, 1:]
    assert (m & neighbour).sum() / m.sum() > 0.8
    again = compute_exact_span_mask((5, 100), mask_prob=0.5, mask_length=5, adjust=0.05, lengths=lengths,
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert num_kept_frames([100, 61, 7], 0.5) == 50


def test_data2vec2_clones_share_one_teacher_pass_and_the_student_sees_only_unmasked_frames() -> None:
    model = _model(M.data2vec2_laptop).eval()
    assert model.clones == 4 and not model.encoder.mask_embedding.weight.requires_grad
    shapes: dict[str, list[tuple[int, ...]]] = {"teacher": [], "student": []}
    hooks = [
        model.teacher.layers[0].register_forward_pre_hook(lambda _m, a: shapes["teacher"].append(tuple(a[0].shape))),
        model.encoder.transformer.layers[0].register_forward_pre_hook(
            lambda _m, a: shapes["student"].append(tuple(a[0].shape))),
    ]
    source = _audio(batch=2)
    out = model(source, generator=torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    T, D = 49, 64
    assert shapes["teacher"] == [(2, T, D)], "one teacher pass over the utterances, not the clones"
    assert shapes["student"] == [(8, T - T // 2, D)], "the student's layers see the unmasked half only"
    assert out.mask_time_indices.sum(dim=1).tolist() == [T // 2] * 8
    assert out.predictions.shape == out.targets.shape == (8, T, D)
    for b in range(2):
        rows = out.targets[4 * b: 4 * b + 4]
        assert all(torch.equal(rows[0], r) for r in rows[1:]), "a clone's targets are its utterance's"
        masks = out.mask_time_indices[4 * b: 4 * b + 4]
        assert len({tuple(m.tolist()) for m in masks}) == 4, "every clone has its own mask"
    # The student never reads a masked frame: changing the projected features there changes nothing.
    mask = out.mask_time_indices
    keep = kept_frames(mask, None)
    x = torch.randn(8, T, D)
    changed = torch.where(mask.unsqueeze(-1), torch.randn(8, T, D), x)
    enc = model.encoder.transformer
    a = enc(x.masked_fill(mask.unsqueeze(-1), 0.0), keep=keep)
    b = enc(changed.masked_fill(mask.unsqueeze(-1), 0.0), keep=keep)
    assert torch.equal(a, b) and a.shape == (8, T - T // 2, D)
    assert torch.equal(keep.indices, torch.stack([m.logical_not().nonzero().squeeze(1) for m in mask]))


def test_padding_keeps_each_clone_to_its_own_frames() -> None:
    model = _model(M.data2vec2_laptop).eval()
    source = _audio(batch=2)
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 9000:] = True  # 27 frames of 49
    out = model(source, pad, generator=torch.Generator().manual_seed(0), num_kept=num_kept_frames([49, 27], 0.5))
    assert out.mask_time_indices.sum(dim=1).tolist() == [24] * 4 + [13] * 4
    assert not (out.mask_time_indices[4:, 27:]).any() and out.last_hidden_state.shape == (8, 25, 64)
    assert out.padding_mask is not None and out.padding_mask[4:, 27:].all() and not out.padding_mask[4:, :27].any()
    assert torch.isfinite(out.loss_sum) and int(out.num_masked) == 4 * 24 + 4 * 13
    # the host-side count equals what the model counts itself
    again = model(source, pad, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.loss_sum, out.loss_sum)


def test_alibi_by_hand() -> None:
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    # 12 heads: the 8-head series, then every other slope of the 16-head one
    assert alibi_slopes(12) == pytest.approx([2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)])
    bias = AlibiBias(4)
    with torch.no_grad():
        bias.scale.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))  # a negative scale is clamped to 0
    positions = torch.tensor([[0, 3, 4]])
    got = bias(positions)
    slopes = alibi_slopes(4)
    for h, scale in enumerate([1.0, 2.0, 0.0, 0.5]):
        for i in range(3):
            for j in range(3):
                want = -scale * slopes[h] * abs(int(positions[0, i]) - int(positions[0, j]))
                assert float(got[0, h, i, j]) == pytest.approx(want, abs=1e-7)


def test_the_configs_refuse_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="top_k"):
        M.ModelConfig(objective="data2vec", transformer=M.TransformerConfig(num_layers=2),
                      data2vec=M.Data2VecConfig(top_k=3))
    with pytest.raises(ValueError, match="kind 'transformer'"):
        M.ModelConfig(objective="data2vec2", transformer=M.TransformerConfig(kind="conformer"))
    with pytest.raises(ValueError, match="conformer"):
        M.TransformerConfig(kind="conformer", alibi=True)
    with pytest.raises(ValueError, match="clones"):
        M.ModelConfig(objective="data2vec", data2vec=M.Data2VecConfig(clones=2))
    with pytest.raises(ValueError, match="ema_decay"):
        M.Data2VecConfig(ema_decay=0.9999, ema_end_decay=0.999)
    for preset in (M.data2vec, M.data2vec2, M.data2vec_laptop, M.data2vec2_laptop):
        cfg = preset()
        cfg.__post_init__()
        assert cfg.transformer.pos_conv_depth > 1 and cfg.encoder.mode == "layer_norm"


def test_data2vecs_options_beside_wavlms_and_teras_in_one_stack() -> None:
    """The merged Transformer takes every option of both lineages: a data2vec teacher reads a
    WavLM-biased stack's FFN outputs (the gated bias reaches every layer) and a stack with
    TERA's sinusoids; the pairings that cannot mean anything are refused by name."""
    from models.transformer import TransformerEncoder

    common = dict(dim=16, ffn_dim=32, num_layers=2, num_heads=4, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, layerdrop=0.0, layer_norm_first=False, pos_conv_kernel=4, pos_conv_groups=4)
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for options in ({"relative_bias": "gated", "relative_buckets": 8, "relative_max_distance": 16},
                    {"absolute_positions": True}, {"alibi": True, "pos_conv_depth": 2}):
        stack = TransformerEncoder(**common, **options).eval()
        outs = stack.ffn_outputs(x, pad)
        assert len(outs) == 2 and all(o.shape == (2, 7, 16) and torch.isfinite(o).all() for o in outs)
        assert stack(x, pad).shape == (2, 7, 16)
    with pytest.raises(ValueError, match="choose one"):
        M.TransformerConfig(alibi=True, relative_bias="gated")
    with pytest.raises(ValueError, match="never run"):
        M.TransformerConfig(absolute_positions=True, pos_conv_depth=3)
    with pytest.raises(ValueError, match="relative_bias"):
        M.ModelConfig(objective="data2vec2", transformer=M.TransformerConfig(relative_bias="gated"))
