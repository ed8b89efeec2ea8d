"""Raw audio files under a directory or s3:// prefix -> Parquet shards of 16 kHz FLAC.

Stages, each with the rows it produces:

1. list (driver, :mod:`pipeline.data.listing`): every path with an audio extension under
   the input root -> ``(relative path, size, mtime)``, or a reject found from the listing
   alone (a name that is not UTF-8, a broken link, a second path to one file, a pipe);
   other files counted by extension. Ids are the relative paths without extension,
   unique by construction.
2. label (driver, :mod:`pipeline.data.sidecar`): transcript, speaker and language from a
   sidecar TSV when there is one, with a report of rows and files that match nothing; a
   language the sidecar does not give from ``data.prepare_language`` (a code, or
   ``folder``: the first folder of the path); the split (train/valid) from a hash of the
   id, so it never changes between runs.
3. group (driver): per split, files in hash order (each shard a random mix of the
   corpus, not one speaker or book) cut into groups of about ``data.shard_size_mb`` of
   expected FLAC output; the expectation per input byte comes from the headers of a
   few files of each extension (the probe).
4. convert + write (a Ray Data task per group, ``data.decode_cpus`` each): read each
   file once, decode, down-mix, set the level, resample, encode FLAC and check that the
   signal survived (:func:`pipeline.data.audio.convert`), and append it to the group's
   shard file, rolling to a new part past the target size. One outcome row per file
   comes back: where it went (shard, row) or why it was rejected (``reason``, ``detail``).
5. commit (driver): ``manifest.parquet``, ``rejects.parquet``, then ``summary.json``,
   the commit point that names the shard files (schema.py has the layout).

Every listed path ends up in exactly one of the shards or the rejects, which the driver
checks before committing (``accepted + rejected == files_in``). Shards live under a
version directory named by a fingerprint of the input listing and the settings; a
rerun over the same input finds ``summary.json`` with that version and stops, a rerun
over changed input writes a new version and removes the old one after the commit, so
rows are never duplicated and readers never see half a dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.data.audio import Converted, Rejected, convert, estimate_seconds
from pipeline.data.listing import Entry, Listing, assign_ids, audio_extension, list_input
from pipeline.data.sidecar import EXAMPLES, match, parse_sidecar
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


def split_of(utt_id: str, valid_fraction: float, speaker: str | None = None,
             valid_speakers: tuple[str, ...] | frozenset[str] = ()) -> str:
    """Deterministic train/valid split: every utterance of ``valid_speakers``, and a
    ``valid_fraction`` of the rest chosen by the id alone."""
    if speaker is not None and speaker in valid_speakers:
        return "valid"
    return "valid" if _hash01(utt_id, "split") < valid_fraction else "train"


def language_of(rel: str, label_language: str | None, prepare_language: str) -> str | None:
    """A file's language: its sidecar row's, else its first folder's (``prepare_language``
    ``folder``), else ``prepare_language`` itself; None when nothing names one. The most
    specific source wins, so one sidecar can correct a folder layout file by file."""
    if label_language:
        return label_language
    if prepare_language == "folder":
        head, sep, _ = rel.partition("/")
        return head if sep and head else None
    return prepare_language or None


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
    files: list[InputFile], sample_rate: int, store: storage.Storage | None = None, per_extension: int = 16
) -> dict[str, float]:
    """FLAC bytes per input byte for each extension, from the headers of a few files.

    A 44.1 kHz stereo wav shrinks about 10x on its way to 16 kHz mono FLAC, a 16 kHz
    mono one about 2x: without this, shards of such corpora would come out far from
    ``shard_size_mb``. Reads 64 KiB of at most ``per_extension`` files per extension.
    """
    by_ext: dict[str, list[InputFile]] = {}
    for f in sorted(files, key=lambda f: _hash01(f.id, "probe")):
        group = by_ext.setdefault(audio_extension(f.rel) or "", [])
        if len(group) < per_extension and f.size > 0:
            group.append(f)

    def ratio(f: InputFile) -> float | None:
        try:
            fs, path = storage.resolve(f.uri, store)
            with fs.open_input_file(path) as handle:
                head = handle.read_at(min(f.size, _PROBE_BYTES), 0)
        except OSError:
            return None
        seconds = estimate_seconds(head, f.size)
        return None if seconds is None else seconds * sample_rate * _FLAC_BYTES_PER_SAMPLE / f.size

    out = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for ext, group in by_ext.items():
            found = [r for r in pool.map(ratio, group) if r is not None]
            if found:
                out[ext] = float(np.median(found))
    return out


def expected_output_bytes(f: InputFile, ratios: dict[str, float] | None = None) -> float:
    ext = audio_extension(f.rel) or ""
    ratio = (ratios or {}).get(ext) or _OUTPUT_RATIO.get(ext, _PCM_RATIO)
    return f.size * ratio


def plan_groups(
    files: list[InputFile], shard_size_mb: float, ratios: dict[str, float] | None = None
) -> list[tuple[str, int, list[InputFile]]]:
    """``(split, group index, files)``: per split, hash-ordered files cut by expected size.

    A last group expected below half the target joins the one before it.
    """
    target = shard_size_mb * (1 << 20)
    groups: list[tuple[str, int, list[InputFile]]] = []
    for split in S.SPLITS:
        members = sorted((f for f in files if f.split == split), key=lambda f: (_hash01(f.id, "order"), f.id))
        cut: list[list[InputFile]] = []
        current: list[InputFile] = []
        size = 0.0
        for f in members:
            est = expected_output_bytes(f, ratios)
            if current and size + est > target:
                cut.append(current)
                current, size = [], 0.0
            current.append(f)
            size += est
        if current:
            if cut and size < target / 2:
                cut[-1].extend(current)
            else:
                cut.append(current)
        groups.extend((split, i, members_) for i, members_ in enumerate(cut))
    return groups


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
    """Read the file once and convert it; whatever goes wrong is this file's reject, never the job's end."""
    kwargs = dict(sample_rate=settings.sample_rate, min_seconds=settings.min_seconds, max_seconds=settings.max_seconds)
    try:
        fs, path = storage.resolve(f.uri, store)
        if f.size <= WHOLE_READ_LIMIT:
            with fs.open_input_stream(path) as stream:
                return convert(stream.read(), **kwargs)
        with fs.open_input_file(path) as handle:
            return convert(handle, **kwargs)
    except OSError as e:  # permissions, a vanished key, the store failing on this object
        return Rejected(REASON_UNREADABLE, f"cannot read the file: {_first_line(e)}")
    except Exception as e:  # a bug: the detail says where, the other files go on
        return Rejected(REASON_ERROR, f"unexpected {type(e).__name__} while converting: "
                                      f"{_first_line(e) or 'no message'} (please report it)")


def _first_line(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return text[0][:300] if text else ""


def convert_group(
    split: str, group: int, files: list[InputFile], *, out_root: str, version: str, settings: Settings,
    store: storage.Storage, ratios: dict[str, float] | None = None,
) -> pa.Table:
    """Convert one group's files into its shard part(s); one outcome row per file."""
    writer = _ShardWriter(
        out_root, f"{S.SHARDS_DIR}/{version}/{split}", group, settings.shard_size_mb * (1 << 20), store
    )
    outcomes: list[dict[str, Any]] = []
    try:
        expected = [expected_output_bytes(f, ratios) for f in files]
        remaining = float(sum(expected))
        for f, est in zip(files, expected, strict=True):
            result = _read_and_convert(f, settings, store)
            base = {S.SOURCE_URI: f.uri, S.ID: f.id, S.SPLIT: split, S.TRANSCRIPT: f.transcript, S.SPEAKER: f.speaker,
                    S.LANGUAGE: f.language}
            if isinstance(result, Rejected):
                outcomes.append({**base, S.REASON: result.reason, S.DETAIL: result.detail})
                remaining -= est
                continue
            shard, row = writer.add({
                S.ID: f.id, S.AUDIO: result.flac, S.NUM_SAMPLES: result.num_samples,
                S.SAMPLE_RATE: result.sample_rate, S.DURATION: result.duration, S.SOURCE_URI: f.uri,
                S.TRANSCRIPT: f.transcript, S.SPEAKER: f.speaker, S.LANGUAGE: f.language,
            }, remaining)
            remaining -= est
            outcomes.append({
                **base, S.SHARD: shard, S.ROW: row, S.NUM_SAMPLES: result.num_samples,
                S.SAMPLE_RATE: result.sample_rate, S.DURATION: result.duration,
                S.SOURCE_SAMPLE_RATE: result.source_sample_rate, S.SOURCE_CHANNELS: result.source_channels,
                "audio_bytes": len(result.flac),
            })
    finally:
        writer.close()
    return pa.Table.from_pylist(outcomes, schema=S.OUTCOME_SCHEMA)


def _convert_group_batch(batch: pa.Table, *, out_root: str, version: str, settings: Settings,
                         store: storage.Storage, ratios: dict[str, float]) -> pa.Table:
    tables = []
    for row in batch.to_pylist():
        files = [InputFile(**f) for f in json.loads(row["files"])]
        tables.append(convert_group(
            row["split"], row["group"], files, out_root=out_root, version=version, settings=settings, store=store,
            ratios=ratios,
        ))
    return pa.concat_tables(tables) if tables else S.OUTCOME_SCHEMA.empty_table()


# --- the job -----------------------------------------------------------------------------------


def fingerprint(input_uri: str, entries: list[Entry], settings: Settings, sidecar: bytes | None) -> str:
    h = hashlib.sha1()
    described = dict(settings.__dict__)
    for name in ("valid_speakers", "language"):
        if not described[name]:
            del described[name]  # outputs prepared before the setting existed stay current
    h.update(json.dumps({"format": FORMAT_VERSION, "convert": CONVERT_VERSION, "settings": described},
                        sort_keys=True).encode())
    for e in entries:
        problem = f"\t{e.problem.reason}" if e.problem else ""
        h.update(f"{storage.join(input_uri, e.rel)}\t{e.size}\t{e.mtime_ns}{problem}\n".encode())
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
) -> dict[str, Any]:
    """Run the prepare job (Ray must be initialised); returns the summary it committed."""
    import ray.data

    store = storage.Storage.from_config(cfg.s3_endpoint, cfg.s3_region)
    storage.check_reachable(input_uri, store)
    storage.ensure_bucket(output_uri, store)
    settings = Settings.from_config(cfg)

    # 1. list
    started = time.monotonic()
    listing = list_input(input_uri, store)
    if not listing.entries:
        others = ", ".join(f"{ext or '(no extension)'}: {n}" for ext, n in listing.not_audio.items())
        raise ValueError(
            f"--input: no audio files under {input_uri!r} (extensions: {', '.join(sorted(S.AUDIO_EXTENSIONS))})"
            + (f"; it holds {others}" if others else "")
        )
    readable = [e for e in listing.entries if e.problem is None]
    ids = assign_ids([e.rel for e in readable])
    for what, dirs in (("reached again through a link (walked once)", listing.repeated_dirs),
                       ("that could not be listed", listing.unreadable_dirs)):
        if dirs:
            progress(f"prepare: {len(dirs)} directories {what}: {', '.join(dirs[:5])}{' ...' if len(dirs) > 5 else ''}")

    # 2. label
    sidecar_bytes: bytes | None = None
    sidecar = None
    if sidecar_uri is None and storage.exists(storage.join(input_uri, S.SIDECAR_FILE), store):
        sidecar_uri = storage.join(input_uri, S.SIDECAR_FILE)
    if sidecar_uri:
        sidecar_bytes = storage.read_bytes(sidecar_uri, store)
        sidecar = parse_sidecar(sidecar_bytes, sidecar_uri)
    labels, sidecar_report = match(sidecar, [e.rel for e in readable], ids)
    files = []
    for entry, utt_id, label in zip(readable, ids, labels, strict=True):
        transcript, speaker = (label.transcript, label.speaker) if label else (None, None)
        files.append(InputFile(
            uri=storage.join(input_uri, entry.rel), rel=entry.rel, id=utt_id, size=entry.size,
            split=split_of(utt_id, settings.valid_fraction, speaker, settings.valid_speakers),
            transcript=transcript, speaker=speaker,
            language=language_of(entry.rel, label.language if label else None, settings.language),
        ))
    check_valid_speakers(settings.valid_speakers, {f.speaker for f in files if f.speaker}, sidecar_uri)
    version = fingerprint(input_uri, listing.entries, settings, sidecar_bytes)
    summary_uri = storage.join(output_uri, S.SUMMARY_FILE)
    if not force and storage.exists(summary_uri, store):
        previous = storage.read_json(summary_uri, store)
        if previous.get("version") == version:
            progress(f"prepare: {output_uri} already holds this input (version {version}); nothing to do "
                     "(--force to convert again)")
            return previous
    progress(f"prepare: {len(listing.entries)} audio files under {input_uri} ({len(files)} to read)"
             + (f"; sidecar {sidecar_uri}: {sidecar_report['rows_matched']} of {sidecar_report['rows']} rows "
                f"matched, {sidecar_report['files_without_row']} files without a row"
                if sidecar_report else "; no sidecar"))

    # 3. group
    ratios = calibrate_output_ratios(files, settings.sample_rate, store)
    groups = plan_groups(files, settings.shard_size_mb, ratios)
    progress(f"prepare: {len(groups)} groups of about {settings.shard_size_mb:g} MB of FLAC -> "
             f"{storage.join(output_uri, S.SHARDS_DIR, version)}")

    # 4. convert + write
    version_root = storage.join(output_uri, S.SHARDS_DIR, version)
    storage.delete_dir(version_root, store)  # leftovers of an interrupted run of this version
    items = [
        {"split": split, "group": g, "files": json.dumps([f.__dict__ for f in members])}
        for split, g, members in groups
    ]
    outcomes = [_listing_outcomes(input_uri, listing)]
    batches: Any = []
    if items:
        batches = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _convert_group_batch,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=cfg.decode_cpus,
            fn_kwargs={"out_root": output_uri, "version": version, "settings": settings, "store": store,
                       "ratios": ratios},
        ).iter_batches(batch_size=None, batch_format="pyarrow")
    done = accepted = 0
    hours = 0.0
    last = time.monotonic()
    for table in batches:
        outcomes.append(table)
        done += table.num_rows
        ok = table.column(S.REASON).is_null()
        accepted += int(pa.compute.sum(ok).as_py() or 0)
        hours += float(pa.compute.sum(pa.compute.filter(table.column(S.DURATION), ok)).as_py() or 0.0) / 3600
        if time.monotonic() - last > 5 or done == len(files):
            last = time.monotonic()
            progress(f"prepare: {done}/{len(files)} files ({100 * done / len(files):.0f}%), "
                     f"{accepted} accepted, {done - accepted} rejected, {hours:.2f} h")

    # 5. commit
    result = pa.concat_tables(outcomes)
    _check_complete([storage.join(input_uri, e.rel) for e in listing.entries], result)
    summary = _commit(result, listing, sidecar_report, output_uri, input_uri, version, settings, store, started)
    progress(f"prepare: done in {summary['seconds']:.0f} s: {summary['files_in']} files in, "
             f"{summary['accepted']} accepted ({summary['hours']:.2f} h), {summary['rejected']} rejected "
             f"{summary['rejected_by_reason']}, {len(summary['shards'])} shards")
    train_languages = summary["splits"]["train"]["languages"]
    if any(train_languages):
        progress("prepare: train hours by language: " + ", ".join(
            f"{lang or '(none)'} {v['hours']:.2f}" for lang, v in train_languages.items()))
    return summary


def _listing_outcomes(input_uri: str, listing: Listing) -> pa.Table:
    """Reject rows for the paths the listing already knows will not be read."""
    return pa.Table.from_pylist([
        {S.SOURCE_URI: storage.join(input_uri, e.rel), S.REASON: e.problem.reason, S.DETAIL: e.problem.detail}
        for e in listing.entries if e.problem is not None
    ], schema=S.OUTCOME_SCHEMA)


def _check_complete(uris: list[str], result: pa.Table) -> None:
    seen = Counter(result.column(S.SOURCE_URI).to_pylist())
    expected = set(uris)
    missing = expected - set(seen)
    doubled = [u for u, c in seen.items() if c > 1]
    extra = set(seen) - expected
    if missing or doubled or extra:
        raise RuntimeError(
            f"prepare lost track of files: {len(missing)} without an outcome (e.g. {sorted(missing)[:3]}), "
            f"{len(doubled)} with two (e.g. {doubled[:3]}), {len(extra)} unexpected; nothing was committed"
        )


def _commit(
    result: pa.Table, listing: Listing, sidecar_report: dict[str, Any] | None, output_uri: str, input_uri: str,
    version: str, settings: Settings, store: storage.Storage, started: float,
) -> dict[str, Any]:
    accepted_mask = result.column(S.REASON).is_null()
    accepted = result.filter(accepted_mask)
    rejected = result.filter(pa.compute.invert(accepted_mask))
    order = pa.compute.sort_indices(accepted, [(S.SPLIT, "ascending"), (S.SHARD, "ascending"), (S.ROW, "ascending")])
    manifest = accepted.take(order).select(S.MANIFEST_SCHEMA.names).cast(S.MANIFEST_SCHEMA)
    rejects = rejected.select(S.REJECTS_SCHEMA.names).sort_by(S.SOURCE_URI).cast(S.REJECTS_SCHEMA)
    fs, out_root = storage.resolve(output_uri, store)
    fs.create_dir(out_root, recursive=True)
    pq.write_table(manifest, f"{out_root}/{S.MANIFEST_FILE}", filesystem=fs, compression="zstd")
    pq.write_table(rejects, f"{out_root}/{S.REJECTS_FILE}", filesystem=fs, compression="zstd")

    shards: dict[str, dict[str, Any]] = {}
    for rec in accepted.select([S.SHARD, S.SPLIT, S.NUM_SAMPLES, "audio_bytes"]).to_pylist():
        s = shards.setdefault(rec[S.SHARD], {"path": rec[S.SHARD], "split": rec[S.SPLIT], "num_rows": 0,
                                             "num_samples": 0, "num_bytes": 0})
        s["num_rows"] += 1
        s["num_samples"] += rec[S.NUM_SAMPLES]
        s["num_bytes"] += rec["audio_bytes"]
    reasons = Counter(rejected.column(S.REASON).to_pylist())
    durations = accepted.column(S.DURATION).to_numpy() if accepted.num_rows else np.zeros(0)
    splits_col = np.asarray(accepted.column(S.SPLIT).to_pylist())
    languages_col = np.asarray([v or "" for v in accepted.column(S.LANGUAGE).to_pylist()])
    splits = {
        split: {
            "utterances": int((splits_col == split).sum()),
            "hours": float(durations[splits_col == split].sum() / 3600) if len(durations) else 0.0,
            "shards": sum(1 for s in shards.values() if s["split"] == split),
            # "" counts the utterances nothing gave a language
            "languages": {
                lang: {"utterances": int(((splits_col == split) & (languages_col == lang)).sum()),
                       "hours": float(durations[(splits_col == split) & (languages_col == lang)].sum() / 3600)}
                for lang in sorted(set(languages_col[splits_col == split].tolist()))
            },
        }
        for split in S.SPLITS
    }
    summary = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version,
        "input": input_uri,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "sample_rate": settings.sample_rate,
        "settings": settings.__dict__,
        "files_in": len(listing.entries),
        "accepted": accepted.num_rows,
        "rejected": rejected.num_rows,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rejected_signal_lost": reasons.get(REASON_SIGNAL_LOST, 0),
        "files_not_audio": listing.not_audio,
        "directories_skipped": {
            "repeated": len(listing.repeated_dirs),
            "unreadable": len(listing.unreadable_dirs),
            "examples": (listing.repeated_dirs + listing.unreadable_dirs)[:EXAMPLES],
        },
        "sidecar": sidecar_report,
        "hours": float(durations.sum() / 3600),
        "splits": splits,
        "shards": sorted(shards.values(), key=lambda s: s["path"]),
    }
    if summary["accepted"] + summary["rejected"] != summary["files_in"]:
        raise RuntimeError(f"prepare: accepted + rejected != files in ({summary})")
    storage.write_json(storage.join(output_uri, S.SUMMARY_FILE), summary, store)
    # Older versions are unreachable now that the summary names this one.
    for child in storage.list_dir(storage.join(output_uri, S.SHARDS_DIR), store):
        if child.type == pafs.FileType.Directory and posixpath.basename(child.path) != version:
            fs.delete_dir(child.path)
    return summary
