"""Batches planned on metadata before any audio is decoded, then assembled from crops.

Planning (:func:`plan_batches`) sees only utterance lengths. It drops utterances below
``min_sample_size``, caps the rest at ``max_sample_size`` (the random crop), and sorts
them into ``num_buckets`` length buckets (quantiles of the unit's capped lengths). A
bucket whose longest item has L samples holds ``max_samples_per_batch // L`` items per
batch, so every batch stays within the budget whatever its members:

* ``crop`` mode: every item is cropped to the batch's shortest, cost = B x shortest;
* ``pad`` mode: items keep their (capped) length and are zero-padded to the longest,
  cost = B x longest, with a padding mask.

Each epoch shuffles every bucket before cutting it into its batches, and shuffles the
batch order, so batch composition changes from epoch to epoch; the NUMBER of batches of
a unit depends on the lengths alone (:func:`count_batches`). That is what lets the
driver make every epoch's batch count a multiple of the number of training workers
before any audio is read (``streaming_split(equal=True)`` drops the remainder
otherwise), and what makes a batch's ``(epoch, shard, batch_index)`` key stable across
a restart: the plan is a pure function of the lengths and a seed.

Before planning, a multilingual unit may be resampled (:func:`language_ratios`,
:func:`resample_rows`): XLSR's language balancing, p(language) proportional to
(hours)^alpha, done as a seeded number of copies of each utterance per epoch. It too sees
only metadata and a seed, so the plan stays a pure function of them.

Assembly (:func:`crop_offsets`, :func:`assemble`) turns a planned batch and decoded
segments into the ``(B, S)`` array the model takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlannedBatch:
    rows: np.ndarray
    """Row indices into the unit's utterances, shape (B,)."""
    lengths: np.ndarray
    """Samples each item contributes (crop mode: all equal the batch length), shape (B,)."""

    @property
    def length(self) -> int:
        """S: the padded width of the batch."""
        return int(self.lengths.max())


@dataclass(frozen=True)
class BatchSpec:
    """What decides a plan, besides the lengths and the seed (the ``data`` config)."""

    max_sample_size: int
    min_sample_size: int
    max_samples_per_batch: int
    batch_mode: str
    num_buckets: int

    def __post_init__(self) -> None:
        if self.batch_mode not in ("crop", "pad"):
            raise ValueError(f"data.batch_mode: expected 'crop' or 'pad', got {self.batch_mode!r}")
        if self.max_samples_per_batch < self.max_sample_size:
            raise ValueError(
                f"data.max_samples_per_batch ({self.max_samples_per_batch}) must hold one utterance of "
                f"data.max_sample_size ({self.max_sample_size})"
            )


def _buckets(num_samples: np.ndarray, spec: BatchSpec) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """(capped lengths, [(rows of a bucket, batches it makes)]), from the lengths alone."""
    num_samples = np.asarray(num_samples, dtype=np.int64)
    capped = np.minimum(num_samples, spec.max_sample_size)
    rows = np.flatnonzero(num_samples >= max(1, spec.min_sample_size))
    if len(rows) == 0:
        return capped, []
    kept = capped[rows]
    if spec.num_buckets > 1:
        edges = np.unique(np.quantile(kept, np.linspace(0, 1, spec.num_buckets + 1)[1:-1], method="lower"))
        bucket = np.searchsorted(edges, kept, side="left")
    else:
        bucket = np.zeros(len(rows), dtype=np.int64)
    out = []
    for b in np.unique(bucket):
        members = rows[bucket == b]
        per_batch = max(1, spec.max_samples_per_batch // int(capped[members].max()))
        out.append((members, -(-len(members) // per_batch)))
    return capped, out


def count_batches(num_samples: np.ndarray, spec: BatchSpec) -> tuple[int, int]:
    """(batches of a unit, rows beyond one per batch): the room for extra splits."""
    _, buckets = _buckets(num_samples, spec)
    batches = sum(k for _, k in buckets)
    return batches, sum(len(m) for m, _ in buckets) - batches


def plan_batches(
    num_samples: np.ndarray, spec: BatchSpec, rng: np.random.Generator, *, extra_splits: int = 0
) -> list[PlannedBatch]:
    """Plan the batches of one unit (one shard in one epoch) from utterance lengths.

    ``extra_splits``: split the fullest batch this many times (the driver's way of making
    an epoch's batch count a multiple of the number of workers).
    """
    capped, buckets = _buckets(num_samples, spec)
    batches: list[PlannedBatch] = []
    for members, k in buckets:
        for part in np.array_split(rng.permutation(members), k):
            batches.append(_batch(part, capped[part], spec.batch_mode))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    for _ in range(extra_splits):
        i = max(range(len(batches)), key=lambda j: len(batches[j].rows), default=None)
        if i is None or len(batches[i].rows) < 2:
            break
        b, half = batches[i], len(batches[i].rows) // 2
        batches[i:i + 1] = [_batch(b.rows[:half], capped[b.rows[:half]], spec.batch_mode),
                            _batch(b.rows[half:], capped[b.rows[half:]], spec.batch_mode)]
    return batches


def _batch(rows: np.ndarray, capped: np.ndarray, batch_mode: str) -> PlannedBatch:
    lengths = np.full(len(rows), capped.min()) if batch_mode == "crop" else capped.copy()
    return PlannedBatch(rows=rows.astype(np.int64), lengths=lengths.astype(np.int64))


def spread_extra_splits(counts: list[tuple[int, int]], multiple_of: int) -> list[int]:
    """Extra splits per unit so that the batches of all ``counts`` units sum to a multiple.

    ``counts``: (batches, spare rows) per unit, as :func:`count_batches` gives. Splits go
    one per unit, roomiest first; when there is not enough room the sum stays short.
    """
    extra = [0] * len(counts)
    needed = (-sum(c for c, _ in counts)) % multiple_of
    order = sorted(range(len(counts)), key=lambda i: (-counts[i][1], i))
    while needed:
        progressed = False
        for i in order:
            if needed and counts[i][1] > extra[i]:
                extra[i] += 1
                needed -= 1
                progressed = True
        if not progressed:
            break
    return extra


def language_ratios(hours: dict[str, float], alpha: float) -> dict[str, float]:
    """Copies per utterance, in expectation, of each language: XLSR's balancing.

    A language of ``h`` hours out of ``H`` is drawn with probability
    ``p = h^alpha / sum(h'^alpha)`` (Conneau et al. 2020, eq. 1); giving each of its
    utterances ``p * H / h`` copies per epoch makes its share of the epoch's hours ``p``
    while the epoch keeps ``H`` hours. Empty when there is nothing to balance (fewer than
    two languages with hours, or ``alpha`` 1): the stream is then the data as it is,
    bit for bit.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"data.language_alpha: expected a value in [0, 1], got {alpha}")
    present = {lang: h for lang, h in sorted(hours.items()) if h > 0}
    if len(present) < 2 or alpha == 1.0:
        return {}
    h = np.array(list(present.values()), dtype=np.float64)
    p = h**alpha / (h**alpha).sum()
    return {lang: float(r) for lang, r in zip(present, p * h.sum() / h, strict=True)}


def resample_rows(ratios: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of a unit after resampling, sorted, with repeats: row ``i`` appears
    ``floor(r_i)`` or ``floor(r_i) + 1`` times with mean ``r_i`` (``ratios`` (N,)).

    Rounding each row up or down at random, rather than drawing rows with replacement,
    keeps every language's share of each epoch close to its target (the variance is that
    of N coin flips, not of a multinomial), and an upsampled language keeps all its rows.
    """
    ratios = np.asarray(ratios, dtype=np.float64)  # (N,)
    whole = np.floor(ratios)
    copies = (whole + (rng.random(len(ratios)) < ratios - whole)).astype(np.int64)  # (N,)
    return np.repeat(np.arange(len(ratios), dtype=np.int64), copies)


def crop_offsets(num_samples: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform random start of each item's crop, shape (B,)."""
    slack = np.asarray(num_samples, dtype=np.int64) - np.asarray(lengths, dtype=np.int64)
    if (slack < 0).any():
        raise ValueError(f"crop longer than its utterance: lengths {lengths} > num_samples {num_samples}")
    return (rng.random(len(slack)) * (slack + 1)).astype(np.int64)


def normalize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over one utterance (fairseq's layer norm over the wave)."""
    x = x.astype(np.float32, copy=False)
    mean = x.mean(dtype=np.float64)
    var = x.var(dtype=np.float64)
    return ((x - mean) / np.sqrt(var + 1e-5)).astype(np.float32)


def assemble(segments: list[np.ndarray], width: int) -> np.ndarray:
    """Stack 1-D segments into a zero-padded (B, S=width) float32 array."""
    out = np.zeros((len(segments), width), dtype=np.float32)  # (B, S)
    for i, seg in enumerate(segments):
        out[i, : len(seg)] = seg
    return out


def padding_mask(num_samples: np.ndarray, width: int) -> np.ndarray:
    """True at padded positions, shape (B, S)."""
    return np.arange(width)[None, :] >= np.asarray(num_samples)[:, None]
