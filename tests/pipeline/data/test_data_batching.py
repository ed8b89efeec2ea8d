"""Batch planning on lengths: the budget holds, nothing is lost or doubled, counts are fixed."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.batching import (
    BatchSpec,
    assemble,
    count_batches,
    crop_offsets,
    normalize,
    padding_mask,
    plan_batches,
    spread_extra_splits,
)

LENGTHS = np.random.default_rng(0).integers(2_000, 120_000, size=400)


def _spec(mode: str, **kw) -> BatchSpec:
    args = dict(max_sample_size=48_000, min_sample_size=8_000, max_samples_per_batch=192_000,
                batch_mode=mode, num_buckets=4)
    args.update(kw)
    return BatchSpec(**args)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_every_kept_utterance_in_exactly_one_batch_within_budget(mode: str) -> None:
    batches = plan_batches(LENGTHS, _spec(mode), np.random.default_rng(0))
    rows = np.concatenate([b.rows for b in batches])
    assert len(rows) == len(set(rows.tolist()))
    assert set(rows.tolist()) == set(np.flatnonzero(LENGTHS >= 8_000).tolist())
    for b in batches:
        assert len(b.rows) * b.length <= 192_000
        assert (b.lengths <= np.minimum(LENGTHS[b.rows], 48_000)).all()
        if mode == "crop":
            assert (b.lengths == b.length).all()
            assert b.length == min(LENGTHS[b.rows].min(), 48_000)
        else:
            np.testing.assert_array_equal(b.lengths, np.minimum(LENGTHS[b.rows], 48_000))


def test_buckets_keep_little_audio_cropped_away() -> None:
    kept = np.minimum(LENGTHS[LENGTHS >= 8_000], 48_000).sum()
    rng = np.random.default_rng(0)
    delivered = sum(int(b.lengths.sum()) for b in plan_batches(LENGTHS, _spec("crop"), rng))
    unbucketed = sum(int(b.lengths.sum()) for b in plan_batches(LENGTHS, _spec("crop", num_buckets=1), rng))
    assert delivered > 0.75 * kept
    assert delivered > unbucketed


def test_composition_changes_with_the_seed_but_the_count_does_not() -> None:
    a, b, c = (plan_batches(LENGTHS, _spec("crop"), np.random.default_rng(s)) for s in (1, 1, 2))
    assert [x.rows.tolist() for x in a] == [x.rows.tolist() for x in b]
    assert [x.rows.tolist() for x in a] != [x.rows.tolist() for x in c]
    assert len(a) == len(c) == count_batches(LENGTHS, _spec("crop"))[0]


@pytest.mark.parametrize("n", [2, 3, 8])
def test_extra_splits_make_the_epoch_a_multiple_of_the_workers(n: int) -> None:
    units = [LENGTHS[i::5] for i in range(5)]
    spec = _spec("pad")
    counts = [count_batches(u, spec) for u in units]
    extra = spread_extra_splits(counts, n)
    plans = [plan_batches(u, spec, np.random.default_rng(i), extra_splits=e)
             for i, (u, e) in enumerate(zip(units, extra, strict=True))]
    assert sum(len(p) for p in plans) % n == 0
    assert sum(extra) < n
    for u, p in zip(units, plans, strict=True):
        rows = np.concatenate([b.rows for b in p])
        assert len(rows) == len(set(rows.tolist())) == int((u >= 8_000).sum())
        assert all(len(b.rows) * b.length <= 192_000 for b in p)


def test_extra_splits_need_room() -> None:
    # one unit of a single utterance and one of two that fit one batch: one split possible
    assert spread_extra_splits([(1, 0), (1, 1)], 2) == [0, 0]
    assert spread_extra_splits([(1, 0), (1, 1), (1, 0)], 2) == [0, 1, 0]
    assert spread_extra_splits([(1, 0), (2, 0), (2, 0)], 2) == [0, 0, 0]  # no room: stays odd


def test_crops_assembly_and_padding_mask() -> None:
    rng = np.random.default_rng(3)
    num = np.array([100, 50, 70])
    lengths = np.array([60, 50, 10])
    offsets = crop_offsets(num, lengths, rng)
    assert ((offsets >= 0) & (offsets + lengths <= num)).all()
    segs = [np.full(n, i + 1, np.float32) for i, n in enumerate(lengths)]
    x = assemble(segs, 60)  # (B, S)
    mask = padding_mask(lengths, 60)
    assert x.shape == mask.shape == (3, 60)
    assert (x[mask] == 0).all() and (x[~mask] > 0).all()
    assert mask.sum(axis=1).tolist() == [0, 10, 50]
    with pytest.raises(ValueError):
        crop_offsets(np.array([5]), np.array([6]), rng)


def test_normalize_gives_zero_mean_unit_variance() -> None:
    y = normalize(3.0 + 2.0 * np.random.default_rng(0).standard_normal(16000).astype(np.float32))
    assert abs(float(y.mean())) < 1e-4 and float(y.std()) == pytest.approx(1.0, abs=1e-3)
    assert np.isfinite(normalize(np.zeros(100, np.float32))).all()


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_mode"):
        _spec("stretch")
    with pytest.raises(ValueError, match="max_samples_per_batch"):
        _spec("crop", max_samples_per_batch=1000)
