"""HuBERT's labels next to the shards: their layout, the checks pretraining makes, and their
join with the training batches.

A label set (``jobs.label``, :mod:`pipeline.label`) lives under a prepared dataset::

    labels/<name>/summary.json                   the commit point (written last): version, the
                                                 settings that made it, the dataset version it
                                                 labels, frame stride and window, clusters,
                                                 files, cluster usage, purity
    labels/<name>/<version>/kmeans.npz           the centroids (a rerun reuses them)
    labels/<name>/<version>/<split>/part-*.parquet   one file per shard, named as the shard
                                                 under shards/<dataset version>/: LABEL_SCHEMA

Each file holds one row per utterance of its shard, keyed by utterance id: the cluster id
of every frame of the whole utterance (frame f starts at sample ``f * stride``). Readers
trust only ``summary.json``; the version names every setting that made the labels, so a
set relabelled with other settings, or made for another version of the shards, is refused
(:func:`open_label_set`), and a run never resumes on labels other than those it started
with (the version is part of the data position's plan).

Alignment with cropped audio (:func:`batch_targets`): with labels, crop offsets are
rounded down to a multiple of the label stride, so a crop starts on a label frame; model
frame t of a crop at offset o then starts at sample ``o + t * model_stride``, which is
label frame ``o / stride + t * model_stride / stride`` of the utterance. The model's
stride must be a multiple of the label stride (HuBERT's 20 ms model keeps every second
label of 10 ms MFCC frames); any other rate is refused. A frame's window lies inside the
crop exactly when it lies inside the utterance, so every frame the model sees has its
label. The loader hands them over at the model's frame rate, -1 past the labels.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data import schema as S
from pipeline.data import storage

LABELS_DIR = "labels"
KMEANS_FILE = "kmeans.npz"
FORMAT = "wavray-labels"
FORMAT_VERSION = 1
LABELS = "labels"
NUM_FRAMES = "num_frames"
LABEL_SCHEMA = pa.schema([
    pa.field(S.ID, pa.string(), nullable=False),
    pa.field(NUM_FRAMES, pa.int64(), nullable=False),
    pa.field(LABELS, pa.list_(pa.int16()), nullable=False),
])
MAX_CLUSTERS = 32767
"""Ids are stored as int16."""

# Columns of the batch rows (``pipeline.data.loader``) when a run trains on labels.
TARGET_IDS = "target_ids"
TARGET_WIDTH = "target_width"


def set_uri(data_uri: str, name: str) -> str:
    """Where the label set ``name`` of the dataset at ``data_uri`` lives."""
    if not name or "/" in name:
        raise ValueError(f"label set name: expected a folder name, got {name!r}")
    return storage.join(data_uri, LABELS_DIR, name)


def shard_label_path(shard_path: str) -> str:
    """The label file of a shard, relative to the label set's version folder:
    ``shards/<dataset version>/<split>/part-X.parquet`` -> ``<split>/part-X.parquet``."""
    parts = shard_path.split("/")
    if len(parts) < 3 or parts[0] != S.SHARDS_DIR:
        raise ValueError(f"shard path {shard_path!r}: expected {S.SHARDS_DIR}/<version>/<split>/<file>")
    return posixpath.join(*parts[2:])


def expected_frames(num_samples: int | np.ndarray, *, stride: int, window: int) -> Any:
    """Frames of ``num_samples`` samples: one per ``stride`` whose ``window`` fits (0 when none)."""
    n = np.asarray(num_samples, dtype=np.int64)
    out = np.where(n >= window, (n - window) // stride + 1, 0)
    return int(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class LabelSpec:
    """What the training input needs of a committed label set (small and picklable)."""

    uri: str
    """The label set's version folder (``labels/<name>/<version>``)."""
    name: str
    version: str
    dataset_version: str
    stride: int
    """Samples between label frames."""
    model_stride: int
    """Samples between the model's frames (a multiple of ``stride``)."""
    clusters: int

    @property
    def ratio(self) -> int:
        return self.model_stride // self.stride

    def shard_uri(self, shard_path: str) -> str:
        return storage.join(self.uri, shard_label_path(shard_path))

    def check_position(self, position: dict | None) -> None:
        """A resumed run continues on the labels it started with: its data position's plan
        names them (:func:`plan_key`)."""
        plan = (position or {}).get("plan") or ""
        data = plan.split("/", 1)[0]
        if "+" not in data:
            if position and plan:
                raise ValueError(
                    f"data position: the run being resumed trained without labels; labels {self.name!r} "
                    f"(version {self.version}) cannot join it: start a new run (checkpoint.run_name)"
                )
            return
        saved = data.split("+", 1)[1]
        if saved != self.version:
            raise ValueError(
                f"labels {self.name!r}: the run being resumed trained on label version {saved}, the label set now "
                f"holds version {self.version} (relabelled since); a run cannot change its targets midway: start a "
                "new run (checkpoint.run_name), or relabel with the settings the run started with"
            )

    def plan_key(self, dataset_version: str) -> str:
        """The dataset part of a data position's plan: the shards' and the labels' versions."""
        return f"{dataset_version}+{self.version}"


def read_summary(uri: str, store: storage.Storage | None = None) -> dict[str, Any] | None:
    """The committed ``summary.json`` of the label set at ``uri``; None when there is none."""
    path = storage.join(uri, S.SUMMARY_FILE)
    if not storage.exists(path, store):
        return None
    summary = storage.read_json(path, store)
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise ValueError(f"{path}: not a wavray label set summary")
    if summary.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: label format version {summary.get('format_version')!r}, this wavray reads {FORMAT_VERSION}; "
            "label the dataset again (jobs.label)"
        )
    return summary


def open_label_set(
    data_uri: str,
    name: str,
    *,
    dataset_version: str,
    model_stride: int,
    clusters: int,
    version: str | None = None,
    store: storage.Storage | None = None,
    how_to_make: str = "python -m jobs.label",
) -> LabelSpec:
    """The committed label set ``name`` of the dataset at ``data_uri``, checked against what a
    run needs: the dataset version it labels, a frame rate the model's frames align with,
    the model's number of clusters, and (``version``) the settings the run names. Every
    mismatch is a ``ValueError`` that says what differs and what to run."""
    uri = set_uri(data_uri, name)
    summary = read_summary(uri, store)
    if summary is None:
        raise ValueError(f"labels {name!r}: no label set at {uri} (no {S.SUMMARY_FILE}); make it with `{how_to_make}`")
    where = storage.join(uri, S.SUMMARY_FILE)
    try:
        spec = LabelSpec(
            uri=storage.join(uri, str(summary["version"])), name=name, version=str(summary["version"]),
            dataset_version=str(summary["dataset_version"]), stride=int(summary["stride"]),
            model_stride=int(model_stride), clusters=int(summary["clusters"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a wavray label set summary ({type(e).__name__}: {e})") from None
    if spec.dataset_version != dataset_version:
        raise ValueError(
            f"labels {name!r} ({where}) label version {spec.dataset_version} of the shards; {data_uri} now holds "
            f"version {dataset_version} (prepared again since): label it again with `{how_to_make}`"
        )
    if spec.stride < 1 or model_stride % spec.stride:
        raise ValueError(
            f"labels {name!r} ({where}): one label every {spec.stride} samples ({16000 / max(spec.stride, 1):g} Hz "
            f"at 16 kHz), the model has a frame every {model_stride} samples; labels of another frame rate align "
            "with the model's frames only when its stride is a multiple of theirs: label with the model's frame rate"
        )
    if spec.clusters != clusters:
        raise ValueError(
            f"labels {name!r} ({where}) have {spec.clusters} clusters, the model predicts {clusters} "
            "(model.hubert.clusters): label with the model's number of clusters, or set model.hubert.clusters"
        )
    if version is not None and spec.version != version:
        made = summary.get("settings", {})
        raise ValueError(
            f"labels {name!r} ({where}) are version {spec.version}, made with other settings than this run's "
            f"(which give version {version}); they were made with {made}: label again with `{how_to_make}`"
        )
    return spec


def read_shard_labels(spec: LabelSpec, shard_path: str, store: storage.Storage | None = None) -> dict[str, np.ndarray]:
    """Utterance id -> its labels (int16, one per label frame) for one shard."""
    uri = spec.shard_uri(shard_path)
    if not storage.exists(uri, store):
        raise ValueError(f"labels {spec.name!r}: {uri} is missing although {S.SUMMARY_FILE} names the set complete")
    table = storage.read_table(uri, [S.ID, LABELS], store)
    ids = table.column(S.ID).to_pylist()
    col = table.column(LABELS).combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    return {utt: values[offsets[i]:offsets[i + 1]] for i, utt in enumerate(ids)}


def quantize_offsets(offsets: np.ndarray, stride: int) -> np.ndarray:
    """Crop offsets rounded down to a label frame (module doc): ``o + length <= n`` still holds."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return offsets - offsets % stride


def batch_targets(
    labels: dict[str, np.ndarray], ids: list[str], offsets: np.ndarray, lengths: np.ndarray, spec: LabelSpec
) -> np.ndarray:
    """(B, T) int16 labels at the model's frame rate for crops at ``offsets`` (multiples of the
    label stride) of ``lengths`` samples; -1 where an utterance has no label (past its end).

    T covers every model frame that starts inside the longest crop; the training step keeps
    the frames its front end gives and checks they all have a label.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if (offsets % spec.stride).any():
        raise ValueError(f"crop offsets {offsets.tolist()} are not multiples of the label stride {spec.stride}")
    width = int(-(-int(lengths.max(initial=0)) // spec.model_stride))
    out = np.full((len(ids), width), -1, dtype=np.int16)  # (B, T)
    for b, (utt, offset, length) in enumerate(zip(ids, offsets.tolist(), lengths.tolist(), strict=True)):
        have = labels.get(utt)
        if have is None:
            raise ValueError(f"labels {spec.name!r}: no labels for utterance {utt!r} (is the label set complete?)")
        frames = -(-length // spec.model_stride)
        index = offset // spec.stride + np.arange(frames) * spec.ratio  # (T_b,) label frames
        index = index[index < len(have)]
        out[b, : len(index)] = have[index]
    return out


def encode_targets(targets: np.ndarray) -> dict[str, pa.Array]:
    """The batch-row columns of (B, T) int16 targets: one binary value and its width."""
    data = pa.py_buffer(np.ascontiguousarray(targets, dtype=np.int16))
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
    return {
        TARGET_IDS: pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data]),
        TARGET_WIDTH: pa.array([targets.shape[1]], pa.int64()),
    }


def decode_targets(block: pa.Table, row: int, batch_size: int) -> np.ndarray:
    """(B, T) int64 targets of batch row ``row`` of a block (inverse of :func:`encode_targets`)."""
    width = int(block.column(TARGET_WIDTH)[row].as_py())
    raw = block.column(TARGET_IDS)[row].as_buffer()
    return np.frombuffer(raw, dtype=np.int16).reshape(batch_size, width).astype(np.int64)
