"""HuBERT's loss and head, and WavLM's gated relative position bias, against hand computations.

- The cosine head's logits and the cross-entropy of a 3-cluster case whose numbers are
  worked out on paper.
- The model's loss: cross-entropy over masked frames only (targets of unmasked frames do
  not count), plus the feature penalty per masked frame, recomputed from the model's own
  context and features with explicit formulas.
- The distance buckets and the gate of WavLM's bias, against their definitions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import config as C
from models.factory import build_pretraining_model
from models.hubert import CosineHead
from models.masking import compute_span_mask
from models.transformer import RelativePositionGate, relative_position_buckets


def test_cosine_head_logits_and_loss_of_a_case_worked_by_hand() -> None:
    head = CosineHead(2, 2, 3, logit_temp=0.1)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(2))
        head.proj.bias.zero_()
        head.label_embeddings.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5], [-1.0, 0.0]]))
    logits = head(torch.tensor([[[1.0, 1.0]]]))  # (1, 1, 3): h at 45 degrees
    c = 1 / math.sqrt(2)  # its cosine with the first two embeddings; minus that with the third
    torch.testing.assert_close(logits, torch.tensor([[[c / 0.1, c / 0.1, -c / 0.1]]]))
    ce = F.cross_entropy(logits.view(1, 3), torch.tensor([0]))
    # -log(e^{10c} / (2 e^{10c} + e^{-10c})) = log(2 + e^{-20c})
    assert ce.item() == pytest.approx(math.log(2 + math.exp(-20 * c)), rel=1e-6)


def _hubert(**loss):
    cfg = C.hubert_laptop()
    cfg.hubert = C.HubertConfig(clusters=7)
    cfg.loss.feature_penalty_weight = loss.get("penalty", 0.0)
    torch.manual_seed(0)
    return cfg, build_pretraining_model(cfg).eval()


def _inputs(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(2, 9600, generator=gen)
    frames = int(model.encoder.feature_encoder.output_lengths(torch.tensor(9600)))
    mask = compute_span_mask((2, frames), mask_prob=0.5, mask_length=3, min_masks=2,
                             lengths=torch.tensor([frames, frames]), generator=gen)
    targets = torch.randint(0, 7, (2, frames, 1), generator=gen)
    return source, mask, targets


def test_loss_is_the_masked_cross_entropy_of_the_cosine_logits_plus_the_feature_penalty() -> None:
    cfg, model = _hubert(penalty=10.0)
    source, mask, targets = _inputs(model)
    with torch.no_grad():
        out = model(source, mask_time_indices=mask, target_ids=targets)
        features, _, _ = model.encoder.extract_features(source, None)
    head = model.prediction_head
    proj = out.last_hidden_state @ head.proj.weight.T + head.proj.bias  # (B, T, F)
    by_hand = 0.0
    for b, t in mask.nonzero().tolist():
        cos = torch.stack([F.cosine_similarity(proj[b, t], e, dim=0) for e in head.label_embeddings])  # (K,)
        logits = cos / cfg.loss.logit_temp
        by_hand += -(logits[targets[b, t, 0]] - torch.logsumexp(logits, dim=0)).item()
    n = int(mask.sum())
    penalty = features.pow(2).mean().item()
    assert out.num_masked.item() == n
    assert out.ce_sum.item() == pytest.approx(by_hand, rel=1e-5)
    assert out.feature_penalty.item() == pytest.approx(penalty, rel=1e-5)
    assert out.loss_sum.item() == pytest.approx(by_hand + n * 10.0 * penalty, rel=1e-5)


def test_only_masked_frames_count_and_targets_are_required() -> None:
    _, model = _hubert()
    source, mask, targets = _inputs(model, seed=1)
    with torch.no_grad():
        base = model(source, mask_time_indices=mask, target_ids=targets).loss_sum
        other = targets.clone()
        other[~mask] = (other[~mask] + 1) % 7  # unmasked frames' targets changed: same loss
        assert model(source, mask_time_indices=mask, target_ids=other).loss_sum.item() == pytest.approx(base.item())
        other = targets.clone()
        other[mask] = (other[mask] + 1) % 7  # masked frames' targets changed: another loss
        assert model(source, mask_time_indices=mask, target_ids=other).loss_sum.item() != pytest.approx(base.item())
        with pytest.raises(ValueError, match="labels given with the batch"):
            model(source, mask_time_indices=mask)
        with pytest.raises(ValueError, match="target_ids"):
            model(source, mask_time_indices=mask, target_ids=targets[:, :-1])


def test_relative_position_buckets_follow_their_definition() -> None:
    buckets = relative_position_buckets(300, 32, 40, torch.device("cpu"))  # 16 per side, 8 exact
    rel = [0, 1, 7, 8, 20, 39, 40, 299, -1, -7, -8, -20, -299]
    for r in rel:
        d = abs(r)
        side = 16 if r > 0 else 0
        if d < 8:
            expect = side + d
        else:
            expect = side + min(15, 8 + int(math.log(d / 8) / math.log(40 / 8) * 8))
        i, j = (0, r) if r >= 0 else (-r, 0)
        assert buckets[i, j].item() == expect, f"distance {r}"


def test_the_gate_is_wavlms_formula() -> None:
    torch.manual_seed(0)
    gate = RelativePositionGate(head_dim=4, num_heads=2)
    with torch.no_grad():
        gate.const.copy_(torch.tensor([0.5, 2.0]).view(1, 2, 1, 1))
    x = torch.randn(1, 3, 8)  # (B, T, H * Dh)
    got = gate(x)  # (B, H, T, 1)
    for h in range(2):
        for t in range(3):
            z = gate.linear(x[0, t, 4 * h: 4 * h + 4])  # (8,)
            a, b = torch.sigmoid(z[:4].sum()), torch.sigmoid(z[4:].sum())
            expect = a * (b * gate.const[0, h, 0, 0] - 1) + 2
            assert got[0, h, t, 0].item() == pytest.approx(expect.item(), rel=1e-6)


def test_a_gated_encoder_differs_from_the_plain_one_only_by_its_bias() -> None:
    """With a zero bias table the gate multiplies zero: the gated encoder computes exactly
    what the same weights compute without it."""
    plain, gated = C.hubert_laptop(), C.wavlm_laptop()
    torch.manual_seed(0)
    a = build_pretraining_model(plain).eval()
    torch.manual_seed(0)
    b = build_pretraining_model(gated).eval()
    with torch.no_grad():
        b.encoder.transformer.relative_embedding.weight.zero_()
    b.load_state_dict(a.state_dict(), strict=False)
    x = torch.randn(1, 8000)
    with torch.no_grad():
        ha = a.encoder.transformer(a.encoder.feature_projection(a.encoder.extract_features(x, None)[0])[0])
        hb = b.encoder.transformer(b.encoder.feature_projection(b.encoder.extract_features(x, None)[0])[0])
    torch.testing.assert_close(ha, hb)
