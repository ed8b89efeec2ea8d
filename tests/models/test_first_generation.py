"""The first generation and the generative objectives (FAMILY.md sections 9, 10): each loss
against a case computed by hand, the components' causality and padding invariance, the
configs that cannot train, vq-wav2vec's tokens, and what Hugging Face cannot hold."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import config as M
from models.causal_conv import CausalConvContext, ValidGroupNorm, Wav2VecFeatureEncoder
from models.factory import build_ctc_model, build_pretraining_model, prediction_offset
from models.frontends import regression_delta
from models.gru import GRUContext
from models.hf import hf_unsupported
from models.reconstruction import Alterations, future_l1, static_channels
from models.vq import KmeansVectorQuantizer
from models.wav2vec1 import binary_chance, future_prediction_loss

LAPTOPS = ["wav2vec_laptop", "vq_wav2vec_laptop", "vq_wav2vec_kmeans_laptop", "apc_laptop", "mockingjay_laptop",
           "tera_laptop"]


# --- losses against hand-computed cases ------------------------------------------------------


def test_binary_contrastive_loss_by_hand() -> None:
    # 1 utterance, 4 frames of 1-d targets, 1 step from offset 1, 1 distractor each.
    targets = torch.tensor([[[1.0], [2.0], [-1.0], [0.5]]])  # (1, 4, 1)
    preds = torch.tensor([[[[1.0]], [[-1.0]], [[2.0]], [[9.0]]]])  # (1, 4, 1, 1)
    negatives = torch.tensor([[[1], [0], [3], [2]]])  # (1, 4, 1): distractor frame of each target frame
    lengths = torch.tensor([4])
    loss, count, correct = future_prediction_loss(preds, targets, negatives, lengths, offset=1)
    # context t predicts target t+1 (t = 0, 1, 2): true logit p_t * z_{t+1}, distractor p_t * z_neg(t+1)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731 - softplus, the BCE of a logit
    pairs = [(1.0 * 2.0, 1.0 * 1.0), (-1.0 * -1.0, -1.0 * 0.5), (2.0 * 0.5, 2.0 * -1.0)]
    expected = sum(sp(-pos) + sp(neg) for pos, neg in pairs)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert int(count) == 3 and int(correct) == 3  # every true pair outscored its distractor
    assert float(loss) == pytest.approx(float(sum(F.binary_cross_entropy_with_logits(
        torch.tensor([pos, neg]), torch.tensor([1.0, 0.0]), reduction="sum") for pos, neg in pairs)), rel=1e-6)
    # A shorter utterance: no pair reaches past its length (frame 3 is padding).
    loss2, count2, _ = future_prediction_loss(preds, targets, negatives, torch.tensor([3]), offset=1)
    assert int(count2) == 2 and float(loss2) == pytest.approx(sum(sp(-p) + sp(n) for p, n in pairs[:2]), rel=1e-6)


def test_binary_chance_is_the_base_rate_predictors_loss() -> None:
    k = 10
    logit = math.log(1 / k)  # sigmoid = 1 / (k + 1)
    per_pair = -math.log(1 / (k + 1)) - k * math.log(k / (k + 1))
    assert binary_chance(k) == pytest.approx(per_pair) == pytest.approx(3.3510, abs=1e-4)
    assert 1 / (1 + math.exp(-logit)) == pytest.approx(1 / (k + 1))


def test_kmeans_quantizer_by_hand() -> None:
    q = KmeansVectorQuantizer(2, groups=1, entries=2, shared_codebook=False, gamma=0.25)
    with torch.no_grad():
        q.projection.weight.copy_(torch.eye(2).view(2, 2, 1))  # 1x1 conv = identity
        q.codebook.copy_(torch.tensor([[[0.5, -0.5]], [[-2.0, 2.0]]]))  # (V, 1, d)
    x = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]], requires_grad=True)  # (1, 2, 2): GroupNorm leaves it as it is
    out = q(x)
    ze = x.detach() / math.sqrt(1 + 1e-5)
    assert out.codes.tolist() == [[[0], [1]]]  # nearest: (1,-1) -> (0.5,-0.5); (-1,1) -> (-2,2)
    zq = torch.tensor([[[0.5, -0.5], [-2.0, 2.0]]])
    mse = (zq - ze).square().mean()
    assert float(out.loss.detach()) == pytest.approx(float(mse * (1 + 0.25)), rel=1e-5)
    torch.testing.assert_close(out.vectors.detach(), zq)
    assert float(out.code_perplexity[0]) == pytest.approx(2.0)
    assert out.argmax_share.tolist() == [0.5]  # one frame on each codeword
    # Straight-through: the gradient reaches x as if z_q had been z_e.
    w = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    (out.vectors * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (F.group_norm(x_ref.transpose(1, 2), 1).transpose(1, 2) * w).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_apc_l1_by_hand() -> None:
    frames = torch.tensor([[[0.0], [1.0], [3.0], [6.0]]])  # (1, 4, 1)
    preds = torch.tensor([[[1.5], [2.0], [0.0], [0.0]]])
    loss, copy, count = future_l1(preds, frames, torch.tensor([4]), shift=1)
    assert float(loss) == pytest.approx(abs(1.5 - 1) + abs(2 - 3) + abs(0 - 6))
    assert float(copy) == pytest.approx(1 + 2 + 3) and int(count) == 3
    loss3, _, count3 = future_l1(preds, frames, torch.tensor([3]), shift=2)  # only t=0 -> frame 2
    assert float(loss3) == pytest.approx(abs(1.5 - 3)) and int(count3) == 1


def test_tera_alterations_and_positions_by_hand() -> None:
    cfg = M.tera_laptop()
    cfg.frontend.n_mels = 2
    model = build_pretraining_model(cfg)
    features = torch.arange(12, dtype=torch.float32).view(1, 6, 2) + 1  # frame t = (2t+1, 2t+2)
    lengths = torch.tensor([6])
    one = torch.tensor([1])
    alt = Alterations(time=torch.tensor([[False, True, True, False, False, False]]), treatment=one,
                      shift=torch.tensor([2]), band_start=one, band_width=one, noisy=torch.tensor([False]))
    x = model.alter(features, alt, lengths, None)
    expected = features.clone()
    expected[0, 1:3] = features[0, 3:5]  # replaced by frames t + 2
    expected[0, :, 1] = 0.0  # the band: channel 1 of every frame
    torch.testing.assert_close(x, expected)
    where = model.positions(alt, torch.ones(1, 6, dtype=torch.bool))
    assert where[0].long().tolist() == [[0, 1], [1, 1], [1, 1], [0, 1], [0, 1], [0, 1]]
    assert int(model.num_values(alt, lengths)) == int(where.sum()) == 2 * 2 + 4 * 1
    zeroed = model.alter(features, alt._replace(treatment=torch.tensor([0]), band_width=torch.tensor([0])), lengths,
                         None)
    assert zeroed[0, 1:3].abs().sum() == 0 and torch.equal(zeroed[0, 3:], features[0, 3:])


def test_tera_l1_by_hand() -> None:
    """The loss counts |prediction - target| at the span frames (every channel) and at the
    band's channels of the other valid frames, nothing on padding; ``baseline/l1`` the same
    error of each channel's utterance mean."""
    cfg = M.tera_laptop()
    cfg.frontend.n_mels = 2
    model = build_pretraining_model(cfg).eval()
    torch.manual_seed(0)
    source = torch.randn(2, 1600)
    pad = torch.zeros(2, 1600, dtype=torch.bool)
    pad[1, 800:] = True
    _, _, lengths = model.encoder.extract_features(source, pad)
    num_frames, short = int(lengths[0]), int(lengths[1])
    assert short < num_frames
    time = torch.zeros(2, num_frames, dtype=torch.bool)
    time[:, 1:3] = True
    alt = Alterations(time=time, treatment=torch.tensor([0, 2]), shift=torch.tensor([1, 1]),
                      band_start=torch.tensor([1, 0]), band_width=torch.tensor([1, 0]), noisy=torch.tensor([False, False]))
    out = model(source, pad, alterations=alt)
    err, target = (out.predictions - out.targets).abs(), out.targets
    mean = target[0].mean(dim=0), target[1, :short].mean(dim=0)
    # utterance 0: frames 1, 2 whole, channel 1 of the others; utterance 1 (no band): frames 1, 2 only
    others = [t for t in range(num_frames) if t not in (1, 2)]
    expected = float(err[0, 1:3].sum() + err[0, others, 1].sum() + err[1, 1:3].sum())
    baseline = float((target[0, 1:3] - mean[0]).abs().sum() + (target[0, others, 1] - mean[0][1]).abs().sum()
                     + (target[1, 1:3] - mean[1]).abs().sum())
    assert float(out.loss_sum) == pytest.approx(expected, rel=1e-5)
    assert float(out.baseline_sum) == pytest.approx(baseline, rel=1e-5)
    assert int(out.num_values) == 2 * 2 + len(others) + 2 * 2 and int(out.num_frames) == num_frames + 2


def test_deltas_by_hand() -> None:
    x = torch.tensor([0.0, 1.0, 4.0, 9.0, 16.0]).view(1, 5, 1)
    d = regression_delta(x, torch.tensor([4]))[0, :, 0]
    # (1 (x[t+1] - x[t-1]) + 2 (x[t+2] - x[t-2])) / 10, edges repeated
    assert d.tolist() == pytest.approx([(1 + 2 * 4) / 10, (4 + 2 * 9) / 10, 4.0, (16 - 4 + 2 * (16 - 1)) / 10,
                                        (16 - 9 + 2 * (16 - 4)) / 10])
    short = regression_delta(x, torch.tensor([2]))[0, :, 0]  # 3 valid frames: the last repeats frame 2
    assert short[2].item() == pytest.approx((4 - 1 + 2 * (4 - 0)) / 10)
    frames = torch.randn(2, 3, 2 * 3 * 4)  # stack 2, deltas 2, 4 mels
    static = static_channels(frames, n_mels=4, deltas=2, stack=2)
    torch.testing.assert_close(static, torch.cat([frames[..., 0:4], frames[..., 12:16]], dim=-1))


# --- components -------------------------------------------------------------------------------


def test_valid_group_norm_is_group_norm_and_ignores_padding() -> None:
    torch.manual_seed(0)
    norm = ValidGroupNorm(2, 4)
    ref = torch.nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 7)
    torch.testing.assert_close(norm(x), ref(x))
    padded = torch.cat([x[:1, :, :5], torch.full((1, 4, 2), 100.0)], dim=2)
    torch.testing.assert_close(norm(padded, torch.tensor([5]))[:, :, :5], ref(x[:1, :, :5]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal_conv", "gru"])
def test_context_networks_are_causal_and_padding_invariant(kind: str) -> None:
    torch.manual_seed(0)
    net = (CausalConvContext(in_dim=8, dim=16, num_layers=4, dropout=0.0, activation="relu") if kind == "causal_conv"
           else GRUContext(in_dim=8, dim=16, num_layers=3, dropout=0.0)).eval()
    x = torch.randn(1, 20, 8)
    later = x.clone()
    later[:, 12:] = torch.randn(1, 8, 8)
    pad = torch.zeros(1, 20, dtype=torch.bool)
    pad[:, 12:] = True
    # Frames after t as padding: nothing of them reaches frame t, and the output is the
    # utterance's own, as if it were alone.
    torch.testing.assert_close(net(x, pad)[:, :12], net(later, pad)[:, :12])
    torch.testing.assert_close(net(later, pad)[:, :12], net(later[:, :12]), rtol=1e-5, atol=1e-5)
    changed = (net(x)[:, :12] - net(later)[:, :12]).abs().max()
    if kind == "gru":
        assert changed == 0  # strictly causal
    else:
        # fairseq's GroupNorm takes its statistics over the whole utterance: the only way later
        # frames reach frame t (a shift of the statistics, no frame's content).
        assert 0 < changed < 1.0
    assert net.out_dim == 16 and len(net.layers) == (4 if kind == "causal_conv" else 3)


def test_wav2vec_front_end_shapes_and_padding() -> None:
    cfg = M.wav2vec()
    fe = Wav2VecFeatureEncoder([[16, k, s] for _, k, s in cfg.encoder.conv_layers], activation="relu")
    assert fe.receptive_field == 465 and fe.stride == 160 and prediction_offset(cfg) == 3
    torch.manual_seed(0)
    x = torch.randn(1, 16000)
    alone = fe(x[:, :12000])
    assert alone.shape == (1, int(fe.output_lengths(torch.tensor(12000))), 16) and bool((alone >= 0).all())
    padded = fe(torch.cat([x[:, :12000], torch.zeros(1, 4000)], dim=1), torch.tensor([12000]))
    torch.testing.assert_close(padded[:, : alone.shape[1]], alone, rtol=1e-4, atol=1e-5)


# --- configs, tokens, exports --------------------------------------------------------------------


def test_configs_that_cannot_train_are_refused() -> None:
    with pytest.raises(ValueError, match=r"objective=wav2vec: it predicts frames after t.*'transformer'"):
        M.ModelConfig(objective="wav2vec")
    with pytest.raises(ValueError, match=r"objective=apc: it reconstructs the log-mel.*'conv'"):
        M.ModelConfig(objective="apc", transformer=M.TransformerConfig(kind="gru", layerdrop=0.0))
    with pytest.warns(UserWarning, match="model.transformer.layerdrop=0.05: ignored, the gru context network"):
        M.TransformerConfig(kind="gru")
    with pytest.raises(ValueError, match="absolute_positions: the causal_conv context network has no positions"):
        M.TransformerConfig(kind="causal_conv", layerdrop=0.0, absolute_positions=True)
    with pytest.raises(ValueError, match="model.encoder.activation='relu': only the wav2vec mode"):
        M.FeatureEncoderConfig(activation="relu")
    with pytest.raises(ValueError, match="model.tera.zero_prob"):
        M.TeraConfig(zero_prob=0.95, replace_prob=0.1)


@pytest.mark.parametrize("kind", ["gumbel", "kmeans"])
def test_vq_wav2vec_tokens(kind: str) -> None:
    cfg = M.vq_wav2vec_laptop() if kind == "gumbel" else M.vq_wav2vec_kmeans_laptop()
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    source = torch.randn(2, 8000)
    pad = torch.zeros(2, 8000, dtype=torch.bool)
    pad[1, 6000:] = True
    ids, lengths = model.tokens(source, pad)  # in train mode: no Gumbel noise all the same
    assert ids.shape == (2, 48, cfg.vq_wav2vec.groups) and lengths.tolist() == [48, 35]
    assert bool((ids[1, 35:] == -1).all()) and bool((ids[:, :35] >= 0).all() and (ids < 32).all())
    again, _ = model.tokens(source, pad)
    assert torch.equal(ids, again)
    out = model.eval()(source, pad, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.codes[0], ids[0]) and torch.equal(out.codes[1, :35], ids[1, :35])
    with pytest.raises(ValueError, match="no quantizer"):
        build_pretraining_model(M.wav2vec_laptop()).tokens(source)


def test_gumbel_shared_codebook_and_mlp() -> None:
    model = build_pretraining_model(M.vq_wav2vec())
    q = model.quantizer
    assert tuple(q.codevectors.shape) == (1, 320, 256)  # one codebook of 320, each group's half of 512
    assert [tuple(m.weight.shape) for m in q.weight_proj if hasattr(m, "weight")] == [(1024, 512), (640, 1024)]


def _gumbel_choices_that_follow_the_input(cfg: M.ModelConfig, seed: int) -> float:
    """Share of the training (Gumbel-noised) choices of a fresh model that are the noiseless argmax."""
    torch.manual_seed(seed)
    model = build_pretraining_model(cfg)
    source = torch.randn(4, 16000, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        features = model.encoder.extract_features(source, None)[0]
        best = model.quantizer.logits(features).argmax(dim=-1)  # (B, T, G)
        noisy = model.quantizer.train()(features, generator=torch.Generator().manual_seed(seed)).codes
    return (noisy == best).float().mean().item()


def test_the_laptop_gumbel_choices_follow_the_input_from_the_start() -> None:
    """The choice is argmax(logits + Gumbel noise) at any temperature: with the recipe's MLP at
    the laptop width the logits barely vary, the choices are noise (1 in 32 by chance) and the
    laptop run collapses; the laptop preset's N(0, 1) Linear lets a good share follow the input."""
    laptop = M.vq_wav2vec_laptop()
    recipe_mlp = M.vq_wav2vec_laptop()
    recipe_mlp.vq_wav2vec.proj_depth = M.vq_wav2vec().vq_wav2vec.proj_depth
    assert recipe_mlp.vq_wav2vec.proj_depth == 2 and laptop.vq_wav2vec.proj_depth == 1
    for seed in range(3):
        assert _gumbel_choices_that_follow_the_input(recipe_mlp, seed) < 0.08
        assert _gumbel_choices_that_follow_the_input(laptop, seed) > 0.2


def _sweeps(seed: int, rows: int = 4, samples: int = 16000) -> torch.Tensor:
    """(rows, samples) pitch sweeps in noise, switched on and off a few times a second, normalised."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    out = []
    for _ in range(rows):
        f0, rate, phase = 100 + 200 * torch.rand((), generator=g), 3 + 5 * torch.rand((), generator=g), 6 * torch.rand(
            (), generator=g)
        on = (torch.sin(2 * math.pi * rate * t + phase) > 0).float()
        x = (torch.sin(2 * math.pi * f0 * t * (1 + t)) + 0.3 * torch.randn(samples, generator=g)) * on
        out.append((x - x.mean()) / x.std())
    return torch.stack(out)


def _kmeans_codewords_in_use(cfg: M.ModelConfig, seed: int, updates: int = 80) -> list[int]:
    """Codewords of each group that a k-means vq-wav2vec model picks on fresh audio after
    ``updates`` Adam updates at the laptop preset's learning rate."""
    torch.manual_seed(seed)
    model = build_pretraining_model(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    for step in range(updates):
        out = model(_sweeps(1000 * seed + step), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        (out.loss_sum / out.num_predictions).backward()
        opt.step()
    ids, _ = model.tokens(_sweeps(10**6 + seed, rows=8))
    return [len(ids[..., g].unique()) for g in range(ids.shape[-1])]


def test_the_laptop_kmeans_codebook_does_not_collapse() -> None:
    """With the recipe's codewords (N(0, 0.01^2)) and loss weight (1) at the laptop width, every
    frame picks one codeword per group within 80 updates; the laptop preset's (unit-scale
    codewords, the recipe's weight per frame) keeps several in use in each group."""
    laptop = M.vq_wav2vec_kmeans_laptop()
    recipe = M.vq_wav2vec_kmeans_laptop()
    recipe.vq_wav2vec.codebook_std = M.vq_wav2vec_kmeans().vq_wav2vec.codebook_std
    recipe.vq_wav2vec.kmeans_weight = M.vq_wav2vec_kmeans().vq_wav2vec.kmeans_weight
    assert (recipe.vq_wav2vec.codebook_std, recipe.vq_wav2vec.kmeans_weight) == (0.01, 1.0)
    assert (laptop.vq_wav2vec.codebook_std, laptop.vq_wav2vec.kmeans_weight) == (1.0, 32 / 512)
    for seed in range(2):
        assert _kmeans_codewords_in_use(recipe, seed) == [1, 1]
        used = _kmeans_codewords_in_use(laptop, seed)
        assert min(used) >= 2 and sum(used) >= 6, used


def test_the_gumbel_argmax_share_sees_targets_that_ignore_the_input() -> None:
    """Logits that do not depend on the frame: the noisy training choices still vary, but every
    frame's argmax is the same codeword (share 1; the step's collapse alarm watches it); a
    fresh laptop model's argmax spreads over the codebook. Padded frames are not counted."""
    torch.manual_seed(0)
    model = build_pretraining_model(M.vq_wav2vec_laptop()).train()
    source = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 9000:] = True
    fresh = model(source, pad, generator=torch.Generator().manual_seed(0))
    valid = ~fresh.padding_mask
    for g in range(model.num_groups):
        ids = model.tokens(source, pad)[0][..., g][valid]
        expected = torch.bincount(ids, minlength=32).max().item() / ids.numel()
        assert float(fresh.argmax_share[g]) == pytest.approx(expected) and expected < 0.9
    q = model.quantizer
    with torch.no_grad():
        q.weight_proj.weight.zero_()
        q.weight_proj.bias.copy_(torch.linspace(0, 1, q.weight_proj.bias.numel()))  # each group's last codeword
    out = model(source, pad, generator=torch.Generator().manual_seed(0))
    assert out.argmax_share.tolist() == [1.0] * model.num_groups
    assert all(len(out.codes[..., g][valid].unique()) > 8 for g in range(model.num_groups)), "the noise still varies"


@pytest.mark.parametrize("preset", LAPTOPS)
def test_no_hugging_face_class_and_a_ctc_head_fits(preset: str) -> None:
    cfg = M.PRESETS[preset]()
    assert hf_unsupported(cfg)
    torch.manual_seed(0)
    pre = build_pretraining_model(cfg)
    assert not any(name.startswith("head.") for name in pre.state_dict())  # 'head' marks a CTC model
    ctc = build_ctc_model(cfg, 5)
    ctc.load_encoder_state_dict(pre.state_dict())
    out = ctc.eval()(torch.randn(2, 8000))
    assert out.logits.shape[-1] == 5 and out.logits.shape[1] == int(out.output_lengths[0])
