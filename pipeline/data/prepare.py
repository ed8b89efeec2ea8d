"""Raw audio files under a directory or s3:// prefix -> Parquet shards of 16 kHz FLAC.

Stages, each with the rows it produces:

1. list (driver, :mod:`pipeline.data.listing`): every path with an audio extension under
   the input root -> a table of ``(relative path, size, mtime)``, or a reject found from
   the listing alone (a name that is not UTF-8, a broken link, a second path to one file, a
   pipe); other files counted by extension. An s3:// prefix is listed a page at a time and
   saved as it goes, so a listing cut short resumes.
2. label (driver, :mod:`pipeline.data.sidecar`): ids (unique by construction), transcript,
   speaker and language from a sidecar table when there is one, with a report of rows and
   files that match nothing; a language the sidecar does not give from
   ``data.prepare_language`` (a code, or ``folder``: the first folder of the path), as
   Arrow columns; the split (train/valid) from a hash of the id, so it never changes
   between runs.
3. group (driver): per split, files in hash order (each shard a random mix of the
   corpus, not one speaker or book) cut into groups of about ``data.shard_size_mb`` of
   expected FLAC output; the expectation per input byte comes from the headers of a
   few files of each extension (the probe). The plan is written to the work area, one
   row group per group, so from here on the driver holds a row per group, not per file.
4. convert + write (a Ray Data task per group, ``data.decode_cpus`` each): read the
   group's plan, then each file once; decode, down-mix, set the level, resample, encode
   FLAC and check that the signal survived (:func:`pipeline.data.audio.convert`), and
   append it to the group's shard file, rolling to a new part past the target size. The
   group's outcome table (where each file went, or why it was rejected) is written last:
   it is the group's commit. The task returns it too, and the driver writes it into the
   manifest as groups finish, in group order, holding one group's rows at a time.
5. commit (driver): ``manifest.parquet`` is published whole, then ``rejects.parquet`` and
   ``summary.json``, the commit point that names the shard files (schema.py has the
   layout); then the work area is removed.

Every listed path ends up in exactly one of the shards or the rejects: each file is in
exactly one group, each group's outcome has one row per planned file in plan order, and
the driver checks the counts before committing (``accepted + rejected == files_in``).

Shards live under a version directory named by a fingerprint of the input listing and
the settings. A rerun over the same input finds ``summary.json`` with that version and
stops; a rerun over changed input writes a new version and removes the old one after the
commit, so rows are never duplicated and readers never see half a dataset.

A run cut short at any point (killed, or stopped by an object store gone for longer than
``data.s3_retry_seconds``) leaves its work area (``_prepare/`` under the output): the same
command continues it, on the listing and plan it made, and converts only the groups
without an outcome table, after deleting whatever shard parts such a group had begun.
Changes to the input made in between are picked up by the next run; ``--force`` starts
over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.data.audio import Converted, Rejected, convert, estimate_seconds
from pipeline.data.listing import Listing, assign_id_column, extensions, list_input
from pipeline.data.sidecar import EXAMPLES, match, parse_sidecar
from pipeline.data.storage import StorageError
from pipeline.data.verdicts import REASON_ERROR, REASON_SIGNAL_LOST, REASON_UNREADABLE

if TYPE_CHECKING:
    from pipeline.config import DataConfig

log = logging.getLogger(__name__)

FORMAT = "wavray-shards"
FORMAT_VERSION = 1
# What the conversion does to a file (part of the version fingerprint): 2 since it keeps
# the signal of cancelling channels, loud float files and chained Oggs, and rejects what
# it cannot keep.
CONVERT_VERSION = 2
# Files up to this size are fetched in one request (one GET per object on S3);
# larger ones are decoded from a seekable stream so memory stays bounded.
WHOLE_READ_LIMIT = 512 << 20
# Expected FLAC bytes per input byte, used only to size groups (the writer rolls to a
# new part at the target size whatever the estimate said).
_OUTPUT_RATIO = {".flac": 1.0, ".ogg": 4.0, ".oga": 4.0, ".opus": 6.0, ".mp3": 4.0}
_PCM_RATIO = 0.6
# 16-bit FLAC of speech: about 55% of PCM.
_FLAC_BYTES_PER_SAMPLE = 1.1
_PROBE_BYTES = 64 << 10
_ROW_GROUP_BYTES = 32 << 20
_CHUNK_ROWS = 1 << 16
"""Rows handled at once where the driver must touch every file in Python (hashes)."""
GROUPS_PER_PLAN_FILE = 64
"""Groups per file of the written plan (one Parquet row group each)."""

# The work area of an unfinished run (see the module docstring).
PLAN_DIR = "plan"
DONE_DIR = "done"
PLAN_DONE = "plan.json"
PLAN_SCHEMA = pa.schema([
    pa.field("rel", pa.string(), nullable=False),
    pa.field(S.ID, pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("expected", pa.float64(), nullable=False),
    pa.field(S.TRANSCRIPT, pa.string()),
    pa.field(S.SPEAKER, pa.string()),
    pa.field(S.LANGUAGE, pa.string()),
])
"""One planned file: what a convert task needs to read, name and label it."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    rel: str
    id: str
    size: int
    split: str
    transcript: str | None = None
    speaker: str | None = None
    language: str | None = None


@dataclass(frozen=True)
class Group:
    """One convert task: the files of ``split`` numbered ``group``, in the written plan."""

    split: str
    group: int
    plan_file: str
    """Relative to the version's work area."""
    row_group: int
    num_files: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.group:05d}"


@dataclass(frozen=True)
class Settings:
    """What decides the content of the output (part of the version fingerprint)."""

    sample_rate: int
    shard_size_mb: float
    valid_fraction: float
    min_seconds: float
    max_seconds: float
    valid_speakers: tuple[str, ...] = ()
    language: str = ""

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Settings:
        return cls(
            sample_rate=cfg.sample_rate, shard_size_mb=cfg.shard_size_mb, valid_fraction=cfg.valid_fraction,
            min_seconds=cfg.prepare_min_seconds, max_seconds=cfg.prepare_max_seconds,
            valid_speakers=tuple(sorted(set(cfg.valid_speakers))), language=cfg.prepare_language,
        )


# --- stage 2: label ----------------------------------------------------------------------


def _hash01(text: str, salt: str) -> float:
    h = hashlib.blake2b(f"{salt}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _hash01_column(values: pa.ChunkedArray | pa.Array, salt: str) -> np.ndarray:
    """:func:`_hash01` of every value, a chunk of rows at a time (no Python object per file kept)."""
    out = np.empty(len(values), dtype=np.float64)
    for start in range(0, len(values), _CHUNK_ROWS):
        chunk = values.slice(start, _CHUNK_ROWS).to_pylist()
        out[start:start + len(chunk)] = [_hash01(v, salt) for v in chunk]
    return out


def split_of(utt_id: str, valid_fraction: float, speaker: str | None = None,
             valid_speakers: tuple[str, ...] | frozenset[str] = ()) -> str:
    """Deterministic train/valid split: every utterance of ``valid_speakers``, and a
    ``valid_fraction`` of the rest chosen by the id alone."""
    if speaker is not None and speaker in valid_speakers:
        return "valid"
    return "valid" if _hash01(utt_id, "split") < valid_fraction else "train"


def split_column(ids: pa.ChunkedArray | pa.Array, speakers: pa.Array, settings: Settings) -> np.ndarray:
    """:func:`split_of` over columns: True where the file goes to the valid split."""
    valid = _hash01_column(ids, "split") < settings.valid_fraction
    if settings.valid_speakers:
        named = pc.fill_null(pc.is_in(speakers, value_set=pa.array(settings.valid_speakers, pa.string())), False)
        valid |= np.asarray(named.to_numpy(zero_copy_only=False), dtype=bool)
    return valid


def language_of(rel: str, label_language: str | None, prepare_language: str) -> str | None:
    """A file's language: its sidecar row's, else its first folder's (``prepare_language``
    ``folder``), else ``prepare_language`` itself; None when nothing names one. The most
    specific source wins, so one sidecar can correct a folder layout file by file.
    :func:`language_column` is the same rule over the plan's columns."""
    if label_language:
        return label_language
    if prepare_language == "folder":
        head, sep, _ = rel.partition("/")
        return head if sep and head else None
    return prepare_language or None


def language_column(rels: pa.ChunkedArray | pa.Array, label_languages: pa.ChunkedArray | pa.Array,
                    prepare_language: str) -> pa.ChunkedArray | pa.Array:
    """:func:`language_of` over columns, in Arrow: the plan is built from the listing's columns
    without a Python object per file, and the language must not bring one back."""
    # The sidecar's cells are trimmed and empty ones null (sidecar.py); "" is treated as none too.
    given = pc.if_else(pc.equal(label_languages, ""), pa.scalar(None, pa.string()), label_languages)
    if prepare_language == "folder":
        parts = pc.split_pattern(rels, pattern="/", max_splits=1)
        head = pc.list_element(parts, 0)
        named = pc.and_(pc.greater(pc.list_value_length(parts), 1), pc.not_equal(head, ""))
        return pc.coalesce(given, pc.if_else(named, head, pa.scalar(None, pa.string())))
    if prepare_language:
        return pc.coalesce(given, pa.scalar(prepare_language, pa.string()))
    return given


def check_valid_speakers(wanted: tuple[str, ...], known: set[str], sidecar_uri: str | None) -> None:
    """Every speaker named for the valid split must have utterances: a misspelt name would
    otherwise leave its voice in training without a word."""
    if not wanted:
        return
    if not known:
        where = f"the sidecar {sidecar_uri} has" if sidecar_uri else "there is no sidecar, so there are"
        raise ValueError(f"data.valid_speakers {list(wanted)}: {where} no speakers (a 'speaker' column)")
    missing = [s for s in wanted if s not in known]
    if missing:
        shown = ", ".join(sorted(known)[:20]) + (" ..." if len(known) > 20 else "")
        raise ValueError(f"data.valid_speakers: no utterances of {missing}; the input's speakers are: {shown}")


# --- stage 3: group ----------------------------------------------------------------------


def calibrate_output_ratios(
    input_uri: str, probes: dict[str, list[tuple[str, int]]], sample_rate: int, store: storage.Storage | None = None,
) -> dict[str, float]:
    """FLAC bytes per input byte for each extension, from the headers of a few files.

    A 44.1 kHz stereo wav shrinks about 10x on its way to 16 kHz mono FLAC, a 16 kHz
    mono one about 2x: without this, shards of such corpora would come out far from
    ``shard_size_mb``. ``probes``: per extension, ``(relative path, size)`` of the files to
    read 64 KiB of.
    """

    def ratio(item: tuple[str, int]) -> float | None:
        rel, size = item
        try:
            fs, path = storage.resolve(storage.join(input_uri, rel), store)
            with fs.open_input_file(path) as handle:
                head = handle.read_at(min(size, _PROBE_BYTES), 0)
        except OSError:
            return None
        seconds = estimate_seconds(head, size)
        return None if seconds is None else seconds * sample_rate * _FLAC_BYTES_PER_SAMPLE / size

    out = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for ext, group in probes.items():
            found = [r for r in pool.map(ratio, group) if r is not None]
            if found:
                out[ext] = float(np.median(found))
    return out


def probe_choice(exts: np.ndarray, sizes: np.ndarray, order: np.ndarray, per_extension: int = 16) -> dict[str, np.ndarray]:
    """Rows to probe: per extension, the ``per_extension`` non-empty files first in hash order."""
    out = {}
    for ext in np.unique(exts):
        rows = np.flatnonzero((exts == ext) & (sizes > 0))
        if len(rows) > per_extension:
            rows = rows[np.argpartition(order[rows], per_extension)[:per_extension]]
        out[str(ext)] = rows[np.argsort(order[rows], kind="stable")]
    return out


def expected_bytes(exts: np.ndarray, sizes: np.ndarray, ratios: dict[str, float]) -> np.ndarray:
    """Expected FLAC bytes of each file (only to size groups)."""
    ratio = np.array([ratios.get(str(e)) or _OUTPUT_RATIO.get(str(e), _PCM_RATIO) for e in exts], dtype=np.float64)
    return sizes.astype(np.float64) * ratio


def cut_groups(expected: np.ndarray, shard_size_mb: float) -> np.ndarray:
    """Group index of each file of one split, files in hash order: cut past the target
    size; a last group expected below half the target joins the one before it."""
    target = shard_size_mb * (1 << 20)
    group = np.zeros(len(expected), dtype=np.int64)
    g, size, last_start = 0, 0.0, 0
    for i, est in enumerate(expected.tolist()):
        if i and size + est > target:
            g, size, last_start = g + 1, 0.0, i
        group[i] = g
        size += est
    if g and size < target / 2:
        group[last_start:] = g - 1
    return group


# --- stage 4: convert + write (runs in Ray tasks) ----------------------------------------------


class _ShardWriter:
    """Appends converted files to ``<split>/part-GGGGG-KK.parquet``, rolling past the target."""

    def __init__(self, out_root: str, rel_dir: str, group: int, target_bytes: float, store: storage.Storage):
        self._out_root = out_root
        self._rel_dir = rel_dir
        self._group = group
        self._target = target_bytes
        self._store = store
        self._part = -1
        self._writer: pq.ParquetWriter | None = None
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0
        self._file_bytes = 0
        self._file_rows = 0
        self.rel_path = ""

    def add(self, row: dict[str, Any], remaining: float) -> tuple[str, int]:
        """Append a row; ``remaining``: expected bytes of this and the group's later files.

        A full part rolls over only when enough is left to fill half a new one, so a
        group never ends in a sliver of a shard.
        """
        if self._writer is None or (self._file_bytes >= self._target and remaining >= self._target / 2):
            self._open_next()
        self._rows.append(row)
        size = len(row[S.AUDIO])
        self._buffered += size
        self._file_bytes += size
        where = (self.rel_path, self._file_rows)
        self._file_rows += 1
        if self._buffered >= _ROW_GROUP_BYTES:
            self._flush()
        return where

    def _open_next(self) -> None:
        self.close()
        self._part += 1
        self.rel_path = f"{self._rel_dir}/part-{self._group:05d}-{self._part:02d}.parquet"
        fs, path = storage.resolve(storage.join(self._out_root, self.rel_path), self._store)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        self._writer = pq.ParquetWriter(
            path, S.SHARD_SCHEMA, filesystem=fs,
            # FLAC is already compressed; the small columns are worth zstd.
            compression={c: ("none" if c == S.AUDIO else "zstd") for c in S.SHARD_SCHEMA.names},
            use_dictionary=[S.SPEAKER, S.LANGUAGE],
        )
        self._file_bytes = 0
        self._file_rows = 0

    def _flush(self) -> None:
        if self._rows and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=S.SHARD_SCHEMA))
        self._rows, self._buffered = [], 0

    def close(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None


def _read_and_convert(f: InputFile, settings: Settings, store: storage.Storage) -> Converted | Rejected:
    """Read the file once and convert it; whatever goes wrong with the file is its reject,
    never the job's end. The store itself going away is the job's: after retrying for
    ``data.s3_retry_seconds`` it stops the task, and the rerun converts this group again."""
    kwargs = dict(sample_rate=settings.sample_rate, min_seconds=settings.min_seconds, max_seconds=settings.max_seconds)
    try:
        fs, path = storage.resolve(f.uri, store)
        if f.size <= WHOLE_READ_LIMIT:
            with fs.open_input_stream(path) as stream:
                return convert(stream.read(), **kwargs)
        with fs.open_input_file(path) as handle:
            return convert(handle, **kwargs)
    except StorageError:
        raise
    except OSError as e:  # permissions, a vanished key, the store refusing this object
        if storage.is_transient(e):
            raise
        return Rejected(REASON_UNREADABLE, f"cannot read the file: {_first_line(e)}")
    except Exception as e:  # a bug: the detail says where, the other files go on
        return Rejected(REASON_ERROR, f"unexpected {type(e).__name__} while converting: "
                                      f"{_first_line(e) or 'no message'} (please report it)")


def _first_line(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return text[0][:300] if text else ""


def _drop_unfinished_parts(out_root: str, rel_dir: str, group: int, store: storage.Storage) -> None:
    """Delete the shard parts an interrupted attempt at ``group`` left (parts are numbered
    from 00 and each is closed before the next opens, so the first missing one ends them)."""
    part = 0
    while True:
        fs, path = storage.resolve(storage.join(out_root, f"{rel_dir}/part-{group:05d}-{part:02d}.parquet"), store)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_file(path)
        part += 1


def convert_group(
    group: Group, *, input_uri: str, out_root: str, version: str, settings: Settings, store: storage.Storage,
) -> dict[str, Any]:
    """Convert one group's files into its shard part(s), then write its outcome table (one
    row per file, in plan order): the group's commit. Returns the group's counts."""
    work = work_uri(out_root, version)
    fs, plan_path = storage.resolve(storage.join(work, PLAN_DIR, group.plan_file), store)
    with fs.open_input_file(plan_path) as handle:
        plan = pq.ParquetFile(handle).read_row_group(group.row_group)
    if plan.num_rows != group.num_files:
        raise RuntimeError(f"prepare: plan of group {group.name} has {plan.num_rows} files, expected {group.num_files}")
    rel_dir = f"{S.SHARDS_DIR}/{version}/{group.split}"
    _drop_unfinished_parts(out_root, rel_dir, group.group, store)
    writer = _ShardWriter(out_root, rel_dir, group.group, settings.shard_size_mb * (1 << 20), store)
    outcomes: list[dict[str, Any]] = []
    try:
        expected = plan.column("expected").to_pylist()
        remaining = float(sum(expected))
        for row, est in zip(plan.to_pylist(), expected, strict=True):
            # A plan written before the language column (a run resumed across the upgrade) has none.
            f = InputFile(uri=storage.join(input_uri, row["rel"]), rel=row["rel"], id=row[S.ID], size=row["size"],
                          split=group.split, transcript=row[S.TRANSCRIPT], speaker=row[S.SPEAKER],
                          language=row.get(S.LANGUAGE))
            result = _read_and_convert(f, settings, store)
            base = {S.SOURCE_URI: f.uri, S.ID: f.id, S.SPLIT: f.split, S.TRANSCRIPT: f.transcript,
                    S.SPEAKER: f.speaker, S.LANGUAGE: f.language}
            if isinstance(result, Rejected):
                outcomes.append({**base, S.REASON: result.reason, S.DETAIL: result.detail})
                remaining -= est
                continue
            shard, index = writer.add({
                S.ID: f.id, S.AUDIO: result.flac, S.NUM_SAMPLES: result.num_samples,
                S.SAMPLE_RATE: result.sample_rate, S.DURATION: result.duration, S.SOURCE_URI: f.uri,
                S.TRANSCRIPT: f.transcript, S.SPEAKER: f.speaker, S.LANGUAGE: f.language,
            }, remaining)
            remaining -= est
            outcomes.append({
                **base, S.SHARD: shard, S.ROW: index, S.NUM_SAMPLES: result.num_samples,
                S.SAMPLE_RATE: result.sample_rate, S.DURATION: result.duration,
                S.SOURCE_SAMPLE_RATE: result.source_sample_rate, S.SOURCE_CHANNELS: result.source_channels,
                "audio_bytes": len(result.flac),
            })
    finally:
        writer.close()
    table = pa.Table.from_pylist(outcomes, schema=S.OUTCOME_SCHEMA)
    storage.write_table(storage.join(work, DONE_DIR, f"{group.name}.parquet"), table, store, compression="zstd")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as ipc:
        ipc.write_table(table)
    return {"split": group.split, "group": group.group, "outcomes": sink.getvalue().to_pybytes()}


def _convert_group_batch(batch: pa.Table, *, input_uri: str, out_root: str, version: str, settings: Settings,
                         store: storage.Storage) -> pa.Table:
    done = [convert_group(Group(**row), input_uri=input_uri, out_root=out_root, version=version,
                          settings=settings, store=store) for row in batch.to_pylist()]
    return pa.Table.from_pylist(done, schema=_GROUP_DONE_SCHEMA)


_GROUP_DONE_SCHEMA = pa.schema([("split", pa.string()), ("group", pa.int64()), ("outcomes", pa.large_binary())])
"""What a convert task returns per group: its outcome table (also in its outcome file), so
that the driver writes the manifest as groups finish instead of reading every file back."""


# --- the job -----------------------------------------------------------------------------------


def work_uri(output_uri: str, version: str | None = None) -> str:
    """The work area of an unfinished run (of ``version``)."""
    return storage.join(output_uri, S.WORK_DIR, *([version] if version else []))


def _listing_uri(output_uri: str, input_uri: str) -> str:
    return storage.join(work_uri(output_uri), "listing-" + hashlib.sha1(input_uri.encode()).hexdigest()[:12])


def fingerprint(input_uri: str, listing: pa.Table, settings: Settings, sidecar: bytes | None) -> str:
    h = hashlib.sha1()
    described = dict(settings.__dict__)
    for name in ("valid_speakers", "language"):
        if not described[name]:
            del described[name]  # outputs prepared before the setting existed stay current
    h.update(json.dumps({"format": FORMAT_VERSION, "convert": CONVERT_VERSION, "settings": described},
                        sort_keys=True).encode())
    prefix = storage.join(input_uri, "x")[:-1]
    for start in range(0, listing.num_rows, _CHUNK_ROWS):
        chunk = listing.slice(start, _CHUNK_ROWS).select(["rel", "size", "mtime_ns", S.REASON]).to_pydict()
        for rel, size, mtime, reason in zip(chunk["rel"], chunk["size"], chunk["mtime_ns"], chunk[S.REASON],
                                            strict=True):
            problem = f"\t{reason}" if reason else ""
            h.update(f"{prefix}{rel}\t{size}\t{mtime}{problem}\n".encode())
    h.update(hashlib.sha1(sidecar or b"").digest())
    return h.hexdigest()[:12]


def prepare(
    input_uri: str,
    output_uri: str,
    cfg: DataConfig,
    *,
    sidecar_uri: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] = print,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the prepare job (Ray must be initialised); returns the summary it committed.

    ``on_stage`` is called with ``"list"``, ``"probe"``, ``"convert"`` and ``"commit"`` as
    each stage starts (the scale benchmark times and meters them)."""
    import ray.data

    stage = on_stage or (lambda _: None)
    store = storage.Storage.for_data(cfg)
    storage.check_reachable(input_uri, store)
    storage.ensure_bucket(output_uri, store)
    settings = Settings.from_config(cfg)
    if force:
        storage.delete_dir(work_uri(output_uri), store)

    # 1. list
    stage("list")
    started = time.monotonic()
    listing_uri = _listing_uri(output_uri, input_uri)
    resumed_listing = storage.exists(storage.join(listing_uri, "done.json"), store)
    listing = list_input(input_uri, store, resume_uri=listing_uri, progress=progress)
    if not listing.table.num_rows:
        others = ", ".join(f"{ext or '(no extension)'}: {n}" for ext, n in listing.not_audio.items())
        raise ValueError(
            f"--input: no audio files under {input_uri!r} (extensions: {', '.join(sorted(S.AUDIO_EXTENSIONS))})"
            + (f"; it holds {others}" if others else "")
        )
    for what, dirs in (("reached again through a link (walked once)", listing.repeated_dirs),
                       ("that could not be listed", listing.unreadable_dirs)):
        if dirs:
            progress(f"prepare: {len(dirs)} directories {what}: {', '.join(dirs[:5])}{' ...' if len(dirs) > 5 else ''}")

    # The version names what is being made: the listing, the settings and the sidecar.
    sidecar_bytes: bytes | None = None
    if sidecar_uri is None and storage.exists(storage.join(input_uri, S.SIDECAR_FILE), store):
        sidecar_uri = storage.join(input_uri, S.SIDECAR_FILE)
    if sidecar_uri:
        sidecar_bytes = storage.read_bytes(sidecar_uri, store)
    version = fingerprint(input_uri, listing.table, settings, sidecar_bytes)
    summary_uri = storage.join(output_uri, S.SUMMARY_FILE)
    if not force and storage.exists(summary_uri, store):
        previous = storage.read_json(summary_uri, store)
        if previous.get("version") == version:
            storage.delete_dir(work_uri(output_uri), store)
            if resumed_listing:  # that run did commit, after all: list what is there now
                return prepare(input_uri, output_uri, cfg, sidecar_uri=sidecar_uri, progress=progress,
                               on_stage=on_stage)
            progress(f"prepare: {output_uri} already holds this input (version {version}); nothing to do "
                     "(--force to convert again)")
            return previous

    # 3. group (with the ids, labels and split of stage 2): the plan, unless the interrupted
    # run of this version wrote it already
    work = work_uri(output_uri, version)
    plan_done = storage.join(work, PLAN_DIR, PLAN_DONE)
    stage("probe")
    if storage.exists(plan_done, store):
        plan = storage.read_json(plan_done, store)
        sidecar_report = plan["sidecar"]
        progress(f"prepare: continuing the interrupted run of version {version}")
    else:
        # Parts of this version without a plan are leftovers of a run made before --force.
        storage.delete_dir(storage.join(output_uri, S.SHARDS_DIR, version), store)
        plan = _plan(input_uri, listing.readable, sidecar_uri, sidecar_bytes, settings, store, work)
        sidecar_report = plan["sidecar"]
        storage.write_json(plan_done, plan, store)
    groups = [Group(*g) for g in plan["groups"]]

    # 4. convert + write
    stage("convert")
    finished = {posixpath.splitext(i.base_name)[0] for i in storage.list_dir(storage.join(work, DONE_DIR), store)}
    todo = [g for g in groups if g.name not in finished]
    num_files = sum(g.num_files for g in groups)
    progress(f"prepare: {len(listing.table)} audio files under {input_uri} ({num_files} to read)"
             + (f"; sidecar {sidecar_uri}: {sidecar_report['rows_matched']} of {sidecar_report['rows']} rows "
                f"matched, {sidecar_report['files_without_row']} files without a row"
                if sidecar_report else "; no sidecar")
             + f"; {len(groups)} groups of about {settings.shard_size_mb:g} MB of FLAC -> "
               f"{storage.join(output_uri, S.SHARDS_DIR, version)}"
             + (f"; {len(groups) - len(todo)} groups done before" if len(todo) < len(groups) else ""))
    converted = _run_groups(todo, input_uri=input_uri, output_uri=output_uri, version=version, settings=settings,
                            store=store, decode_cpus=cfg.decode_cpus, ray_data=ray.data)
    manifest_uri = storage.join(output_uri, S.MANIFEST_FILE)
    with storage.atomic_path(manifest_uri, store) as (fs, path), \
            pq.ParquetWriter(path, S.MANIFEST_SCHEMA, filesystem=fs, compression="zstd") as manifest:
        tally = _Tally(manifest, _listing_outcomes(input_uri, listing.rejected))
        last = time.monotonic()
        for g, table in _outcomes(groups, finished, converted, work=work, store=store):
            tally.add(g, table)
            if time.monotonic() - last > 5 or tally.files == num_files:
                last = time.monotonic()
                progress(f"prepare: {tally.files}/{num_files} files ({100 * tally.files / max(num_files, 1):.0f}%), "
                         f"{tally.accepted} accepted, {sum(s['hours'] for s in tally.splits.values()):.2f} h")
        # 5. commit: the manifest is published as this block ends, then the rejects and the summary
        stage("commit")
    summary = _commit(tally, listing, sidecar_report, output_uri, input_uri, version, settings, store, started)
    progress(f"prepare: done in {summary['seconds']:.0f} s: {summary['files_in']} files in, "
             f"{summary['accepted']} accepted ({summary['hours']:.2f} h), {summary['rejected']} rejected "
             f"{summary['rejected_by_reason']}, {len(summary['shards'])} shards")
    train_languages = summary["splits"]["train"]["languages"]
    if any(train_languages):
        progress("prepare: train hours by language: " + ", ".join(
            f"{lang or '(none)'} {v['hours']:.2f}" for lang, v in train_languages.items()))
    return summary


def _run_groups(todo: list[Group], *, input_uri: str, output_uri: str, version: str, settings: Settings,
                store: storage.Storage, decode_cpus: float, ray_data: Any) -> Iterator[tuple[str, int, pa.Table]]:
    """Stage 4 on Ray Data: one task per group; ``(split, group, outcome table)`` in the
    order of ``todo`` (a later group that finishes first waits, small, in the object store)."""
    if not todo:
        return
    items = [g.__dict__ for g in todo]
    ds = ray_data.from_items(items, override_num_blocks=len(items)).map_batches(
        _convert_group_batch,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=decode_cpus,
        fn_kwargs={"input_uri": input_uri, "out_root": output_uri, "version": version, "settings": settings,
                   "store": store},
    )
    ds.context.execution_options.preserve_order = True
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in block.to_pylist():
                yield row["split"], row["group"], pa.ipc.open_stream(row["outcomes"]).read_all()
    except Exception as e:  # a task's StorageError arrives wrapped by Ray Data
        cause = storage.failure_in(e)
        if cause is None:
            raise
        raise cause from None


def _outcomes(groups: list[Group], finished: set[str], converted: Iterator[tuple[str, int, pa.Table]], *,
              work: str, store: storage.Storage) -> Iterator[tuple[Group, pa.Table]]:
    """Every group's outcome table in (split, group) order: read back for the groups an
    earlier run finished, as the tasks return them for the others."""

    def read(g: Group) -> pa.Table:
        return storage.read_table(storage.join(work, DONE_DIR, f"{g.name}.parquet"), None, store)

    before = _prefetched(read, [g for g in groups if g.name in finished])
    for g in groups:
        if g.name in finished:
            yield g, next(before)
            continue
        split, group, table = next(converted)
        if (split, group) != (g.split, g.group):
            raise RuntimeError(f"prepare: group {split}-{group:05d} came back where {g.name} was expected")
        yield g, table


def _plan(input_uri: str, readable: pa.Table, sidecar_uri: str | None, sidecar_bytes: bytes | None,
          settings: Settings, store: storage.Storage, work: str) -> dict[str, Any]:
    """Stages 2-3: ids, labels, split, probe and groups; the plan written under ``work``."""
    rels = readable.column("rel")
    ids = assign_id_column(rels)
    sidecar_report = None
    transcripts = speakers = label_languages = pa.nulls(len(ids), pa.string())
    if sidecar_uri and sidecar_bytes is not None:
        # Labels are the one per-file state held in Python here: a sidecar is read whole.
        labels, sidecar_report = match(parse_sidecar(sidecar_bytes, sidecar_uri), rels.to_pylist(), ids.to_pylist())
        transcripts = pa.array([x.transcript if x else None for x in labels], pa.string())
        speakers = pa.array([x.speaker if x else None for x in labels], pa.string())
        label_languages = pa.array([x.language if x else None for x in labels], pa.string())
        del labels
    languages = language_column(rels, label_languages, settings.language)
    known = {s for s in pc.unique(speakers).to_pylist() if s}
    check_valid_speakers(settings.valid_speakers, known, sidecar_uri)
    valid = split_column(ids, speakers, settings)
    order = _hash01_column(ids, "order")
    exts = np.asarray(extensions(rels).to_numpy(zero_copy_only=False), dtype=object)
    sizes = readable.column("size").to_numpy()
    probes = {ext: [(rels[int(i)].as_py(), int(sizes[i])) for i in rows]
              for ext, rows in probe_choice(exts, sizes, order).items()}
    ratios = calibrate_output_ratios(input_uri, probes, settings.sample_rate, store)
    expected = expected_bytes(exts, sizes, ratios)
    table = pa.table({"rel": rels, S.ID: ids, "size": sizes, "expected": expected, S.TRANSCRIPT: transcripts,
                      S.SPEAKER: speakers, S.LANGUAGE: languages}, schema=PLAN_SCHEMA)
    groups: list[list[Any]] = []
    files: list[pa.Table] = []
    part = 0

    def flush() -> None:
        nonlocal part
        if files:
            name = f"part-{part:05d}.parquet"
            with storage.atomic_path(storage.join(work, PLAN_DIR, name), store) as (fs, path):
                with pq.ParquetWriter(path, PLAN_SCHEMA, filesystem=fs, compression="zstd") as w:
                    for t in files:
                        w.write_table(t, row_group_size=max(1, t.num_rows))
            files.clear()
            part += 1

    for split in S.SPLITS:
        rows = np.flatnonzero(valid if split == "valid" else ~valid)
        if not len(rows):
            continue
        # Hash order, ties (never seen in 64 bits) by id.
        ranked = pc.sort_indices(pa.table({"h": order[rows], "id": ids.take(pa.array(rows))}),
                                 [("h", "ascending"), ("id", "ascending")]).to_numpy()
        rows = rows[ranked]
        cut = cut_groups(expected[rows], settings.shard_size_mb)
        bounds = np.flatnonzero(np.diff(cut)) + 1
        for g, members in enumerate(np.split(rows, bounds)):
            files.append(table.take(pa.array(members)))
            groups.append([split, g, f"part-{part:05d}.parquet", len(files) - 1, len(members)])
            if len(files) == GROUPS_PER_PLAN_FILE:
                flush()
    flush()
    if sum(g[4] for g in groups) != table.num_rows:
        raise RuntimeError(f"prepare: the groups hold {sum(g[4] for g in groups)} files of {table.num_rows}")
    return {"groups": groups, "ratios": ratios, "sidecar": sidecar_report}


def _prefetched(fn: Callable[[Any], Any], items: list[Any], ahead: int = 16) -> Iterator[Any]:
    """``fn(item)`` for each item in order, up to ``ahead`` fetched in parallel: the commit reads
    thousands of small outcome files, each a round trip, but never holds more than ``ahead``."""
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: list[Any] = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _listing_outcomes(input_uri: str, rejected: pa.Table) -> pa.Table:
    """Reject rows for the paths the listing already knows will not be read."""
    prefix = storage.join(input_uri, "x")[:-1]
    return pa.table({
        S.SOURCE_URI: pc.binary_join_element_wise(prefix, rejected.column("rel"), ""),
        S.REASON: rejected.column(S.REASON), S.DETAIL: rejected.column(S.DETAIL),
    }).cast(S.REJECTS_SCHEMA)


class _Tally:
    """The outcome tables, in (split, group) order, written into the manifest (thus sorted by
    split, shard, row) and counted for the summary; only the rejects are kept, for their table."""

    def __init__(self, manifest: pq.ParquetWriter, listing_rejects: pa.Table) -> None:
        self.manifest = manifest
        self.rejects = [listing_rejects]
        self.reasons: Counter[str] = Counter(listing_rejects.column(S.REASON).to_pylist())
        self.shards: dict[str, dict[str, Any]] = {}
        # "languages": per language, "" for the utterances nothing gave one (summed per group,
        # sorted at the commit)
        self.splits: dict[str, dict[str, Any]] = {split: {"utterances": 0, "hours": 0.0, "shards": 0,
                                                          "languages": {}} for split in S.SPLITS}
        self.files = 0
        self.accepted = 0

    def add(self, g: Group, result: pa.Table) -> None:
        if result.num_rows != g.num_files:
            raise RuntimeError(f"prepare lost track of files: group {g.name} has {result.num_rows} outcomes for "
                               f"{g.num_files} files; nothing was committed")
        ok = result.column(S.REASON).is_null()
        accepted = result.filter(ok)
        rejected = result.filter(pc.invert(ok))
        self.manifest.write_table(accepted.select(S.MANIFEST_SCHEMA.names).cast(S.MANIFEST_SCHEMA))
        self.rejects.append(rejected.select(S.REJECTS_SCHEMA.names).cast(S.REJECTS_SCHEMA))
        self.reasons.update(rejected.column(S.REASON).to_pylist())
        self.files += result.num_rows
        self.accepted += accepted.num_rows
        self.splits[g.split]["utterances"] += accepted.num_rows
        self.splits[g.split]["hours"] += float(pc.sum(accepted.column(S.DURATION)).as_py() or 0.0) / 3600
        by_language = self.splits[g.split]["languages"]
        for rec in accepted.group_by(S.LANGUAGE).aggregate([(S.DURATION, "count"), (S.DURATION, "sum")]).to_pylist():
            lang = by_language.setdefault(rec[S.LANGUAGE] or "", {"utterances": 0, "hours": 0.0})
            lang["utterances"] += rec[f"{S.DURATION}_count"]
            lang["hours"] += float(rec[f"{S.DURATION}_sum"] or 0.0) / 3600
        per_shard = accepted.group_by(S.SHARD).aggregate(
            [(S.NUM_SAMPLES, "count"), (S.NUM_SAMPLES, "sum"), ("audio_bytes", "sum")])
        for rec in per_shard.to_pylist():
            s = self.shards.setdefault(rec[S.SHARD], {"path": rec[S.SHARD], "split": g.split, "num_rows": 0,
                                                      "num_samples": 0, "num_bytes": 0})
            s["num_rows"] += rec[f"{S.NUM_SAMPLES}_count"]
            s["num_samples"] += rec[f"{S.NUM_SAMPLES}_sum"]
            s["num_bytes"] += rec["audio_bytes_sum"]


def _commit(
    tally: _Tally, listing: Listing, sidecar_report: dict[str, Any] | None, output_uri: str, input_uri: str,
    version: str, settings: Settings, store: storage.Storage, started: float,
) -> dict[str, Any]:
    """Stage 5, after the manifest: rejects, then the summary (the commit point); the work area removed."""
    rejects, shards, reasons, splits = tally.rejects, tally.shards, tally.reasons, tally.splits
    accepted_total = tally.accepted
    rejected_table = pa.concat_tables(rejects).sort_by(S.SOURCE_URI)
    storage.write_table(storage.join(output_uri, S.REJECTS_FILE), rejected_table, store, compression="zstd")
    for s in shards.values():
        splits[s["split"]]["shards"] += 1
    for split in splits.values():
        split["languages"] = dict(sorted(split["languages"].items()))
    summary = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version,
        "input": input_uri,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "sample_rate": settings.sample_rate,
        "settings": settings.__dict__,
        "files_in": listing.table.num_rows,
        "accepted": accepted_total,
        "rejected": rejected_table.num_rows,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rejected_signal_lost": reasons.get(REASON_SIGNAL_LOST, 0),
        "files_not_audio": listing.not_audio,
        "directories_skipped": {
            "repeated": len(listing.repeated_dirs),
            "unreadable": len(listing.unreadable_dirs),
            "examples": (listing.repeated_dirs + listing.unreadable_dirs)[:EXAMPLES],
        },
        "sidecar": sidecar_report,
        "hours": sum(v["hours"] for v in splits.values()),
        "splits": splits,
        "shards": sorted(shards.values(), key=lambda s: s["path"]),
    }
    if summary["accepted"] + summary["rejected"] != summary["files_in"]:
        raise RuntimeError(f"prepare: accepted + rejected != files in ({summary['accepted']} + "
                           f"{summary['rejected']} != {summary['files_in']}); nothing was committed")
    storage.write_json(storage.join(output_uri, S.SUMMARY_FILE), summary, store)
    # Older versions are unreachable now that the summary names this one; the work area is done.
    fs, _ = storage.resolve(output_uri, store)
    for child in storage.list_dir(storage.join(output_uri, S.SHARDS_DIR), store):
        if child.type == pafs.FileType.Directory and posixpath.basename(child.path) != version:
            fs.delete_dir(child.path)
    storage.delete_dir(work_uri(output_uri), store)
    return summary
