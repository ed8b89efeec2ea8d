"""Column names and Arrow schemas of everything the data path writes, defined once.

A prepared dataset (``jobs.prepare``) is a directory or s3:// prefix holding::

    summary.json                     the commit point: counts, hours, and the shard list; what was
                                     not audio, what the sidecar did not match, why files were rejected
    manifest.parquet                 one row per accepted utterance, no audio (MANIFEST)
    rejects.parquet                  one row per unusable input path, with a reason (REJECTS;
                                     the codes are in verdicts.py)
    shards/<version>/<split>/part-GGGGG-KK.parquet   16 kHz FLAC + metadata (SHARD)
    _prepare/                        only while a run is unfinished: its saved listing, plan
                                     and finished groups, from which the same command resumes

Readers trust only ``summary.json``: it is written last and names the shard files of
the current version, so a crashed or concurrent ``prepare`` never exposes half a dataset.
"""

from __future__ import annotations

import pyarrow as pa

# --- shard / manifest columns ----------------------------------------------------------
ID = "id"
"""Utterance id: the input path relative to the input root, without the audio extension, in
Unicode NFC; the whole path where that would be ambiguous (:func:`pipeline.data.listing.assign_ids`)."""
AUDIO = "audio"
"""FLAC bytes (mono, PCM 16, ``sample_rate`` Hz)."""
NUM_SAMPLES = "num_samples"
SAMPLE_RATE = "sample_rate"
DURATION = "duration"
"""Seconds."""
SOURCE_URI = "source_uri"
SOURCE_SAMPLE_RATE = "source_sample_rate"
SOURCE_CHANNELS = "source_channels"
TRANSCRIPT = "transcript"
"""The sidecar's ``transcript`` cell as written (an empty cell stays empty); null for a file
no sidecar row names. A row whose transcript is null or blank is unlabelled: what the
training input mixes labelled and unlabelled utterances by (``data.labelled_ratio``)."""
SPEAKER = "speaker"
LANGUAGE = "language"
"""As ``jobs.prepare`` was told it (the sidecar's ``language`` column, the first folder under
the input root, or ``data.prepare_language``); null when nothing named it. What the
training input balances languages by (``data.language_alpha``)."""
SPLIT = "split"
SHARD = "shard"
"""Shard file, relative to the dataset root."""
ROW = "row"
"""Row index of the utterance inside its shard."""

# --- rejects columns -------------------------------------------------------------------
REASON = "reason"
DETAIL = "detail"

SPLITS = ("train", "valid")

SHARD_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(AUDIO, pa.binary(), nullable=False),
        pa.field(NUM_SAMPLES, pa.int64(), nullable=False),
        pa.field(SAMPLE_RATE, pa.int32(), nullable=False),
        pa.field(DURATION, pa.float64(), nullable=False),
        pa.field(SOURCE_URI, pa.string(), nullable=False),
        pa.field(TRANSCRIPT, pa.string()),
        pa.field(SPEAKER, pa.string()),
        pa.field(LANGUAGE, pa.string()),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(SHARD, pa.string(), nullable=False),
        pa.field(ROW, pa.int64(), nullable=False),
        pa.field(NUM_SAMPLES, pa.int64(), nullable=False),
        pa.field(SAMPLE_RATE, pa.int32(), nullable=False),
        pa.field(DURATION, pa.float64(), nullable=False),
        pa.field(SOURCE_URI, pa.string(), nullable=False),
        pa.field(SOURCE_SAMPLE_RATE, pa.int32(), nullable=False),
        pa.field(SOURCE_CHANNELS, pa.int32(), nullable=False),
        pa.field(TRANSCRIPT, pa.string()),
        pa.field(SPEAKER, pa.string()),
        pa.field(LANGUAGE, pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_URI, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string(), nullable=False),
    ]
)

# The per-file outcome a prepare task reports back to the driver: a manifest row when
# the file was accepted (``reason`` null), a rejects row otherwise.
OUTCOME_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_URI, pa.string(), nullable=False),
        pa.field(ID, pa.string()),  # null for paths the listing rejected
        pa.field(SPLIT, pa.string()),
        pa.field(REASON, pa.string()),
        pa.field(DETAIL, pa.string()),
        pa.field(SHARD, pa.string()),
        pa.field(ROW, pa.int64()),
        pa.field(NUM_SAMPLES, pa.int64()),
        pa.field(SAMPLE_RATE, pa.int32()),
        pa.field(DURATION, pa.float64()),
        pa.field(SOURCE_SAMPLE_RATE, pa.int32()),
        pa.field(SOURCE_CHANNELS, pa.int32()),
        pa.field(TRANSCRIPT, pa.string()),
        pa.field(SPEAKER, pa.string()),
        pa.field(LANGUAGE, pa.string()),
        pa.field("audio_bytes", pa.int64()),
    ]
)

# --- files of a prepared dataset ---------------------------------------------------------
SUMMARY_FILE = "summary.json"
MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.parquet"
SHARDS_DIR = "shards"
WORK_DIR = "_prepare"
SIDECAR_FILE = "transcripts.tsv"
"""Looked for at the input root when ``--sidecar`` is not given."""

# Extensions listed as audio (in any case). The decoders (libsndfile, then ffmpeg) decide
# what they can actually read; anything they cannot is rejected with a reason, not skipped.
AUDIO_EXTENSIONS = frozenset(
    {
        ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
        ".au", ".snd", ".caf", ".w64", ".rf64", ".sph", ".nist", ".voc",
    }
)
