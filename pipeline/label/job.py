"""The labelling job: every utterance of a prepared dataset -> its k-means cluster id per frame,
or its vq-wav2vec token per frame (``label.features=tokens``, :mod:`pipeline.label.tokens`).

Stages (``jobs.label``; Ray must be initialised):

1. settings (driver): the features (MFCC, or layer ``label.layer`` of ``label.teacher``, a
   run folder pinned to its newest checkpoint and its weights hashed), the number of
   clusters (``model.hubert.clusters``), the k-means and sample settings and the dataset's
   version give the label set's *version*. A committed set of that version: nothing to do.
2. sample (a Ray Data actor per worker, ``_Sampler``): a seeded ``label.sample_fraction``
   of the train split's utterances, featurised, thinned evenly to at most
   ``label.max_sample_frames`` frames in all. Actors hold the teacher once, on a GPU where
   the cluster has them.
3. fit (driver): scikit-learn's MiniBatchKMeans (:mod:`pipeline.label.kmeans` says why),
   saved as ``kmeans.npz`` in the version folder; a rerun reuses it.
4. label (actors, ``_Labeller``): per shard, every utterance's features -> nearest centroid
   -> one Parquet file per shard, written under a temporary name and moved into place, so
   a file is there whole or not at all. A shard whose file exists is skipped: a killed
   worker's task, retried by Ray, or a rerun of the job, redoes only the missing shards,
   and no utterance is ever labelled twice. Each file carries its shard's cluster counts
   and cluster x character co-occurrence in its footer.
5. commit (driver): every shard labelled, every utterance once with the frames its length
   gives; ``summary.json`` with the cluster usage and the purity measures
   (:mod:`pipeline.label.purity`), written last; other versions of the set removed. Its
   cost is recorded twice: elapsed ``seconds`` and ``cpu_seconds`` (the CPU time of the
   actors' work and of the fit, what a CPU compute budget counts, unmoved by other load;
   start-up, the actors' imports and model loading, is left out, as a training budget
   leaves out its own).

Tokens (``label.features=tokens``, vq-wav2vec's second stage) take the same stages with
the vq-wav2vec model at ``label.teacher`` as the features: the sample counts the frames of
every codeword pair instead of keeping features, the fit builds the vocabulary of the
``K - 1`` most frequent pairs (``vocabulary.npz``, no k-means), and each label file holds
one token id per frame; the summary adds the token usage (pairs seen, their perplexity,
the share of frames outside the vocabulary).

Layout: :mod:`pipeline.data.labels`. Pretraining (objective ``hubert``, or ``vq_bert`` on
tokens) reads the set the run's settings name through :func:`training_labels`, which
refuses any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.data import labels as L
from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.label import kmeans as K
from pipeline.label.purity import LabelStats

log = logging.getLogger("wavray.label")

TMP_DIR = "_tmp"
STATS_KEY = b"wavray.stats"
PAIRS_KEY = b"wavray.pairs"
"""Tokens: the frames of each codeword pair of a label file (before the vocabulary's remap)."""
TEACHER_FEATURES = ("model", "tokens")
"""Features that come from a model at ``label.teacher``."""
KILL_ONCE_ENV = "WAVRAY_LABEL_KILL_ONCE"
"""Fault injection for tests: a local file path; the first labelling task that finds it
absent creates it and kills its own worker (SIGKILL) between writing its file under the
temporary name and moving it into place, the worst moment for a worker to die."""


# --- settings and version ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the workers need (small and picklable: no credentials, :class:`storage.Storage`)."""

    data_uri: str
    version_uri: str
    features: str
    teacher: str
    layer: int
    max_chunk_seconds: float
    clusters: int
    seed: int
    store: storage.Storage
    tracking_uri: str = ""


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def pin_teacher(location: str, store: storage.Storage | None, tracking_uri: str = "") -> str:
    """The teacher's location as recorded: an MLflow alias becomes its version, a local path
    absolute, a run folder its newest checkpoint (a run that goes on must not change the
    labels under a job)."""
    from pipeline import model_io
    from pipeline.train.trainer import latest_checkpoint_uri

    if not location:
        raise ValueError("label.teacher: label.features=model (tokens) needs the model whose layer is clustered "
                         "(the vq-wav2vec model that tokenises), got ''")
    pinned = model_io.pin(location, tracking_uri=tracking_uri)
    if model_io.is_mlflow_uri(pinned):
        return pinned
    if storage.is_s3(pinned):
        names = {i.base_name: i.type == pafs.FileType.Directory for i in storage.list_dir(pinned, store)}
    else:
        p = Path(pinned)
        if not p.exists():
            raise ValueError(f"label.teacher: {location!r} does not exist")
        names = {c.name: c.is_dir() for c in p.iterdir()} if p.is_dir() else {}
    if names and model_io.kind_of(names, pinned) == "run":
        newest = latest_checkpoint_uri(pinned, store)
        if newest is None:
            raise ValueError(f"label.teacher: run folder {pinned!r} has no complete checkpoint yet")
        return newest
    return pinned


def teacher_digest(location: str, store: storage.Storage | None, tracking_uri: str = "") -> str:
    """A hash of the teacher's weights: labels of another model are another version."""
    from models.checkpoint import WEIGHTS_NAME
    from pipeline import model_io

    path = model_io.fetch(location, store=store, tracking_uri=tracking_uri)
    if path.is_file():
        return _digest_file(path)
    for candidate in (path / WEIGHTS_NAME, path / "pytorch_model.bin", path / model_io.BUNDLE_DIR / WEIGHTS_NAME):
        if candidate.is_file():
            return _digest_file(candidate)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return hashlib.sha256("".join(_digest_file(s) for s in shards).encode()).hexdigest()[:16]
    raise ValueError(f"label.teacher: no weights found at {location!r}")


def make_extractor(plan: Plan, device: str = "cpu") -> Any:
    """The feature extractor the plan names, on ``device``."""
    if plan.features == "mfcc":
        from pipeline.label.features import MfccFeatures

        return MfccFeatures(device)
    if plan.features == "tokens":
        from pipeline.label.tokens import TokenFeatures
        from pipeline.model_io import load_model

        trained = load_model(plan.teacher, store=plan.store, tracking_uri=plan.tracking_uri)
        return TokenFeatures(trained.model, normalize=trained.normalize, device=device)
    from pipeline.label.features import load_teacher

    return load_teacher(plan.teacher, plan.layer, max_chunk_seconds=plan.max_chunk_seconds, device=device,
                        store=plan.store, tracking_uri=plan.tracking_uri)


def kmeans_settings(cfg: Config) -> K.KMeansSettings:
    lab = cfg.label
    return K.KMeansSettings(clusters=cfg.model.label_classes, batch_size=lab.batch_size, n_init=lab.n_init,
                            max_iter=lab.max_iter, max_no_improvement=lab.max_no_improvement, seed=lab.seed)


@dataclass
class Resolved:
    """The settings of a labelling of ``cfg`` and the version they give."""

    plan: Plan
    name: str
    set_uri: str
    version: str
    settings: dict[str, Any]
    dataset: Any
    stride: int
    window: int
    extractor: Any = field(default=None, repr=False, compare=False)
    """The feature extractor ``resolve`` loaded to describe the features (the driver's; the
    workers make their own from the plan)."""


def resolve(cfg: Config, *, store: storage.Storage | None = None, tracking_uri: str = "") -> Resolved:
    """Stage 1: the label set ``cfg`` names, its settings and version (loads the teacher once)."""
    from pipeline.data.loader import read_dataset_info

    store = store or storage.Storage.from_config(cfg.data.s3_endpoint, cfg.data.s3_region)
    info = read_dataset_info(cfg.data.train_uri, store)
    lab = cfg.label
    teacher = pin_teacher(lab.teacher, store, tracking_uri) if lab.features in TEACHER_FEATURES else ""
    clusters = cfg.model.label_classes
    name = lab.set_name(clusters)
    uri = L.set_uri(cfg.data.train_uri, name)
    plan = Plan(
        data_uri=cfg.data.train_uri, version_uri="", features=lab.features, teacher=teacher, layer=lab.layer,
        max_chunk_seconds=lab.max_chunk_seconds, clusters=clusters, seed=lab.seed, store=store,
        tracking_uri=tracking_uri,
    )
    extractor = make_extractor(plan)
    features = extractor.describe()
    if teacher:
        features["teacher_weights"] = teacher_digest(teacher, store, tracking_uri)
    settings: dict[str, Any] = {
        "format_version": L.FORMAT_VERSION,
        "dataset_version": info.version,
        "features": features,
    }
    if lab.features == "tokens":  # no k-means: the sample's most frequent pairs, the last id for the rest
        settings["vocabulary"] = {"size": clusters, "unknown": clusters - 1}
        settings["sample"] = {"fraction": lab.sample_fraction, "seed": lab.seed}
    else:
        settings["kmeans"] = asdict(kmeans_settings(cfg))
        settings["sample"] = {"fraction": lab.sample_fraction, "max_frames": lab.max_sample_frames, "seed": lab.seed}
    version = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    plan = Plan(**{**plan.__dict__, "version_uri": storage.join(uri, version)})
    return Resolved(plan=plan, name=name, set_uri=uri, version=version,
                    settings={**settings, "teacher": teacher, "layer": lab.layer if lab.features == "model" else None},
                    dataset=info, stride=int(extractor.stride), window=int(extractor.window), extractor=extractor)


def label_command(cfg: Config) -> str:
    """The ``jobs.label`` command that makes the labels ``cfg`` names."""
    lab = cfg.label
    classes = "model.vq_bert.vocab" if cfg.model.objective == "vq_bert" else "model.hubert.clusters"
    parts = [f"python -m jobs.label --preset {cfg.preset}", f"data.train_uri={cfg.data.train_uri}",
             f"{classes}={cfg.model.label_classes}", f"label.features={lab.features}"]
    if lab.features == "model":
        parts += [f"label.teacher={lab.teacher}", f"label.layer={lab.layer}"]
    if lab.features == "tokens":
        parts.append(f"label.teacher={lab.teacher}")
    if lab.name:
        parts.append(f"label.name={lab.name}")
    return " ".join(parts)


def training_labels(cfg: Config, *, tracking_uri: str = "") -> L.LabelSpec:
    """The committed label set a ``hubert`` (``vq_bert``) pretraining run of ``cfg`` trains on,
    checked: made with this run's settings, for the dataset's current shards, at a frame rate
    its frames align with, with its number of clusters (tokens)
    (:func:`pipeline.data.labels.open_label_set`)."""
    check_objective(cfg)
    r = resolve(cfg, tracking_uri=tracking_uri)
    how = f"{label_command(cfg)}` (or jobs.label with this run's config and overrides)"
    spec = L.open_label_set(
        cfg.data.train_uri, r.name, dataset_version=r.dataset.version, model_stride=cfg.model.frame_stride,
        clusters=cfg.model.label_classes, store=r.plan.store, how_to_make=how.rstrip("`"),
    )
    if spec.version != r.version:
        made = (L.read_summary(r.set_uri, r.plan.store) or {}).get("settings", {})
        diff = _differences(made, {k: v for k, v in r.settings.items()})
        raise ValueError(
            f"labels {r.name!r} at {r.set_uri} are version {spec.version}, made with other settings than this "
            f"run's (version {r.version}): {'; '.join(diff) or 'their settings differ'}. Label again with `{how}"
        )
    return spec


def check_objective(cfg: Config) -> None:
    """Labels are HuBERT's targets or vq_bert's tokens; vq_bert trains on tokens only."""
    if cfg.model.objective not in ("hubert", "vq_bert"):
        raise ValueError(f"model.objective={cfg.model.objective!r}: labels are HuBERT's targets or vq_bert's tokens; use "
                         "a hubert or vq_bert preset (hubert, hubert_laptop, wavlm, vq_bert_laptop, ...)")
    if cfg.model.objective == "vq_bert" and cfg.label.features != "tokens":
        raise ValueError(f"model.objective=vq_bert trains on vq-wav2vec's tokens: label.features must be 'tokens', got "
                         f"{cfg.label.features!r}")


def _differences(made: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: made X, this run Y`` for every setting that differs."""
    out = []
    for key in sorted(set(made) | set(wanted)):
        a, b = made.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: made with {a!r}, this run {b!r}")
    return out


# --- stage 2: sample ----------------------------------------------------------------------------


def _in_sample(utt: str, fraction: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:kmeans-sample:{utt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def sample_items(manifest: pa.Table, r: Resolved, fraction: float, max_frames: int) -> list[dict[str, Any]]:
    """Per train shard: the sampled rows and the frames it may contribute (quotas summing to
    at most ``max_frames``, in proportion to each shard's sampled frames)."""
    rows: dict[str, list[int]] = {}
    frames: dict[str, int] = {}
    cols = manifest.select([S.ID, S.SPLIT, S.SHARD, S.ROW, S.NUM_SAMPLES]).to_pylist()
    for rec in cols:
        if rec[S.SPLIT] != "train" or not _in_sample(rec[S.ID], fraction, r.plan.seed):
            continue
        n = L.expected_frames(rec[S.NUM_SAMPLES], stride=r.stride, window=r.window)
        if n == 0:
            continue
        rows.setdefault(rec[S.SHARD], []).append(int(rec[S.ROW]))
        frames[rec[S.SHARD]] = frames.get(rec[S.SHARD], 0) + n
    total = sum(frames.values())
    scale = min(1.0, max_frames / total) if total else 1.0
    return [
        {"shard": shard, "index": i, "rows": json.dumps(sorted(rows[shard])),
         "quota": max(1, int(math.floor(frames[shard] * scale)))}
        for i, shard in enumerate(sorted(rows))
    ]


class _Worker:
    """A Ray Data actor of the job: the plan's feature extractor, loaded once."""

    def __init__(self, plan: Plan, gpus: float, cpus: float) -> None:
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        self.plan = plan
        self.device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        self.extractor = make_extractor(plan, self.device)

    def _shard(self, shard: str, columns: list[str]) -> pa.Table:
        return storage.read_table(storage.join(self.plan.data_uri, shard), columns, self.plan.store)

    def _audio(self, table: pa.Table, row: int) -> np.ndarray:
        from pipeline.data.audio import decode_segment

        n = int(table.column(S.NUM_SAMPLES)[row].as_py())
        return decode_segment(table.column(S.AUDIO)[row].as_buffer(), 0, n)


class _Sampler(_Worker):
    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for item in batch.to_pylist():
            cpu0 = time.process_time()
            table = self._shard(item["shard"], [S.AUDIO, S.NUM_SAMPLES])
            feats = [self.extractor(self._audio(table, r)) for r in json.loads(item["rows"])]
            x = np.concatenate(feats) if feats else np.zeros((0, self.extractor.dim), np.float32)  # (N, C)
            if len(x) > item["quota"]:
                rng = np.random.default_rng([self.plan.seed, int(item["index"])])
                x = x[np.sort(rng.choice(len(x), item["quota"], replace=False))]
            x = np.ascontiguousarray(x, dtype=np.float32)
            out.append({"features": x.tobytes(), "frames": len(x), "dim": x.shape[1],
                        "cpu_seconds": time.process_time() - cpu0})
        return pa.Table.from_pylist(out, schema=pa.schema([
            ("features", pa.large_binary()), ("frames", pa.int64()), ("dim", pa.int64()),
            ("cpu_seconds", pa.float64())]))


class _PairCounter(_Worker):
    """Tokens' sample: the frames of every codeword pair of the sampled utterances."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.label.tokens import count_pairs

        out = []
        for item in batch.to_pylist():
            cpu0 = time.process_time()
            table = self._shard(item["shard"], [S.AUDIO, S.NUM_SAMPLES])
            pairs = [self.extractor.pair_index(self.extractor(self._audio(table, r))) for r in json.loads(item["rows"])]
            counts = count_pairs(np.concatenate(pairs) if pairs else np.zeros(0, np.int64))
            out.append({"pairs": json.dumps([list(counts), list(counts.values())]),
                        "frames": int(sum(counts.values())), "cpu_seconds": time.process_time() - cpu0})
        return pa.Table.from_pylist(out, schema=pa.schema([
            ("pairs", pa.string()), ("frames", pa.int64()), ("cpu_seconds", pa.float64())]))


# --- stage 4: label -----------------------------------------------------------------------------


STATS_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("frames", pa.int64()),
                          ("reused", pa.bool_()), ("stats", pa.string()), ("pairs", pa.string()),
                          ("seconds", pa.float64()), ("cpu_seconds", pa.float64())])


def _file_stats(uri: str, store: storage.Storage) -> tuple[dict[str, Any], str, pa.Table] | None:
    """(stats, pair counts (tokens; '' otherwise), id + num_frames columns) of an existing
    label file; None when absent."""
    if not storage.exists(uri, store):
        return None
    fs, path = storage.resolve(uri, store)
    meta = pq.read_metadata(path, filesystem=fs).metadata or {}
    if STATS_KEY not in meta:
        return None
    pairs = meta.get(PAIRS_KEY, b"").decode()
    return json.loads(meta[STATS_KEY]), pairs, pq.read_table(path, filesystem=fs, columns=[S.ID, L.NUM_FRAMES])


class _Labeller(_Worker):
    def __init__(self, plan: Plan, gpus: float, cpus: float) -> None:
        super().__init__(plan, gpus, cpus)
        self.assign: Callable[[np.ndarray], np.ndarray]
        if plan.features == "tokens":
            from pipeline.label.tokens import VOCABULARY_FILE, TokenMap

            saved = np.load(open_npz(storage.join(plan.version_uri, VOCABULARY_FILE), plan.store))
            self.assign = TokenMap(saved["pairs"], plan.clusters, self.extractor.entries)
        else:
            centroids = np.load(open_npz(storage.join(plan.version_uri, L.KMEANS_FILE), plan.store))["centroids"]
            self.assign = K.Assigner(centroids, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.label_shard(item) for item in batch.to_pylist()], schema=STATS_SCHEMA)

    def label_shard(self, item: dict[str, Any]) -> dict[str, Any]:
        t0, cpu0 = time.perf_counter(), time.process_time()
        plan = self.plan
        out_uri = storage.join(plan.version_uri, L.shard_label_path(item["shard"]))
        table = self._shard(item["shard"], [S.ID, S.NUM_SAMPLES, S.AUDIO, S.TRANSCRIPT])
        ids = table.column(S.ID).to_pylist()
        num_samples = table.column(S.NUM_SAMPLES).to_numpy()
        expected = L.expected_frames(num_samples, stride=self.extractor.stride, window=self.extractor.window)
        found = _file_stats(out_uri, plan.store)
        if found is not None:
            stats, pairs_json, done = found
            if done.column(S.ID).to_pylist() == ids and np.array_equal(done.column(L.NUM_FRAMES).to_numpy(), expected):
                return {"shard": item["shard"], "rows": len(ids), "frames": int(expected.sum()), "reused": True,
                        "stats": json.dumps(stats), "pairs": pairs_json, "seconds": time.perf_counter() - t0,
                        "cpu_seconds": time.process_time() - cpu0}
        stats = LabelStats(plan.clusters)
        transcripts = table.column(S.TRANSCRIPT).to_pylist()
        labels = []
        pairs: dict[int, int] = {}
        for row in range(len(ids)):
            features = self.extractor(self._audio(table, row))
            if plan.features == "tokens":
                values, counts = np.unique(self.extractor.pair_index(features), return_counts=True)
                for p, c in zip(values.tolist(), counts.tolist(), strict=True):
                    pairs[p] = pairs.get(p, 0) + c
            ids_row = self.assign(features)
            if len(ids_row) != expected[row]:
                raise AssertionError(f"{item['shard']} row {row}: {len(ids_row)} frames, expected {expected[row]}")
            labels.append(ids_row)
            stats.add(ids_row, transcripts[row])
        offsets = np.concatenate([[0], np.cumsum([len(lab) for lab in labels])]).astype(np.int32)
        values = np.concatenate(labels) if labels else np.zeros(0, np.int16)
        pairs_json = json.dumps([list(pairs), list(pairs.values())]) if plan.features == "tokens" else ""
        meta = {STATS_KEY: json.dumps(stats.to_json()).encode()}
        if pairs_json:
            meta[PAIRS_KEY] = pairs_json.encode()
        result = pa.Table.from_arrays([
            pa.array(ids, pa.string()), pa.array(expected.astype(np.int64), pa.int64()),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int16), pa.int16())),
        ], schema=L.LABEL_SCHEMA.with_metadata(meta))
        _write_atomically(result, out_uri, plan)
        return {"shard": item["shard"], "rows": len(ids), "frames": int(expected.sum()), "reused": False,
                "stats": json.dumps(stats.to_json()), "pairs": pairs_json, "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - cpu0}


def _write_atomically(table: pa.Table | bytes, uri: str, plan: Plan, *, fault_point: bool = True) -> None:
    """Write a Parquet table (or bytes) under a temporary name, then move it into place: a
    reader (or a rerun) sees the whole file or none."""
    tmp = storage.join(plan.version_uri, TMP_DIR, f"{uuid.uuid4().hex}.tmp")
    fs, tmp_path = storage.resolve(tmp, plan.store)
    fs.create_dir(posixpath.dirname(tmp_path), recursive=True)
    if isinstance(table, bytes):
        with fs.open_output_stream(tmp_path) as f:
            f.write(table)
    else:
        pq.write_table(table, tmp_path, filesystem=fs, compression="zstd")
    marker = os.environ.get(KILL_ONCE_ENV)
    if fault_point and marker and not Path(marker).exists():
        Path(marker).write_text(uri)
        os.kill(os.getpid(), signal.SIGKILL)
    _, final_path = storage.resolve(uri, plan.store)
    fs.create_dir(posixpath.dirname(final_path), recursive=True)
    fs.move(tmp_path, final_path)


def open_npz(uri: str, store: storage.Storage | None) -> Any:
    """A file of the label set (``.npz``) as a seekable buffer for ``np.load``."""
    import io

    return io.BytesIO(storage.read_bytes(uri, store))


# --- the job ------------------------------------------------------------------------------------


def _workers(cfg: Config, features: str, num_items: int) -> tuple[int, float, float]:
    """(actors, GPUs each, CPUs each) for the cluster we are on (``label.workers``)."""
    import ray

    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    cpus = cfg.label.cpus_per_worker
    if features in TEACHER_FEATURES and gpus >= 1:
        count = cfg.label.workers or int(gpus)
        return max(1, min(count, num_items)), 1.0, cpus
    count = cfg.label.workers or max(1, int(resources.get("CPU", 1.0) // 2))
    return max(1, min(count, num_items)), 0.0, cpus


def _map(items: list[dict[str, Any]], worker: type, plan: Plan, cfg: Config) -> Any:
    import ray.data

    n, gpus, cpus = _workers(cfg, plan.features, len(items))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.enable_progress_bars = False
    return ds.map_batches(
        worker, batch_size=1, batch_format="pyarrow", concurrency=n, num_cpus=cpus,
        num_gpus=gpus or None, fn_constructor_kwargs={"plan": plan, "gpus": gpus, "cpus": cpus},
    ).iter_batches(batch_size=None, batch_format="pyarrow")


def fit_kmeans(cfg: Config, r: Resolved, manifest: pa.Table, progress: Callable[[str], None]) -> dict[str, Any]:
    """Stages 2-3: the centroids of the version folder, fitted unless already there."""
    uri = storage.join(r.plan.version_uri, L.KMEANS_FILE)
    store = r.plan.store
    if storage.exists(uri, store):
        saved = np.load(open_npz(uri, store))
        progress(f"label: reusing the k-means fit at {uri}")
        return {"inertia": float(saved["inertia"]), "sample_frames": int(saved["sample_frames"]), "seconds": 0.0,
                "cpu_seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    lab = cfg.label
    items = sample_items(manifest, r, lab.sample_fraction, lab.max_sample_frames)
    if not items:
        raise ValueError(f"{cfg.data.train_uri}: no train utterance long enough to sample (label.sample_fraction="
                         f"{lab.sample_fraction})")
    parts = []
    cpu = 0.0
    for table in _map(items, _Sampler, r.plan, cfg):
        for rec in table.to_pylist():
            cpu += rec["cpu_seconds"]
            if rec["frames"]:
                parts.append(np.frombuffer(rec["features"], dtype=np.float32).reshape(rec["frames"], rec["dim"]))
    sample = np.concatenate(parts)
    t_sample = time.perf_counter() - t0
    progress(f"label: {len(sample)} frames sampled from {len(items)} shards in {t_sample:.0f} s; fitting "
             f"{cfg.model.hubert.clusters} clusters")
    cpu0 = time.process_time()  # the fit runs here, in the driver (scikit-learn's threads included)
    centroids, inertia = K.fit(sample, kmeans_settings(cfg))
    cpu += time.process_time() - cpu0
    import io

    buf = io.BytesIO()
    np.savez(buf, centroids=centroids, inertia=np.float64(inertia), sample_frames=np.int64(len(sample)))
    _write_atomically(buf.getvalue(), uri, r.plan, fault_point=False)
    seconds = time.perf_counter() - t0
    progress(f"label: k-means fitted in {seconds - t_sample:.0f} s (inertia {inertia:.4g} per frame)")
    return {"inertia": inertia, "sample_frames": int(len(sample)), "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu, 1), "reused": False}


def fit_vocabulary(cfg: Config, r: Resolved, manifest: pa.Table, progress: Callable[[str], None]) -> dict[str, Any]:
    """Stages 2-3 of tokens: the vocabulary of the version folder (:mod:`pipeline.label.tokens`),
    built from the sample's pair counts unless already there."""
    import io

    from pipeline.label.tokens import VOCABULARY_FILE, build_vocabulary

    uri = storage.join(r.plan.version_uri, VOCABULARY_FILE)
    store = r.plan.store
    if storage.exists(uri, store):
        saved = np.load(open_npz(uri, store))
        progress(f"label: reusing the token vocabulary at {uri}")
        return {"size": r.plan.clusters, "pairs": int(len(saved["pairs"])), "sample_pairs": int(saved["sample_pairs"]),
                "sample_frames": int(saved["sample_frames"]), "seconds": 0.0, "cpu_seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    items = sample_items(manifest, r, cfg.label.sample_fraction, 2**62)  # counting needs no frame cap
    if not items:
        raise ValueError(f"{cfg.data.train_uri}: no train utterance long enough to sample (label.sample_fraction="
                         f"{cfg.label.sample_fraction})")
    counts: dict[int, int] = {}
    cpu = 0.0
    for table in _map(items, _PairCounter, r.plan, cfg):
        for rec in table.to_pylist():
            cpu += rec["cpu_seconds"]
            for p, c in zip(*json.loads(rec["pairs"]), strict=True):
                counts[int(p)] = counts.get(int(p), 0) + int(c)
    pairs = build_vocabulary(counts, r.plan.clusters)
    frames = sum(counts.values())
    buf = io.BytesIO()
    np.savez(buf, pairs=pairs, counts=np.asarray([counts[p] for p in pairs.tolist()], dtype=np.int64),
             sample_pairs=np.int64(len(counts)), sample_frames=np.int64(frames))
    _write_atomically(buf.getvalue(), uri, r.plan, fault_point=False)
    seconds = time.perf_counter() - t0
    covered = sum(counts[p] for p in pairs.tolist()) / max(frames, 1)
    progress(f"label: {len(counts)} codeword pairs in {frames} sampled frames; the vocabulary's {len(pairs)} cover "
             f"{covered:.1%} of them ({seconds:.0f} s)")
    return {"size": r.plan.clusters, "pairs": int(len(pairs)), "sample_pairs": len(counts), "sample_frames": frames,
            "sample_coverage": covered, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "reused": False}


def run_labelling(cfg: Config, *, force: bool = False, progress: Callable[[str], None] = print,
                  tracking_uri: str = "") -> dict[str, Any]:
    """Run the labelling job of ``cfg`` (module doc); returns the summary it committed (or found)."""
    started = time.perf_counter()
    check_objective(cfg)
    store = storage.Storage.from_config(cfg.data.s3_endpoint, cfg.data.s3_region)
    r = resolve(cfg, store=store, tracking_uri=tracking_uri)
    summary_uri = storage.join(r.set_uri, S.SUMMARY_FILE)
    current = L.read_summary(r.set_uri, store)
    if current is not None and current.get("version") == r.version and not force:
        progress(f"label: {r.set_uri} already holds these labels (version {r.version}); nothing to do")
        return current
    if force:
        storage.delete_dir(r.plan.version_uri, store)
    progress(f"label: {r.name} (version {r.version}) of {cfg.data.train_uri}: {r.settings['features']['kind']} "
             f"features, {r.plan.clusters} clusters")
    manifest = storage.read_table(storage.join(cfg.data.train_uri, S.MANIFEST_FILE),
                                  [S.ID, S.SPLIT, S.SHARD, S.ROW, S.NUM_SAMPLES], store)
    fit = fit_vocabulary(cfg, r, manifest, progress) if r.plan.features == "tokens" else fit_kmeans(cfg, r, manifest,
                                                                                                    progress)

    shards = [s.path for split in S.SPLITS for s in r.dataset.split(split)]
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for table in _map([{"shard": s} for s in shards], _Labeller, r.plan, cfg):
        results.extend(table.to_pylist())
        progress(f"label: {len(results)}/{len(shards)} shards labelled "
                 f"({sum(1 for x in results if x['reused'])} already were)")
    summary = _commit(r, manifest, results, fit, seconds_labelling=time.perf_counter() - t0,
                      seconds=time.perf_counter() - started)
    if "tokens" in summary:
        tok = summary["tokens"]
        progress(f"label: tokens: {tok['distinct_pairs']} codeword pairs (perplexity {tok['pair_perplexity']:.1f}), "
                 f"{tok['unknown_share']:.2%} of the frames outside the vocabulary of {tok['vocabulary']}")
    usage, purity = summary["usage"], summary.get("purity")
    progress(f"label: done in {summary['seconds']:.0f} s: {summary['utterances']} utterances, {summary['frames']} "
             f"frames, {usage['clusters_used']}/{usage['clusters']} clusters used (perplexity "
             f"{usage['perplexity']:.1f})" + (f", cluster purity {purity['cluster_purity']:.3f}, PNMI "
                                               f"{purity['pnmi']:.3f}" if purity else "") + f" -> {summary_uri}")
    return summary


def _commit(r: Resolved, manifest: pa.Table, results: list[dict[str, Any]], fit: dict[str, Any], *,
            seconds_labelling: float, seconds: float) -> dict[str, Any]:
    store = r.plan.store
    shards = {s.path: s for split in S.SPLITS for s in r.dataset.split(split)}
    got = [x["shard"] for x in results]
    if sorted(got) != sorted(shards) or len(set(got)) != len(got):
        raise RuntimeError(f"label: {len(set(got))} of {len(shards)} shards came back (duplicates: "
                           f"{len(got) - len(set(got))}); nothing was committed")
    rows = sum(int(x["rows"]) for x in results)
    if rows != manifest.num_rows or any(int(x["rows"]) != shards[x["shard"]].num_rows for x in results):
        raise RuntimeError(f"label: {rows} utterances labelled, the manifest has {manifest.num_rows}; nothing "
                           "was committed")
    stats = LabelStats(r.plan.clusters)
    by_split = {split: LabelStats(r.plan.clusters) for split in S.SPLITS}
    for x in results:
        part = LabelStats.from_json(json.loads(x["stats"]))
        stats.merge(part)
        by_split[shards[x["shard"]].split].merge(part)
    summary = {
        "format": L.FORMAT,
        "format_version": L.FORMAT_VERSION,
        "name": r.name,
        "version": r.version,
        "dataset": r.plan.data_uri,
        "dataset_version": r.dataset.version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "seconds_labelling": round(seconds_labelling, 1),
        "cpu_seconds": round(fit["cpu_seconds"] + sum(float(x["cpu_seconds"]) for x in results), 1),
        "settings": r.settings,
        "stride": r.stride,
        "window": r.window,
        "clusters": r.plan.clusters,
        ("vocabulary" if r.plan.features == "tokens" else "kmeans"): fit,
        "utterances": rows,
        "frames": int(sum(int(x["frames"]) for x in results)),
        "shards_reused": sum(1 for x in results if x["reused"]),
        "usage": stats.usage(),
        "purity": stats.purity(),
        "purity_by_split": {s: st.purity() for s, st in by_split.items() if st.frames},
        "files": sorted(L.shard_label_path(s) for s in shards),
    }
    if r.plan.features == "tokens":
        summary["tokens"] = _token_usage(results, stats, r)
    storage.write_json(storage.join(r.set_uri, S.SUMMARY_FILE), summary, store)
    # Temporary files of killed tasks, and older versions, are unreachable now.
    storage.delete_dir(storage.join(r.plan.version_uri, TMP_DIR), store)
    for child in storage.list_dir(r.set_uri, store):
        if child.type == pafs.FileType.Directory and child.base_name != r.version:
            storage.delete_dir(storage.join(r.set_uri, child.base_name), store)
    return summary


def _token_usage(results: list[dict[str, Any]], stats: LabelStats, r: Resolved) -> dict[str, Any]:
    """What the tokens say: the codeword pairs used over the whole set (before the vocabulary),
    their perplexity, and the share of frames given the unknown id."""
    counts: dict[int, int] = {}
    for x in results:
        for p, c in zip(*json.loads(x["pairs"] or "[[], []]"), strict=True):
            counts[int(p)] = counts.get(int(p), 0) + int(c)
    n = np.asarray(list(counts.values()), dtype=np.float64)
    p = n / max(n.sum(), 1.0)
    features = r.settings["features"]
    return {
        "groups": features["groups"], "entries": features["entries"],
        "pairs_possible": int(features["entries"]) ** int(features["groups"]),
        "distinct_pairs": len(counts),
        "pair_perplexity": float(math.exp(-(p[p > 0] * np.log(p[p > 0])).sum())) if len(p) else 0.0,
        "vocabulary": r.plan.clusters,
        "unknown_share": float(stats.counts[r.plan.clusters - 1] / max(stats.frames, 1)),
    }


def ensure_labels(cfg: Config, *, progress: Callable[[str], None] = print, tracking_uri: str = "") -> dict[str, Any]:
    """The labels ``cfg`` names, made when missing (a sweep's trials over the labelling settings)."""
    return run_labelling(cfg, progress=progress, tracking_uri=tracking_uri)
