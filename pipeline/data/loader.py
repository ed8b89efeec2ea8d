"""The training input: prepared shards -> ready batches, streamed to Ray Train workers.

Stages, each with the rows it produces:

1. units (driver, :func:`build_train_dataset`): the stream is the sequence of units
   ``(epoch, shard)`` for epochs ``0 .. data.max_epochs - 1``; epoch ``e`` visits the
   split's shards in the order of a permutation seeded by ``data.shuffle_seed + e``.
   A resumed run leaves out the units its position marks finished.
2. read + plan (a Ray Data read task per few units, ``data.decode_cpus`` each): read a
   shard's ``id, num_samples, audio`` columns; on a multilingual dataset, or when mixing
   labelled and unlabelled utterances, resample its rows (each row 0, 1 or more times,
   seeded by epoch and shard, :func:`pipeline.data.batching.resample_rows`; see
   "Resampling" below); plan its batches on
   lengths alone (:func:`pipeline.data.batching.plan_batches`, seeded by epoch and shard),
   and drop the batches the position marks consumed, all before decoding anything. A
   unit's batches are thus still a pure function of the metadata and the seeds, which is
   what keeps the position's keys, and so an exact resume, valid.
3. decode + crop (same task): for each planned batch, decode only each item's crop from
   its FLAC (random offset seeded by ``seed``, epoch, shard and batch), normalise per
   utterance when ``data.normalize``, and emit ONE row per batch::

       source (float32 bytes, B x S) | width S | num_samples list (B) | ids list (B)
       | epoch | shard | batch_index | num_batches | num_shards | plan
       [| languages list (B): on a split of two languages or more]

4. split (Ray Train): ``streaming_split(n, equal=True)`` hands each worker the same
   number of ready batches; collective ops hang otherwise.
5. worker (:func:`iter_train_batches`): rows -> dicts of numpy arrays
   ``source (B, S) float32``, ``padding_mask (B, S) bool``, ``num_samples (B,) int64``,
   plus ``ids`` and the position keys that :class:`DataPosition` records, and on a
   multilingual split ``languages`` (B,) str (each utterance's, "" for none), which the
   loop turns into per-language losses.

With a label set (HuBERT, ``labels=``), stage 3 also reads each shard's labels, starts
every crop on a label frame, and adds ``target_ids`` (B, T) at the model's frame rate
(:mod:`pipeline.data.labels` says how they stay aligned with the crops).

Resampling: a row's expected copies per epoch are its language's ratio (XLSR's balancing,
``data.language_alpha``: p(language) proportional to hours^alpha) times its label weight
(JUST's mix, ``data.labelled_ratio`` r: a row is labelled when its manifest ``transcript``
is not blank). With p the labelled share of the language-weighted rows long enough to
train on, labelled rows weigh ``r / p`` and the others ``(1 - r) / (1 - p)``: the expected
labelled share of the stream is r, and an epoch keeps its expected number of rows (and,
where every language has the same labelled share, each language its share of the hours).
The driver learns the hours by language and p in one pass over the manifest
(:func:`plan_resampling`), and reads the ``language`` and ``transcript`` columns only when
balancing or mixing needs them; the driver's batch counts and the read task's plans come
from the same per-row ratios (:func:`resample_ratios`) and the same seeds.

Batching happens before the split (not in each worker) so that every batch is built
from one shard's length buckets under the sample budget, and so that a batch is the
unit the data position counts. Ray Data's own iterators cannot resume mid-epoch
(ray-project/ray#49844, #37633); the keyed units above are how this one does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.data import labels as L
from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.data.audio import decode_segment
from pipeline.data.batching import (
    BatchSpec,
    count_batches,
    crop_offsets,
    language_ratios,
    normalize,
    padding_mask,
    plan_batches,
    resample_rows,
    spread_extra_splits,
)
from pipeline.data.position import (
    BATCH_INDEX,
    EPOCH,
    NUM_BATCHES,
    NUM_SHARDS,
    PLAN,
    SHARD_INDEX,
    DataPosition,
)

if TYPE_CHECKING:
    import ray.data

    from pipeline.config import DataConfig

# Units per read task grow with the shard count so that a huge dataset does not put
# epochs x shards read tasks in the object store at start-up (Ray puts each one).
MAX_READ_TASKS_PER_EPOCH = 256
BLOCK_BYTES = 4 << 20

# Columns of the batch rows (stage 3).
SOURCE = "source"
WIDTH = "width"
IDS = "ids"
NUM_SAMPLES = S.NUM_SAMPLES
PADDING_MASK = "padding_mask"
LANGUAGES = "languages"


# --- the prepared dataset ------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    path: str
    """Relative to the dataset root."""
    split: str
    num_rows: int
    num_samples: int
    num_bytes: int


@dataclass(frozen=True)
class DatasetInfo:
    """What ``summary.json`` says about a prepared dataset."""

    root: str
    version: str
    sample_rate: int
    shards: tuple[ShardInfo, ...]
    summary: dict[str, Any]

    def split(self, split: str) -> list[ShardInfo]:
        if split not in S.SPLITS:
            raise ValueError(f"split: expected one of {list(S.SPLITS)}, got {split!r}")
        return sorted((s for s in self.shards if s.split == split), key=lambda s: s.path)

    def uri(self, shard: ShardInfo) -> str:
        return storage.join(self.root, shard.path)


def read_dataset_info(uri: str, store: storage.Storage | None = None, *, wait: bool = False) -> DatasetInfo:
    """Read and check ``<uri>/summary.json``; errors name the file and what is missing.
    ``wait``: a store that cannot be reached is waited for (see :func:`storage.check_reachable`)."""
    if not uri:
        raise ValueError("data.train_uri: expected the root of a prepared dataset (jobs.prepare --output), got ''")
    storage.check_reachable(uri, store, wait=wait)
    path = storage.join(uri, S.SUMMARY_FILE)
    if not storage.exists(path, store):
        raise ValueError(f"data.train_uri: {path!r} does not exist; run `python -m jobs.prepare --output {uri}` first")
    summary = storage.read_json(path, store)
    try:
        shards = tuple(
            ShardInfo(
                path=s["path"], split=s["split"], num_rows=int(s["num_rows"]),
                num_samples=int(s["num_samples"]), num_bytes=int(s["num_bytes"]),
            )
            for s in summary["shards"]
        )
        return DatasetInfo(
            root=uri, version=str(summary["version"]), sample_rate=int(summary["sample_rate"]),
            shards=shards, summary=summary,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a wavray dataset summary ({type(e).__name__}: {e})") from None


# --- stage 1: units ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """The slice of DataConfig the read tasks need (small and picklable)."""

    sample_rate: int
    spec: BatchSpec
    normalize: bool
    shuffle_seed: int
    seed: int
    num_splits: int
    labels: L.LabelSpec | None = None
    """HuBERT's labels joined with every batch; None: audio only."""
    language_ratios: tuple[tuple[str, float], ...] = ()
    """Copies per utterance of each language ("" for none), empty when not balancing."""
    languages: bool = False
    """Carry each utterance's language in the batches (a split of two languages or more)."""
    labelled_ratio: float = 0.0
    """``data.labelled_ratio``; 0: labelled and unlabelled rows are read as they are."""
    label_weights: tuple[float, float] | None = None
    """Copies per utterance of a labelled and of an unlabelled row; None when not mixing."""

    @property
    def resampling(self) -> Resampling:
        return Resampling(dict(self.language_ratios), self.label_weights)

    def plan_hash(self) -> str:
        keyed: dict[str, Any] = {
            "spec": asdict(self.spec), "shuffle_seed": self.shuffle_seed, "num_splits": self.num_splits,
        }
        if self.language_ratios:  # absent when not balancing: plans made before it existed stay valid
            keyed["language_ratios"] = [[lang, round(r, 9)] for lang, r in self.language_ratios]
        if self.label_weights is not None:  # absent when not mixing, for the same reason
            keyed["labelled_ratio"] = [round(self.labelled_ratio, 9), *(round(w, 9) for w in self.label_weights)]
        # normalize, seed and languages change content, not which batch has which key
        return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def shard_order(num_shards: int, shuffle_seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the shards."""
    return np.random.default_rng(shuffle_seed + epoch).permutation(num_shards)


def resample_rng(shuffle_seed: int, epoch: int, shard: int) -> np.random.Generator:
    """The generator of unit ``(epoch, shard)``'s language resampling (the driver counting
    batches and the read task planning them must draw the same rows)."""
    return np.random.default_rng([shuffle_seed + epoch, shard, 1])


def unit_rows(row_ratios: np.ndarray | None, shuffle_seed: int, epoch: int, shard: int, num_rows: int) -> np.ndarray:
    """Rows unit ``(epoch, shard)`` plans its batches from: every row once, or, when
    resampling (``row_ratios`` (N,): each row's copies per epoch, :func:`resample_ratios`),
    resampled."""
    if row_ratios is None:
        return np.arange(num_rows, dtype=np.int64)
    return resample_rows(row_ratios, resample_rng(shuffle_seed, epoch, shard))


def row_ratios(languages: pa.Array | pa.ChunkedArray, ratios: dict[str, float]) -> np.ndarray:
    """Each row's language's copies per utterance, shape (N,) (null is "", a language the
    ratios do not name 0). Arrow's lookup, not a Python object per row: the driver runs it
    over every shard of the corpus, and the read task must get exactly the same values."""
    if not ratios:
        return np.zeros(len(languages), dtype=np.float64)
    index = pc.index_in(pc.fill_null(languages, ""), value_set=pa.array(list(ratios), pa.string()))
    codes = np.asarray(pc.fill_null(index, len(ratios)).to_numpy(zero_copy_only=False), dtype=np.int64)  # (N,)
    return np.append(np.array(list(ratios.values()), dtype=np.float64), 0.0)[codes]


def labelled_rows(transcripts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Which rows are labelled, shape (N,) bool: a transcript that is neither null nor blank
    (after trimming whitespace). Arrow kernels, like :func:`row_ratios`: the driver runs it
    over the manifest and the read task over the shard, and both must agree row by row."""
    if pa.types.is_null(transcripts.type):  # a column written with no transcript at all
        transcripts = transcripts.cast(pa.string())
    has_text = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(transcripts)), 0)
    return np.asarray(pc.fill_null(has_text, False).to_numpy(zero_copy_only=False), dtype=bool)


class Resampling(NamedTuple):
    """How a split's rows are resampled each epoch (:func:`plan_resampling`)."""

    languages: dict[str, float]
    """Copies per utterance of each language ("" for none); empty when not balancing."""
    labels: tuple[float, float] | None
    """Copies per utterance of a labelled and of an unlabelled row; None when not mixing."""

    @property
    def active(self) -> bool:
        return bool(self.languages) or self.labels is not None


def resample_ratios(
    num_rows: int, resampling: Resampling, languages: pa.Array | pa.ChunkedArray | None,
    labelled: np.ndarray | None,
) -> np.ndarray | None:
    """Each row's expected copies per epoch, shape (N,): its language's ratio times its
    label weight; None when nothing is resampled (every row once). ``languages`` is only
    read when balancing, ``labelled`` (N,) only when mixing."""
    if not resampling.active:
        return None
    if resampling.languages:
        ratios = row_ratios(languages if languages is not None else pa.nulls(num_rows, pa.string()),
                            resampling.languages)  # (N,)
    else:
        ratios = np.ones(num_rows, dtype=np.float64)
    if resampling.labels is not None:
        if labelled is None:
            raise ValueError("resample_ratios: mixing labelled and unlabelled rows needs each row's label")
        w_labelled, w_unlabelled = resampling.labels
        ratios = ratios * np.where(labelled, w_labelled, w_unlabelled)
    return ratios


class EpochCounts(NamedTuple):
    """Each shard's batches in one epoch (extra splits included) and its extra splits."""

    batches: list[int]
    extra: list[int]


Unit = tuple[int, int, frozenset[int], int]
"""(epoch, shard, consumed batch indices, extra splits)."""
_NOTHING_SEEN: frozenset[int] = frozenset()


def plan_units(
    num_shards: int, *, max_epochs: int, shuffle_seed: int, position: DataPosition, per_task: int,
    counts: Callable[[int], EpochCounts], max_batches: int | None = None,
) -> list[list[Unit]]:
    """Read tasks as lists of units, finished units left out.

    ``counts``: an epoch's :class:`EpochCounts` (the same every epoch unless languages are
    resampled), asked for each epoch planned, in order. ``max_batches``: stop once the
    units planned hold that many batches: a run that needs 12 epochs of a corpus plans
    12, not ``data.max_epochs``, so its start (and every restart) costs read tasks, and
    counting, in proportion to what it will read.
    """
    tasks: list[list[Unit]] = []
    planned = 0
    for epoch in range(position.epochs_done, max_epochs):
        order = shard_order(num_shards, shuffle_seed, epoch).tolist()
        batches, extra = counts(epoch)
        if position.touches(epoch):
            pending = [
                (epoch, s, position.seen_batches(epoch, s), extra[s])
                for s in order if not position.unit_done(epoch, s)
            ]
        else:
            pending = [(epoch, s, _NOTHING_SEEN, extra[s]) for s in order]
        if max_batches is not None:
            for i, unit in enumerate(pending):
                planned += batches[unit[1]] - len(unit[2])
                if planned >= max_batches:
                    pending = pending[:i + 1]
                    break
        tasks.extend(pending[i:i + per_task] for i in range(0, len(pending), per_task))
        if max_batches is not None and planned >= max_batches:
            break
    return tasks


class ShardMetadata(NamedTuple):
    """One shard's rows as the manifest describes them, in row order."""

    lengths: np.ndarray
    """Samples of each utterance, (N,) int64."""
    languages: pa.Array | None
    """Arrow strings, null where none; None unless asked for."""
    labelled: np.ndarray | None
    """(N,) bool, :func:`labelled_rows`; None unless asked for."""


def shard_metadata(
    info: DatasetInfo, shards: list[ShardInfo], store: storage.Storage | None = None, *, languages: bool = False,
    transcripts: bool = False,
) -> Iterator[ShardMetadata]:
    """Utterance lengths of each of ``shards`` in row order, with ``languages`` their
    languages and with ``transcripts`` which rows are labelled, from the manifest (no audio
    read; a column not asked for is not read).

    The manifest (sorted by split, shard, row) is streamed a record batch at a time and one
    shard's rows are held at once, so planning a corpus of 10^7 files needs the memory of
    one shard, not of the corpus.
    """
    uri = storage.join(info.root, S.MANIFEST_FILE)
    wanted = {s.path: s for s in shards}
    found: dict[str, ShardMetadata] = {}
    seen: set[str] = set()
    next_index = 0
    for path, rows, meta in _manifest_runs(uri, store, languages=languages, transcripts=transcripts):
        shard = wanted.get(path)
        if shard is None:
            continue
        if path in seen:
            raise ValueError(f"{uri}: the rows of shard {path} are not together; run jobs.prepare again")
        if len(rows) != shard.num_rows or not np.array_equal(rows, np.arange(shard.num_rows)):
            raise ValueError(
                f"{uri}: has {len(rows)} rows for shard {path}, {S.SUMMARY_FILE} says {shard.num_rows}; "
                "was jobs.prepare interrupted? Run it again."
            )
        seen.add(path)
        found[path] = meta
        # Handed out in the order asked for as soon as ready: both orders are by path, so
        # nothing waits unless a manifest was written in another order.
        while next_index < len(shards) and shards[next_index].path in found:
            yield found.pop(shards[next_index].path)
            next_index += 1
    if next_index < len(shards):
        missing = shards[next_index]
        raise ValueError(
            f"{uri}: has no rows for shard {missing.path}, {S.SUMMARY_FILE} says {missing.num_rows}; "
            "was jobs.prepare interrupted? Run it again."
        )


def _manifest_runs(
    uri: str, store: storage.Storage | None, *, languages: bool = False, transcripts: bool = False,
) -> Iterator[tuple[str, np.ndarray, ShardMetadata]]:
    """``(shard, rows, metadata)`` for each run of consecutive manifest rows of one shard;
    the ``language`` and ``transcript`` columns are read only when asked for."""
    fs, path = storage.resolve(uri, store)
    with fs.open_input_file(path) as handle:
        current = ""
        rows: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        langs: list[pa.Array] = []
        labelled: list[np.ndarray] = []

        def run() -> tuple[str, np.ndarray, ShardMetadata]:
            meta = ShardMetadata(
                np.concatenate(lengths).astype(np.int64),
                pa.concat_arrays(langs) if languages else None,
                np.concatenate(labelled) if transcripts else None,
            )
            return current, np.concatenate(rows), meta

        columns = [S.SHARD, S.ROW, S.NUM_SAMPLES] + [S.LANGUAGE] * languages + [S.TRANSCRIPT] * transcripts
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=1 << 16, columns=columns):
            encoded = batch.column(S.SHARD).dictionary_encode()
            codes = encoded.indices.to_numpy()
            starts = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1, [len(codes)]])
            row = batch.column(S.ROW).to_numpy()
            num = batch.column(S.NUM_SAMPLES).to_numpy()
            has_text = labelled_rows(batch.column(S.TRANSCRIPT)) if transcripts else None  # (batch,)
            for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
                shard = encoded.dictionary[int(codes[a])].as_py()
                if shard != current:
                    if rows:
                        yield run()
                    current, rows, lengths, langs, labelled = shard, [], [], [], []
                rows.append(row[a:b])
                lengths.append(num[a:b])
                if languages:
                    langs.append(batch.column(S.LANGUAGE).slice(a, b - a))
                if has_text is not None:
                    labelled.append(has_text[a:b])
        if rows:
            yield run()


def _spec(cfg: DataConfig) -> BatchSpec:
    return BatchSpec(
        max_sample_size=cfg.max_sample_size, min_sample_size=cfg.min_sample_size,
        max_samples_per_batch=cfg.max_samples_per_batch, batch_mode=cfg.batch_mode, num_buckets=cfg.num_buckets,
    )


def _has_languages(info: DatasetInfo, split: str, store: storage.Storage | None) -> bool:
    """Whether ``split`` may have two languages to balance: its manifest has the column (a
    dataset prepared before it existed has none) and its summary does not say otherwise.
    A monolingual dataset, the common case, so costs no extra pass over the manifest."""
    named = info.summary.get("splits", {}).get(split, {}).get("languages")
    if named is not None and len(named) < 2:  # the summary counts every accepted utterance: a superset
        return False
    fs, path = storage.resolve(storage.join(info.root, S.MANIFEST_FILE), store)
    return S.LANGUAGE in pq.read_schema(path, filesystem=fs).names


def dataset_languages(info: DatasetInfo, split: str = "train") -> tuple[str, ...]:
    """The languages of ``split`` as its summary counts them ("" for utterances nothing named
    one), sorted; empty unless there are two or more: one language has nothing to compare,
    and a monolingual run's batches then carry no language at all."""
    named = info.summary.get("splits", {}).get(split, {}).get("languages") or {}
    return tuple(sorted(named)) if len(named) >= 2 else ()


def balance_languages(
    cfg: DataConfig, info: DatasetInfo, split: str, store: storage.Storage | None,
) -> dict[str, float]:
    """Each language's copies per utterance (:func:`pipeline.data.batching.language_ratios`)
    from the hours of ``split``'s utterances long enough to be trained on, streamed from
    the manifest; empty: the split is read as it is (one language, ``data.language_alpha``
    1, or a dataset prepared before the language column)."""
    return plan_resampling(cfg, info, split, store, labels=False).languages


def plan_resampling(
    cfg: DataConfig, info: DatasetInfo, split: str, store: storage.Storage | None, *, labels: bool = True,
) -> Resampling:
    """How ``split``'s rows are resampled each epoch: XLSR's language ratios
    (:func:`balance_languages`) and, with ``data.labelled_ratio`` r > 0 (and ``labels``),
    JUST's label weights ``(r / p, (1 - r) / (1 - p))``, p the labelled share of the rows
    long enough to train on, each counted with its language's ratio, so that the stream's
    expected labelled share is r and an epoch keeps its expected size (module doc).

    One pass over the manifest gives both the hours by language and the rows by language
    and label; it reads the ``language`` column only when balancing and the ``transcript``
    column only when mixing, and is skipped when neither (a monolingual, unmixed run).
    """
    balancing = cfg.language_alpha != 1.0 and _has_languages(info, split, store)
    mixing = labels and cfg.labelled_ratio > 0
    if not balancing and not mixing:
        return Resampling({}, None)
    hours: dict[str, float] = {}
    rows: dict[str, list[int]] = {}  # language -> [usable rows, usable labelled rows]
    for meta in shard_metadata(info, info.split(split), store, languages=balancing, transcripts=mixing):
        n = meta.lengths
        usable = n >= max(1, cfg.min_sample_size)
        if meta.languages is not None:
            encoded = pc.fill_null(meta.languages, "").dictionary_encode()
            codes = encoded.indices.to_numpy(zero_copy_only=False)  # (N,)
            names = encoded.dictionary.to_pylist()
        else:
            codes, names = np.zeros(len(n), dtype=np.int64), [""]
        samples = np.bincount(codes[usable], weights=n[usable], minlength=len(names))
        counts = np.bincount(codes[usable], minlength=len(names))
        with_text = np.bincount(codes[usable & meta.labelled], minlength=len(names)) if mixing else counts * 0
        for lang, total, count, labelled in zip(names, samples.tolist(), counts.tolist(), with_text.tolist(),
                                                strict=True):
            hours[lang] = hours.get(lang, 0.0) + float(total) / cfg.sample_rate / 3600
            seen = rows.setdefault(lang, [0, 0])
            seen[0] += count
            seen[1] += labelled
    ratios = language_ratios(hours, cfg.language_alpha) if balancing else {}
    if not mixing:
        return Resampling(ratios, None)
    usable_rows = sum(c for c, _ in rows.values())
    n_labelled = sum(lab for _, lab in rows.values())
    if n_labelled == 0 or n_labelled == usable_rows:
        which = "no labelled utterance (a transcript that is not blank)" if n_labelled == 0 else \
            "no unlabelled utterance (every one has a transcript)"
        raise ValueError(
            f"data.labelled_ratio={cfg.labelled_ratio}: the {split!r} split of {cfg.train_uri} has {which} among "
            f"its {usable_rows} utterances of data.min_sample_size={cfg.min_sample_size} samples or more, so there "
            "is nothing to mix; set data.labelled_ratio=0 or prepare the data with a sidecar that gives some files "
            "a transcript and leaves others without one"
        )
    weight = (lambda lang: ratios.get(lang, 0.0)) if ratios else (lambda lang: 1.0)
    p = sum(weight(lang) * lab for lang, (_, lab) in rows.items()) / sum(
        weight(lang) * c for lang, (c, _) in rows.items())
    r = cfg.labelled_ratio
    return Resampling(ratios, (r / p, (1 - r) / (1 - p)))


class _PlannedCounts:
    """:class:`EpochCounts` of ``split``'s shards by epoch, counted from the lengths alone
    (before any audio is read), on first use and only for the epochs a run plans.

    The extra splits make every epoch's batch count a multiple of the worker count. Read
    as it is, every epoch counts the same, from one pass over the manifest. Resampled
    (``ratios``: languages', ``label_weights``: labelled and unlabelled rows'; see
    :func:`plan_resampling`), each epoch's units differ, and so do their counts: a pass over the
    manifest counts a window of epochs, as many as ``max_batches`` is expected to need
    (all of ``data.max_epochs`` without it), so a run's start costs what it will read,
    not every epoch of the data.
    """

    def __init__(
        self, cfg: DataConfig, info: DatasetInfo, split: str, num_splits: int, spec: BatchSpec,
        store: storage.Storage | None, *, ratios: dict[str, float] | None = None,
        label_weights: tuple[float, float] | None = None, max_batches: int | None = None,
    ) -> None:
        self._cfg, self._info, self._split, self._num_splits = cfg, info, split, num_splits
        self._spec, self._store, self._max_batches = spec, store, max_batches
        self._resampling = Resampling(ratios or {}, label_weights)
        self._shards = info.split(split)
        self._by_epoch: dict[int, EpochCounts] = {}
        self._every_epoch: EpochCounts | None = None
        self._warned = False
        if not self._resampling.active:
            self._every_epoch = self._finish(
                [count_batches(meta.lengths, spec) for meta in shard_metadata(info, self._shards, store)]
            )

    @property
    def counted(self) -> tuple[int, ...]:
        """Epochs counted one by one so far (resampled only): what planning has cost."""
        return tuple(sorted(self._by_epoch))

    def __call__(self, epoch: int) -> EpochCounts:
        if self._every_epoch is not None:
            return self._every_epoch
        if epoch not in self._by_epoch:
            self._count(range(epoch, min(epoch + self._window(), self._cfg.max_epochs)))
        return self._by_epoch[epoch]

    def _window(self) -> int:
        """Epochs one pass counts: what ``max_batches`` needs at the last epoch's count, plus one."""
        if self._max_batches is None or not self._by_epoch:
            return self._cfg.max_epochs if self._max_batches is None else 1
        per_epoch = max(1, sum(self._by_epoch[max(self._by_epoch)].batches))
        return -(-self._max_batches // per_epoch) + 1

    def _count(self, epochs: range) -> None:
        per_epoch: dict[int, list[tuple[int, int]]] = {e: [] for e in epochs}
        seed, resampling = self._cfg.shuffle_seed, self._resampling
        metadata = shard_metadata(self._info, self._shards, self._store, languages=bool(resampling.languages),
                                  transcripts=resampling.labels is not None)
        for s, meta in enumerate(metadata):
            n = meta.lengths
            ratios = resample_ratios(len(n), resampling, meta.languages, meta.labelled)  # (N,)
            for e in epochs:
                per_epoch[e].append(count_batches(n[unit_rows(ratios, seed, e, s, len(n))], self._spec))
        for e, counts in per_epoch.items():
            self._by_epoch[e] = self._finish(counts)

    def _finish(self, counts: list[tuple[int, int]]) -> EpochCounts:
        if sum(c for c, _ in counts) == 0:
            raise ValueError(
                f"{self._cfg.train_uri}: no {self._split!r} utterance has "
                f"data.min_sample_size={self._cfg.min_sample_size} samples"
            )
        extra = spread_extra_splits(counts, self._num_splits)
        if (sum(c for c, _ in counts) + sum(extra)) % self._num_splits and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self._split} split: cannot make the batches of an epoch a multiple of {self._num_splits} workers; "
                "streaming_split(equal=True) drops the remainder at the end of the stream",
                stacklevel=4,
            )
        return EpochCounts([c + e for (c, _), e in zip(counts, extra, strict=True)], extra)


def batch_counts(cfg: DataConfig, info: DatasetInfo, split: str, num_splits: int, epoch: int = 0) -> list[int]:
    """Batches of each shard of ``split`` in epoch ``epoch`` (extra splits included), in shard order."""
    store = storage.Storage.for_data(cfg)
    resampling = plan_resampling(cfg, info, split, store)
    counts = _PlannedCounts(cfg, info, split, num_splits, _spec(cfg), store, ratios=resampling.languages,
                            label_weights=resampling.labels, max_batches=0)
    return counts(epoch).batches


def build_train_dataset(
    cfg: DataConfig,
    *,
    split: str = "train",
    position: dict | None = None,
    seed: int = 0,
    num_splits: int = 1,
    wait: bool = False,
    max_batches: int | None = None,
    labels: L.LabelSpec | None = None,
) -> ray.data.Dataset:
    """The training stream of ``cfg.train_uri``'s ``split`` as a Ray Dataset of ready batches.

    Pass it to ``TorchTrainer(datasets={"train": ds})``; each worker reads its part with
    :func:`iter_train_batches`. ``position``: a merged :class:`DataPosition` state from
    the checkpoint being resumed. ``seed``: the crop offsets. ``num_splits``: the number
    of training workers (``scaling.num_workers``); each epoch's batch count is made a
    multiple of it, so ``streaming_split(equal=True)`` drops nothing at the end.
    ``wait``: ride out an object store that cannot be reached (a restart of a running
    job) instead of failing fast (a job that starts). ``max_batches``: the most batches
    all consumers together will take (the run's remaining updates x workers x
    accumulation); the stream ends soon after instead of planning every epoch of
    ``data.max_epochs``.
    ``labels``: a label set (:func:`pipeline.data.labels.open_label_set`) joined with every batch.
    """
    import ray.data

    store = storage.Storage.for_data(cfg)
    info = read_dataset_info(cfg.train_uri, store, wait=wait)
    if info.sample_rate != cfg.sample_rate:
        raise ValueError(
            f"data.sample_rate: {cfg.train_uri} holds {info.sample_rate} Hz audio, the config expects "
            f"{cfg.sample_rate} Hz; prepare it again with data.sample_rate={cfg.sample_rate}"
        )
    shards = info.split(split)
    if not shards:
        raise ValueError(f"{cfg.train_uri}: the {split!r} split has no shards (see {S.SUMMARY_FILE})")
    if num_splits < 1:
        raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
    spec = _spec(cfg)
    resampling = plan_resampling(cfg, info, split, store)
    settings = _Settings(
        sample_rate=cfg.sample_rate, spec=spec, normalize=cfg.normalize, shuffle_seed=cfg.shuffle_seed,
        seed=seed, num_splits=num_splits, labels=labels, language_ratios=tuple(resampling.languages.items()),
        languages=bool(dataset_languages(info, split)), labelled_ratio=cfg.labelled_ratio,
        label_weights=resampling.labels,
    )
    if labels is not None:
        if labels.dataset_version != info.version:
            raise ValueError(
                f"labels {labels.name!r} label version {labels.dataset_version} of the shards, {cfg.train_uri} holds "
                f"version {info.version}: label it again (jobs.label)"
            )
        labels.check_position(position)
    counts = _PlannedCounts(cfg, info, split, num_splits, spec, store, ratios=resampling.languages,
                            label_weights=resampling.labels, max_batches=max_batches)
    data_key = info.version if labels is None else labels.plan_key(info.version)
    plan = f"{data_key}/{split}/{settings.plan_hash()}"
    pos = _position_for(position, plan=plan, num_shards=len(shards))
    per_task = max(1, math.ceil(len(shards) / MAX_READ_TASKS_PER_EPOCH))
    tasks = plan_units(
        len(shards), max_epochs=cfg.max_epochs, shuffle_seed=cfg.shuffle_seed, position=pos, per_task=per_task,
        counts=counts, max_batches=max_batches,
    )
    if not tasks:
        raise ValueError(
            f"data position: all {cfg.max_epochs} epochs (data.max_epochs) of {cfg.train_uri} were already "
            "consumed; raise data.max_epochs to train further"
        )
    source = _TrainSource(
        shard_uris=tuple(info.uri(s) for s in shards),
        shard_rows=tuple(s.num_rows for s in shards),
        shard_bytes=tuple(s.num_bytes for s in shards),
        tasks=tasks, settings=settings, store=store, plan=plan,
    )
    ds = ray.data.read_datasource(source, override_num_blocks=len(tasks), num_cpus=cfg.decode_cpus)
    # Ray Data merges a task's output into blocks of up to 128 MiB, which would hold a
    # unit's batches back until the unit is done and give the streaming split coarse
    # pieces; one block per batch costs an object-store round trip per small batch.
    # A few MiB per block is both prompt and cheap.
    ds.context.target_max_block_size = BLOCK_BYTES
    return ds


def _position_for(state: dict | None, *, plan: str, num_shards: int) -> DataPosition:
    pos = DataPosition(state)
    if not state:
        return pos
    if pos.num_shards and pos.num_shards != num_shards:
        raise ValueError(
            f"data position: saved for {pos.num_shards} shards, the dataset now has {num_shards}; "
            "a run cannot resume on different data"
        )
    if pos.plan and pos.plan != plan:
        same_data = pos.plan.rsplit("/", 1)[0] == plan.rsplit("/", 1)[0]
        if not same_data:
            raise ValueError(
                f"data position: saved for dataset/split {pos.plan.rsplit('/', 1)[0]!r}, resuming on "
                f"{plan.rsplit('/', 1)[0]!r}; a run cannot resume on different data"
            )
        # Batching settings changed: finished units stay finished, unfinished ones are
        # re-planned and read whole (their old batch keys mean something else now).
        warnings.warn(
            "data position: batching settings changed since the checkpoint; unfinished shards of the "
            "current epoch are read again from their start",
            stacklevel=3,
        )
        state = dict(pos.state_dict(), partial={}, plan=plan)
        pos = DataPosition(state)
    return pos


# --- stages 2-3: read, plan, decode -----------------------------------------------------------


class _TrainSource(Datasource):
    """A Ray Data source whose read tasks are lists of (epoch, shard) units."""

    def __init__(
        self,
        *,
        shard_uris: tuple[str, ...],
        shard_rows: tuple[int, ...],
        shard_bytes: tuple[int, ...],
        tasks: list[list[Unit]],
        settings: _Settings,
        store: storage.Storage,
        plan: str,
    ) -> None:
        super().__init__()
        self._shard_uris = shard_uris
        self._shard_rows = shard_rows
        self._shard_bytes = shard_bytes
        self._tasks = tasks
        self._settings = settings
        self._store = store
        self._plan = plan

    def estimate_inmemory_data_size(self) -> int | None:
        # Decoded float32 is about 4x the FLAC bytes per sample x 2 (FLAC ~ 1 byte/sample).
        return int(sum(self._shard_bytes[u[1]] * 4 for task in self._tasks for u in task))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None):
        out = []
        for units in self._tasks:
            # Each task carries only its own shards: Ray puts every read task in the
            # object store at start, so a copy of the whole shard list per task would
            # cost epochs x shards^2 bytes.
            work = [(u, self._shard_uris[u[1]], self._shard_rows[u[1]]) for u in units]
            fn = functools.partial(
                _read_units, work=work, num_shards=len(self._shard_uris), settings=self._settings,
                store=self._store, plan=self._plan,
            )
            size = sum(self._shard_bytes[u[1]] * 4 for u in units)
            meta = BlockMetadata(num_rows=None, size_bytes=int(size), exec_stats=None, input_files=None)
            out.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
        return out

    @property
    def supports_distributed_reads(self) -> bool:
        return True


def _read_units(
    *,
    work: list[tuple[Unit, str, int]],
    num_shards: int,
    settings: _Settings,
    store: storage.Storage,
    plan: str,
) -> Iterator[pa.Table]:
    for (epoch, shard, seen, extra), uri, rows in work:
        yield from unit_batches(
            uri, epoch=epoch, shard=shard, num_shards=num_shards, expected_rows=rows,
            seen=seen, extra_splits=extra, settings=settings, store=store, plan=plan,
        )


def unit_batches(
    uri: str,
    *,
    epoch: int,
    shard: int,
    num_shards: int,
    expected_rows: int,
    seen: frozenset[int],
    extra_splits: int,
    settings: _Settings,
    store: storage.Storage,
    plan: str,
) -> Iterator[pa.Table]:
    """The batch rows of one unit, minus the ``seen`` batch indices (decoded lazily)."""
    fs, path = storage.resolve(uri, store)
    balancing, mixing = bool(settings.language_ratios), settings.label_weights is not None
    columns = [S.ID, S.NUM_SAMPLES, S.SAMPLE_RATE, S.AUDIO] + [S.LANGUAGE] * (balancing or settings.languages)
    columns += [S.TRANSCRIPT] * mixing
    table = pq.read_table(path, filesystem=fs, columns=columns)
    spec = settings.labels
    shard_labels = None if spec is None else L.read_shard_labels(spec, _shard_path(uri), store)
    if table.num_rows != expected_rows:
        raise ValueError(f"shard {uri}: {table.num_rows} rows, {S.SUMMARY_FILE} says {expected_rows}")
    rates = table.column(S.SAMPLE_RATE).to_numpy()
    if len(rates) and (rates != settings.sample_rate).any():
        raise ValueError(f"shard {uri}: sample rates {sorted(set(rates.tolist()))}, expected {settings.sample_rate}")
    num_samples = table.column(S.NUM_SAMPLES).to_numpy()  # (N,)
    ids = table.column(S.ID).to_pylist()
    languages = pc.fill_null(table.column(S.LANGUAGE), "").to_pylist() if settings.languages else None
    audio = table.column(S.AUDIO)  # chunked as read: indexing it copies nothing
    ratios = resample_ratios(
        len(num_samples), settings.resampling, table.column(S.LANGUAGE) if balancing else None,
        labelled_rows(table.column(S.TRANSCRIPT)) if mixing else None,
    )  # (N,) or None
    rows = unit_rows(ratios, settings.shuffle_seed, epoch, shard, len(num_samples))  # (N',) into the shard
    batches = plan_batches(
        num_samples[rows], settings.spec, np.random.default_rng([settings.shuffle_seed + epoch, shard]),
        extra_splits=extra_splits,
    )
    for index, planned in enumerate(batches):
        if index in seen:
            continue
        members = rows[planned.rows]  # (B,) rows of the shard
        rng = np.random.default_rng([settings.seed, epoch, shard, index])
        offsets = crop_offsets(num_samples[members], planned.lengths, rng)
        if spec is not None:
            offsets = L.quantize_offsets(offsets, spec.stride)
        width = planned.length
        full = bool((planned.lengths == width).all())
        source = (np.empty if full else np.zeros)((len(members), width), dtype=np.float32)  # (B, S)
        for i, (row, offset, length) in enumerate(
            zip(members.tolist(), offsets.tolist(), planned.lengths.tolist(), strict=True)
        ):
            # Decode straight into the batch: no per-utterance array to copy.
            seg = decode_segment(audio[row].as_buffer(), offset, length, out=source[i, :length])
            if settings.normalize:
                seg[:] = normalize(seg)
        batch_ids = [ids[r] for r in members.tolist()]
        row = _batch_row(
            source, planned.lengths, batch_ids,
            epoch=epoch, shard=shard, index=index, num_batches=len(batches), num_shards=num_shards, plan=plan,
        )
        if languages is not None:
            row = row.append_column(LANGUAGES, pa.array([[languages[r] for r in members.tolist()]],
                                                        pa.list_(pa.string())))
        if shard_labels is not None:
            targets = L.batch_targets(shard_labels, batch_ids, offsets, planned.lengths, spec)
            for name, column in L.encode_targets(targets).items():
                row = row.append_column(name, column)
        yield row


def _shard_path(uri: str) -> str:
    """A shard's path relative to its dataset root, from its URI: the last ``shards/`` of the
    URI is the dataset's own (``shards/<version>/<split>/<file>`` holds no other)."""
    marker = f"/{S.SHARDS_DIR}/"
    cut = uri.rfind(marker)
    if cut < 0:
        raise ValueError(f"shard {uri}: expected a path under {S.SHARDS_DIR}/")
    return uri[cut + 1:]


def _batch_row(
    source: np.ndarray, lengths: np.ndarray, ids: list[str], *, epoch: int, shard: int, index: int,
    num_batches: int, num_shards: int, plan: str,
) -> pa.Table:
    # The float32 samples travel as one binary value: no per-element Arrow conversion,
    # and the worker gets them back with a single np.frombuffer.
    data = pa.py_buffer(np.ascontiguousarray(source))
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
    return pa.table(
        {
            SOURCE: pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data]),
            WIDTH: pa.array([source.shape[1]], pa.int64()),
            NUM_SAMPLES: pa.array([lengths.tolist()], pa.list_(pa.int64())),
            IDS: pa.array([ids], pa.list_(pa.string())),
            EPOCH: pa.array([epoch], pa.int64()),
            SHARD_INDEX: pa.array([shard], pa.int64()),
            BATCH_INDEX: pa.array([index], pa.int64()),
            NUM_BATCHES: pa.array([num_batches], pa.int64()),
            NUM_SHARDS: pa.array([num_shards], pa.int64()),
            PLAN: pa.array([plan], pa.string()),
        }
    )


# --- stage 5: the worker side ------------------------------------------------------------------


def batches_from_block(block: pa.Table) -> Iterator[dict[str, Any]]:
    """Batch rows (stage 3) -> the dicts a training step takes."""
    cols = {name: block.column(name) for name in block.column_names}
    for i in range(block.num_rows):
        lengths = np.asarray(cols[NUM_SAMPLES][i].as_py(), dtype=np.int64)  # (B,)
        width = int(cols[WIDTH][i].as_py())
        raw = cols[SOURCE][i].as_buffer()
        source = np.frombuffer(raw, dtype=np.float32).reshape(len(lengths), width).copy()  # (B, S)
        yield {
            SOURCE: source,
            PADDING_MASK: padding_mask(lengths, width),  # (B, S)
            NUM_SAMPLES: lengths,
            IDS: np.asarray(cols[IDS][i].as_py(), dtype=str),
            EPOCH: np.int64(cols[EPOCH][i].as_py()),
            SHARD_INDEX: np.int64(cols[SHARD_INDEX][i].as_py()),
            BATCH_INDEX: np.int64(cols[BATCH_INDEX][i].as_py()),
            NUM_BATCHES: np.int64(cols[NUM_BATCHES][i].as_py()),
            NUM_SHARDS: np.int64(cols[NUM_SHARDS][i].as_py()),
            PLAN: str(cols[PLAN][i].as_py()),
            **({L.TARGET_IDS: L.decode_targets(block, i, len(lengths))} if L.TARGET_IDS in cols else {}),
            **({LANGUAGES: np.asarray(cols[LANGUAGES][i].as_py(), dtype=str)} if LANGUAGES in cols else {}),
        }


def iter_train_batches(
    shard: ray.data.DataIterator, cfg: DataConfig, *, position: dict | None = None
) -> Iterator[dict[str, Any]]:
    """Ready batches of this worker's part of the stream (``ray.train.get_dataset_shard``).

    Each batch: ``source`` float32 (B, S), ``padding_mask`` bool (B, S) True at padding
    (all False in crop mode), ``num_samples`` int64 (B,); metadata: ``ids`` (B,) str,
    ``languages`` (B,) str on a multilingual split (:func:`dataset_languages`), and
    the position keys (``epoch``, ``shard``, ``batch_index``, ``num_batches``,
    ``num_shards``, ``plan``) for :meth:`DataPosition.update`.

    ``position`` is the state the dataset was built from. A batch it already holds is
    still yielded (with a warning): dropping it here would leave this worker with fewer
    batches than the others, and collective ops would hang. Build the dataset with the
    same position and this never happens.
    """
    resumed = DataPosition(position) if position else None
    warned = False
    for block in shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=cfg.prefetch_batches):
        for batch in batches_from_block(block):
            if resumed is not None and not warned and resumed.contains(
                int(batch[EPOCH]), int(batch[SHARD_INDEX]), int(batch[BATCH_INDEX])
            ):
                warnings.warn(
                    "iter_train_batches: a batch the resumed position already holds was delivered again; "
                    "was build_train_dataset given the same position?",
                    stacklevel=2,
                )
                warned = True
            yield batch
