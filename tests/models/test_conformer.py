"""The Conformer context network: the block against its formulas, padding, LayerDrop, gradients, config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models.config import TransformerConfig
from models.conformer import ConformerEncoder, ConformerLayer
from models.factory import build_pretraining_model
from models.transformer import TransformerEncoder

DIM, HEADS, FFN, KERNEL = 8, 2, 16, 5


def _encoder(position: str = "relative", **overrides) -> ConformerEncoder:
    kwargs = dict(
        dim=DIM, ffn_dim=FFN, num_layers=2, num_heads=HEADS, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, layer_norm_first=True, conv_kernel=KERNEL, position=position,
    )
    kwargs.update(overrides)
    return ConformerEncoder(**kwargs)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight and BatchNorm statistic off its initial value (ones, zeros),
    so that a swapped or ignored tensor changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)


# --- the block, written from its formulas -----------------------------------------------------


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def _silu(x):
    return x * torch.sigmoid(x)


def _linear(x, lin):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def _ffn(x, ffn):
    return _linear(_silu(_linear(x, ffn.fc1)), ffn.fc2)


def _sinusoid(distance, dim):
    """[sin(r w_0), cos(r w_0), sin(r w_1), ...] with w_m = 10000^(-2m / dim)."""
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angle = distance[..., None].float() * freq
    out = torch.empty(*distance.shape, dim)
    out[..., 0::2] = torch.sin(angle)
    out[..., 1::2] = torch.cos(angle)
    return out


def _rotate(x, num_heads):
    """Rotate each head's channel pairs (m, m + Dh/2) at time t by the angle t * 10000^(-2m / Dh)."""
    batch, time, dim = x.shape
    dh = dim // num_heads
    h = x.view(batch, time, num_heads, dh)
    freq = 10000.0 ** (-torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    angle = torch.arange(time, dtype=torch.float32)[:, None] * freq  # (T, Dh/2)
    cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    a, b = h[..., : dh // 2], h[..., dh // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).reshape(batch, time, dim)


def _attention(x, att, pad, position):
    batch, time, dim = x.shape
    dh = dim // HEADS

    def heads(y):
        return y.view(batch, time, HEADS, dh)

    qk_in = _rotate(x, HEADS) if position == "rotary" else x
    q, k, v = heads(_linear(qk_in, att.q_proj)), heads(_linear(qk_in, att.k_proj)), heads(_linear(x, att.v_proj))
    if position == "relative":
        i = torch.arange(time)
        distance = i[:, None] - i[None, :]  # i - j: positive when the key is to the left
        p = _linear(_sinusoid(distance, dim), att.linear_pos).view(time, time, HEADS, dh)
        content = torch.einsum("bihd,bjhd->bhij", q + att.pos_bias_u, k)
        where = torch.einsum("bihd,ijhd->bhij", q + att.pos_bias_v, p)
        scores = (content + where) / math.sqrt(dh)
    else:
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dh)
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, time, dim)
    return _linear(out, att.out_proj)


def _conv_module(x, conv, pad):
    batch, time, dim = x.shape
    y = _layer_norm(x, conv.norm) @ conv.pointwise1.weight[:, :, 0].T  # (B, T, 2D)
    y = y[..., :dim] * torch.sigmoid(y[..., dim:])
    if pad is not None:
        y = y.masked_fill(pad[..., None], 0.0)
    w = conv.depthwise.weight[:, 0]  # (D, K)
    half = w.shape[1] // 2
    z = torch.zeros_like(y)
    for t in range(time):
        for tap in range(w.shape[1]):
            s = t + tap - half
            if 0 <= s < time:
                z[:, t] += w[:, tap] * y[:, s]
    bn = conv.batch_norm
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    return _silu(z) @ conv.pointwise2.weight[:, :, 0].T


def _reference_layer(x, layer, pad, position):
    x = x + 0.5 * _ffn(_layer_norm(x, layer.ffn1_norm), layer.ffn1)
    x = x + _attention(_layer_norm(x, layer.attn_norm), layer.attention, pad, position)
    x = x + _conv_module(x, layer.conv, pad)
    x = x + 0.5 * _ffn(_layer_norm(x, layer.ffn2_norm), layer.ffn2)
    return _layer_norm(x, layer.final_norm)


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_layer_matches_the_conformer_formulas(position):
    torch.manual_seed(0)
    enc = _encoder(position)
    _perturb(enc)
    enc.eval()
    layer: ConformerLayer = enc.layers[0]
    x = torch.randn(2, 11, DIM)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 7:] = True
    with torch.no_grad():
        ours = layer(x, pad, enc.positions(x))
        ref = _reference_layer(x, layer, pad, position)
    valid = ~pad
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-5, atol=1e-5)


# --- padding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["relative", "rotary"])
@pytest.mark.parametrize("training", [False, True])
def test_padding_does_not_change_valid_frames(position, training):
    """Appending padding (more of it, or to a longer batch) leaves every valid output as it was;
    in training too, where the BatchNorm statistics come from the batch."""
    torch.manual_seed(0)
    enc = _encoder(position)
    _perturb(enc)
    enc.train(training)
    lengths = [13, 9]
    x = torch.randn(2, 20, DIM)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    before = torch.cat([m.running_mean for m in bns])

    def run(total: int) -> tuple[torch.Tensor, torch.Tensor]:
        pad = torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T)
        padded = torch.randn(2, total, DIM) * 5  # junk in the padding
        padded[:, :13] = torch.where(pad[:, :13, None], padded[:, :13], x[:, :13])
        state = {k: v.clone() for k, v in enc.state_dict().items()}
        out = enc(padded, pad)
        stats = torch.cat([m.running_mean for m in bns])
        enc.load_state_dict(state)
        return out, stats

    with torch.no_grad():
        short, short_stats = run(13)
        long, long_stats = run(20)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(short[b, :n], long[b, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short_stats, long_stats, rtol=1e-5, atol=1e-6)
    if training:  # the statistics moved, by the valid frames only
        assert not torch.allclose(short_stats, before)
    else:
        assert torch.equal(short_stats, before)


def test_an_utterance_alone_equals_it_in_a_padded_batch():
    torch.manual_seed(0)
    enc = _encoder()
    _perturb(enc)
    enc.eval()
    x = torch.randn(2, 15, DIM)
    pad = torch.zeros(2, 15, dtype=torch.bool)
    pad[0, 10:] = True
    with torch.no_grad():
        batch = enc(x, pad)
        alone = enc(x[:1, :10])
    torch.testing.assert_close(batch[0, :10], alone[0], rtol=1e-5, atol=1e-5)


# --- LayerDrop, hooks, gradients ---------------------------------------------------------------


def test_layerdrop_draws_as_the_transformer_and_skips_those_layers():
    conformer = _encoder(num_layers=8, layerdrop=0.5).train()
    transformer = TransformerEncoder(
        dim=DIM, ffn_dim=FFN, num_layers=8, num_heads=HEADS, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.5, layer_norm_first=True, pos_conv_kernel=4, pos_conv_groups=2,
    ).train()
    draws = [conformer.kept_layers(torch.Generator().manual_seed(s)) for s in range(6)]
    assert draws == [transformer.kept_layers(torch.Generator().manual_seed(s)) for s in range(6)]
    assert len({tuple(d) for d in draws}) > 1 and any(not all(d) for d in draws)

    x = torch.randn(2, 10, DIM)
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(conformer.layers)]
    conformer(x, layerdrop_generator=torch.Generator().manual_seed(3))
    assert ran == [i for i, keep in enumerate(draws[3]) if keep]
    conformer.eval()
    ran.clear()
    conformer(x, layerdrop_generator=torch.Generator().manual_seed(3))
    assert ran == list(range(8))
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("first", [True, False])
def test_probe_contract_hooks_and_final_norm(first):
    """The probe hooks layers[0]'s input and each layer's output, and reads the last hidden
    state after the stack's LayerNorm when ``layer_norm_first`` says one closes it."""
    torch.manual_seed(0)
    enc = _encoder(layer_norm_first=first).eval()
    _perturb(enc)
    assert enc.layer_norm_first is first
    seen = []
    enc.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    for layer in enc.layers:
        layer.register_forward_hook(lambda m, a, out: seen.append(out))
    x = torch.randn(2, 6, DIM)
    with torch.no_grad():
        out = enc(x)
    assert [s.shape for s in seen] == [x.shape] * 3
    if first:
        torch.testing.assert_close(out, enc.norm(seen[-1]))
    else:
        torch.testing.assert_close(seen[0], enc.norm(x))
        torch.testing.assert_close(out, seen[-1])


@pytest.mark.parametrize("position", ["relative", "rotary"])
def test_gradients_reach_every_conformer_parameter(small_config, position):
    cfg = small_config("layer_norm")
    cfg.transformer = dataclasses.replace(cfg.transformer, kind="conformer", conv_kernel=KERNEL, position=position)
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).train()
    assert isinstance(model.encoder.transformer, ConformerEncoder)
    source = torch.randn(2, 8000, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 6000:] = True
    out = model(source, pad, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    for name, p in model.encoder.transformer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


# --- config ------------------------------------------------------------------------------------


def test_conformer_config_fields_and_validation():
    default = TransformerConfig()
    assert (default.kind, default.conv_kernel, default.position) == ("transformer", 31, "relative")
    with pytest.raises(ValueError, match=r"^model\.transformer\.conv_kernel: expected an odd value >= 1, got 30$"):
        TransformerConfig(kind="conformer", conv_kernel=30)
    with pytest.raises(ValueError, match=r"model\.transformer\.conv_kernel: expected an odd value >= 1, got 0"):
        TransformerConfig(conv_kernel=0)
    with pytest.raises(ValueError, match=r"model\.transformer\.kind: expected 'transformer' or 'conformer', got 'lstm'"):
        TransformerConfig(kind="lstm")
    with pytest.raises(ValueError, match=r"model\.transformer\.position: expected 'relative' or 'rotary', got 'abs'"):
        TransformerConfig(kind="conformer", position="abs")
    with pytest.raises(ValueError, match=r"position='rotary': expected an even dim / num_heads, got 3"):
        TransformerConfig(kind="conformer", position="rotary", dim=12, num_heads=4, pos_conv_groups=4)
    # only a conformer pairs its channels
    TransformerConfig(kind="transformer", position="rotary", dim=12, num_heads=4, pos_conv_groups=4)
    TransformerConfig(kind="conformer", conv_kernel=1)
