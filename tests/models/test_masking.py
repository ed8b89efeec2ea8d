"""Span masks and distractors: fairseq's statistics, padding, and the distractor rules."""

from __future__ import annotations

import pytest
import torch

from models.feature_encoder import FeatureEncoder
from models.masking import compute_channel_mask, compute_span_mask, frame_padding_mask, sample_negatives


def _runs(mask: torch.Tensor) -> torch.Tensor:
    """Mean length of the runs of True per row (contiguous masked stretches)."""
    x = mask.long()
    starts = (x[:, 1:] - x[:, :-1] == 1).sum() + x[:, 0].sum()
    return mask.sum() / starts


def test_mask_statistics_match_spec():
    """mask_prob 0.65, length 10, 500 frames: ~49% masked, mean stretch ~14.7 frames (SPEC.md)."""
    gen = torch.Generator().manual_seed(0)
    mask = compute_span_mask((400, 500), mask_prob=0.65, mask_length=10, min_masks=2, generator=gen)
    fraction = mask.float().mean().item()
    assert 0.475 < fraction < 0.505, fraction
    assert 13.5 < _runs(mask).item() < 16.0
    # per-row counts vary (probabilistic rounding + overlap): rows are not trimmed to one size
    assert mask.sum(1).unique().numel() > 5


def test_padding_is_never_masked_and_short_rows_get_min_masks():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([500, 300, 40, 12, 0])
    mask = compute_span_mask((5, 500), mask_prob=0.65, mask_length=10, min_masks=2, lengths=lengths, generator=gen)
    pad = frame_padding_mask(500, lengths)
    assert not (mask & pad).any()
    assert mask[4].sum() == 0
    # 40 frames: int(0.65 * 40 / 10 + u) is 2 or 3 spans; at least 10 frames masked, never all
    assert 10 <= mask[2].sum() < 40
    assert 0 < mask[3].sum() <= 12
    fractions = mask[:2].float().sum(1) / lengths[:2]
    assert ((fractions > 0.3) & (fractions < 0.7)).all(), fractions


def test_masks_are_reproducible_from_the_generator():
    def draw(seed: int) -> torch.Tensor:
        return compute_span_mask(
            (4, 200), mask_prob=0.65, mask_length=10, min_masks=2, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_negatives_come_from_other_masked_frames_of_the_same_utterance():
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([120, 80, 120])
    mask = compute_span_mask((3, 120), mask_prob=0.65, mask_length=10, min_masks=2, lengths=lengths, generator=gen)
    neg = sample_negatives(mask, 100, generator=gen)
    assert neg.shape == (3, 120, 100) and neg.dtype == torch.long
    for b in range(3):
        frames = mask[b].nonzero().squeeze(1)
        picked = neg[b, frames]  # (M, K)
        # only masked frames of this utterance (hence never padding) ...
        assert mask[b][picked].all()
        # ... and never the target itself
        assert not (picked == frames.unsqueeze(1)).any()
        # uniform over the other masked frames: every one is used, none dominates
        counts = torch.bincount(picked.flatten(), minlength=120)[frames].float()
        expected = picked.numel() / frames.numel()
        assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected


def test_single_masked_frame_has_no_distractor_but_itself():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 4] = True
    neg = sample_negatives(mask, 5, generator=torch.Generator().manual_seed(0))
    assert (neg[0, 4] == 4).all()


def test_channel_mask_has_spans_and_no_minimum():
    gen = torch.Generator().manual_seed(5)
    mask = compute_channel_mask(64, 768, mask_prob=0.5, mask_length=64, generator=gen)
    assert mask.shape == (64, 768)
    assert 0.25 < mask.float().mean().item() < 0.5
    assert not compute_channel_mask(8, 768, mask_prob=0.0, mask_length=64, generator=gen).any()


@pytest.mark.parametrize("num_samples", [400, 401, 719, 720, 16000, 250_000])
def test_output_lengths_match_the_convolutions(num_samples):
    encoder = FeatureEncoder([[4, 10, 5]] + [[4, 3, 2]] * 4 + [[4, 2, 2]] * 2)
    with torch.no_grad():
        frames = encoder(torch.zeros(1, num_samples)).shape[1]
    assert int(encoder.output_lengths(torch.tensor(num_samples))) == frames
    assert int(encoder.output_lengths(torch.tensor(399))) == 0
