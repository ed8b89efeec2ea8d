"""Benchmark ``scale``: how each cost of the data path grows with the number of input files.

    python -m jobs.bench scale [--sizes 1000,10000,100000] [--workers 8] [--workdir DIR]

For each corpus size N it generates N short WAV files (0.25 s; the file count is what
matters, not the audio) in a local S3 object store (SeaweedFS on loopback, started here),
then measures, on a local Ray instance:

* ``list``, ``probe``, ``convert``, ``commit``: the stages of ``jobs.prepare`` from s3://
  to s3:// (:func:`pipeline.data.prepare.prepare`, timed at its stage boundaries);
* ``plan``: the training input of the prepared data, planned for ``--workers`` training
  workers (shard order, length buckets, the split) and a run of ``--epochs`` epochs, up to
  its first batch;
* ``position``: the data position saved in every checkpoint, half-way through epoch 0:
  every worker records its batches, the trainer merges the states and serialises them;
* ``resume``: the training input rebuilt from that position, up to its first batch.

Per stage: wall time, the driver's peak memory above its level at the stage's start (RSS,
sampled every 20 ms after returning freed memory to the system), and the peak object-store
bytes above the level at the stage's start (all nodes). Each figure's growth is fitted as
``cost ~ N^k`` over the sizes and projected to 10^7 files: 50,000 hours at LibriLight's
18 s per file, the size of the multilingual public corpora. Shards are sized to hold
``--files-per-shard`` files, so the shard count grows with N as it does in a real corpus.
Nothing here asserts a time: the table is for reading.

The corpus and the object store's state stay in ``--workdir`` between runs (generating
10^5 files takes minutes); ``--fresh`` makes them again.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cluster import connect_ray
from pipeline.config import DataConfig, tiny
from pipeline.data import objectstore, storage
from pipeline.data import testing as T

SECONDS_PER_FILE = 0.25
SAMPLE_RATE = 16000
PROJECT_TO = 10**7
HOURS_AT_PROJECTION = PROJECT_TO * 18 / 3600
BUCKET = "scale"
PREPARE_STAGES = ("list", "probe", "convert", "commit")
STAGES = (*PREPARE_STAGES, "plan", "position", "resume")
# Below these the figures are noise (timer, allocator, a stray object) and no exponent is fitted.
FLOORS = {"wall_s": 0.05, "driver_mb": 2.0, "store_mb": 1.0, "position_kb": 0.5}
METRICS = ("wall_s", "driver_mb", "store_mb")


@dataclass
class Measured:
    wall_s: float = 0.0
    driver_mb: float = 0.0
    store_mb: float = 0.0


@dataclass
class SizeResult:
    files: int
    stages: dict[str, Measured] = field(default_factory=dict)
    position_kb: float = 0.0
    shards: int = 0


def _release_memory() -> None:
    """Give freed memory back to the system, so that RSS above a stage's start is its own."""
    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Meter:
    """Samples the driver's RSS (every 20 ms) and the object store (every 0.5 s) in a thread."""

    def __init__(self) -> None:
        import psutil

        from pipeline.ray_compat import ObjectStoreMeter

        self._proc = psutil.Process()
        self._store = ObjectStoreMeter()
        self._lock = threading.Lock()
        self._rss_peak = 0
        self._store_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_store = 0.0
        while not self._stop.wait(0.02):
            rss = self._proc.memory_info().rss
            with self._lock:
                self._rss_peak = max(self._rss_peak, rss)
            if time.monotonic() - last_store > 0.5:
                last_store = time.monotonic()
                with contextlib.suppress(Exception):  # a busy raylet may miss one sample
                    used = self._store.bytes_used()
                    with self._lock:
                        self._store_peak = max(self._store_peak, used)

    def _now(self) -> tuple[int, int]:
        """(driver RSS, object-store bytes) at this moment (0 for a store that did not answer)."""
        try:
            used = self._store.bytes_used()
        except Exception:
            used = 0
        return self._proc.memory_info().rss, used

    def _reset(self) -> tuple[int, int]:
        rss, used = self._now()
        with self._lock:
            self._rss_peak, self._store_peak = rss, used
        return rss, used

    def _peaks(self) -> tuple[int, int]:
        rss, used = self._now()
        with self._lock:
            return max(self._rss_peak, rss), max(self._store_peak, used)

    @contextlib.contextmanager
    def stage(self, out: Measured) -> Iterator[None]:
        _release_memory()
        rss0, store0 = self._reset()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            out.wall_s += time.perf_counter() - t0
            rss, used = self._peaks()
            out.driver_mb = max(out.driver_mb, (rss - rss0) / 2**20)
            out.store_mb = max(out.store_mb, max(0, used - store0) / 2**20)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- the corpus ----------------------------------------------------------------------------------


def corpus_uri(n: int) -> str:
    return f"s3://{BUCKET}/raw/n{n}"


def write_corpus(n: int, s3: storage.Storage, threads: int = 16) -> None:
    """``n`` files of 0.25 s, 1,000 per directory, from 64 distinct payloads."""
    payloads = [T.encode(T.tone(SECONDS_PER_FILE, SAMPLE_RATE, freq=200.0 + 7 * i, seed=i), SAMPLE_RATE)
                for i in range(64)]
    root = corpus_uri(n)
    storage.ensure_bucket(root, s3)
    fs, _ = storage.resolve(root, s3)

    def put(i: int) -> None:
        _, path = storage.resolve(f"{root}/d{i // 1000:05d}/f{i:08d}.wav", s3)
        with fs.open_output_stream(path) as f:
            f.write(payloads[i % len(payloads)])

    with ThreadPoolExecutor(threads) as pool:
        for done, _ in enumerate(pool.map(put, range(n)), 1):
            if done % 20000 == 0:
                print(f"  corpus n={n}: {done} files", flush=True)


def prepare_config(files_per_shard: int) -> DataConfig:
    flac_bytes = SECONDS_PER_FILE * SAMPLE_RATE * 1.1
    return replace(tiny().data, shard_size_mb=files_per_shard * flac_bytes / 2**20, valid_fraction=0.01)


def train_config(uri: str) -> DataConfig:
    """Crops of the whole file, 16 to a batch, 4 length buckets, the shipped epoch count."""
    samples = int(SECONDS_PER_FILE * SAMPLE_RATE)
    return replace(tiny().data, train_uri=uri, min_sample_size=0, max_sample_size=samples,
                   max_samples_per_batch=16 * samples, num_buckets=4, prefetch_batches=0)


# --- the stages ----------------------------------------------------------------------------------


def _first_batch(ds: Any) -> None:
    """Start the stream and take one batch: the read tasks are made and scheduled."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    next(it)
    del it


def simulated_positions(cfg: DataConfig, counts: list[int], workers: int) -> list[dict[str, Any]]:
    """Each worker's data position half-way through epoch 0 (batch keys only, no audio):
    batch k of the stream goes to worker k mod ``workers``, as the equal split hands them."""
    from pipeline.data.loader import shard_order
    from pipeline.data.position import BATCH_INDEX, EPOCH, NUM_BATCHES, NUM_SHARDS, SHARD_INDEX, DataPosition

    order = shard_order(len(counts), cfg.shuffle_seed, 0).tolist()
    keys = [(s, b, counts[s]) for s in order for b in range(counts[s])]
    positions = [DataPosition() for _ in range(workers)]
    for k, (shard, index, n) in enumerate(keys[: len(keys) // 2]):
        positions[k % workers].update({EPOCH: 0, SHARD_INDEX: shard, BATCH_INDEX: index, NUM_BATCHES: n,
                                       NUM_SHARDS: len(counts)})
    return [p.state_dict() for p in positions]


def measure(n: int, args: argparse.Namespace, s3: storage.Storage, meter: Meter) -> SizeResult:
    from pipeline.data.loader import batch_counts, build_train_dataset, read_dataset_info
    from pipeline.data.position import DataPosition
    from pipeline.data.prepare import prepare

    result = SizeResult(files=n, stages={s: Measured() for s in STAGES})
    out = f"s3://{BUCKET}/prepared/n{n}"
    storage.delete_dir(out, s3)
    current: list[contextlib.AbstractContextManager[None]] = []

    def on_stage(name: str) -> None:
        if current:
            current.pop().__exit__(None, None, None)
        cm = meter.stage(result.stages[name])
        cm.__enter__()
        current.append(cm)

    try:
        summary = prepare(corpus_uri(n), out, prepare_config(args.files_per_shard), progress=lambda _: None,
                          on_stage=on_stage)
    finally:
        if current:
            current.pop().__exit__(None, None, None)
    assert summary["accepted"] == n, f"prepare accepted {summary['accepted']} of {n}: {summary['rejected_by_reason']}"
    result.shards = len(summary["shards"])

    cfg = train_config(out)
    counts = batch_counts(cfg, read_dataset_info(out), "train", args.workers)
    run = args.epochs * sum(counts)  # the batches the modelled run reads
    with meter.stage(result.stages["plan"]):
        _first_batch(build_train_dataset(cfg, num_splits=args.workers, max_batches=run))
    states = simulated_positions(cfg, counts, args.workers)
    with meter.stage(result.stages["position"]):
        merged = DataPosition.merge(states)
        text = json.dumps(merged)
    result.position_kb = len(text.encode()) / 1024
    with meter.stage(result.stages["resume"]):
        _first_batch(build_train_dataset(cfg, num_splits=args.workers, position=merged,
                                         max_batches=run - sum(counts) // 2))
    return result


# --- the table -------------------------------------------------------------------------------------


SUPERLINEAR = 1.1
"""Exponents above this are projected as the power law; below, by the last interval's slope."""


def fit(sizes: list[int], values: list[float], floor: float) -> tuple[float | None, float | None]:
    """(exponent k of cost ~ N^k over the sizes, the cost projected to 10^7 files); None below
    the noise floor.

    A fixed part (a module imported, a worker started) flattens the log-log fit of a cost
    that is linear in N, so up to ``SUPERLINEAR`` the projection extends the slope between
    the two largest sizes (the per-file cost, which dominates at 10^7); above, the power law.
    """
    pairs = [(n, v) for n, v in zip(sizes, values, strict=True) if v >= floor]
    if len(pairs) < 2:
        return None, None
    k = float(np.polyfit(np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs]), 1)[0])
    (n0, v0), (n1, v1) = pairs[-2], pairs[-1]
    if k > SUPERLINEAR:
        return k, v1 * (PROJECT_TO / n1) ** k
    return k, v1 + max(0.0, (v1 - v0) / (n1 - n0)) * (PROJECT_TO - n1)


def load_results(path: str) -> list[SizeResult]:
    """The figures a ``--json`` file holds, as measured."""
    saved = json.loads(Path(path).read_text())
    results = [SizeResult(files=n, shards=s) for n, s in zip(saved["sizes"], saved["shards"], strict=True)]
    for row in saved["rows"]:
        for r, value in zip(results, row["values"], strict=True):
            if row["metric"] == "position_kb":
                r.position_kb = value
            else:
                setattr(r.stages.setdefault(row["stage"], Measured()), row["metric"], value)
    return results


def table(results: list[SizeResult]) -> tuple[str, list[dict[str, Any]]]:
    sizes = [r.files for r in results]
    head = f"{'stage':<10}{'metric':<13}" + "".join(f"{f'{n:.0e}':>10}" for n in sizes) + f"{'exponent':>10}{'at 1e7':>11}"
    lines = [head]
    rows = []

    def add(stage: str, metric: str, values: list[float]) -> None:
        k, proj = fit(sizes, values, FLOORS[metric])
        lines.append(f"{stage:<10}{metric:<13}" + "".join(f"{v:>10.3g}" for v in values)
                     + (f"{k:>10.2f}{proj:>11.3g}" if k is not None else f"{'(floor)':>10}{'-':>11}"))
        rows.append({"stage": stage, "metric": metric, "values": values, "exponent": k, "at_1e7": proj})

    for stage in STAGES:
        for metric in METRICS:
            add(stage, metric, [getattr(r.stages[stage], metric) for r in results])
        if stage == "position":
            add(stage, "position_kb", [r.position_kb for r in results])
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="corpus sizes in files, comma-separated")
    parser.add_argument("--files-per-shard", type=int, default=250, help="shard size, in files")
    parser.add_argument("--workers", type=int, default=8, help="training workers the input is split for")
    parser.add_argument("--epochs", type=int, default=12,
                        help="epochs the modelled run reads (BASE's 400k updates of 1.56 h make 12 of 50,000 h)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--workdir", default="/tmp/wavray-scale", help="object store state and corpus (kept)")
    parser.add_argument("--fresh", action="store_true", help="make the corpus again")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--table-of", default=None, help="print the table of figures an earlier --json wrote")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.table_of:
        print(table(load_results(args.table_of))[0])
        return 0

    import ray

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = objectstore.start(work / "objectstore", buckets=[BUCKET])
    os.environ.update(store.env())  # the Ray instance started below hands them to its workers
    s3 = storage.Storage.from_config(store.endpoint)
    try:
        for n in sizes:
            marker = work / f"corpus-{n}.done"
            if args.fresh or not marker.exists():
                t0 = time.perf_counter()
                storage.delete_dir(corpus_uri(n), s3)
                write_corpus(n, s3)
                marker.write_text(f"{n}\n")
                print(f"corpus n={n}: {time.perf_counter() - t0:.0f} s to write", flush=True)
        if ray.is_initialized():
            ray.shutdown()
        connect_ray(num_cpus=args.num_cpus, dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        meter = Meter()
        results = []
        try:
            for n in sizes:
                t0 = time.perf_counter()
                results.append(measure(n, args, s3, meter))
                print(f"measured n={n} ({results[-1].shards} shards) in {time.perf_counter() - t0:.0f} s", flush=True)
        finally:
            meter.close()
            ray.shutdown()
        text, rows = table(results)
        print(f"scale benchmark: {', '.join(str(n) for n in sizes)} files of {SECONDS_PER_FILE} s from s3:// "
              f"({args.files_per_shard} per shard), planned for {args.workers} workers and {args.epochs} epochs, "
              f"Ray with {args.num_cpus} CPUs; "
              f"cost ~ N^exponent, projected to 1e7 files ({HOURS_AT_PROJECTION:,.0f} h at 18 s per file)")
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps({"sizes": sizes, "rows": rows, "shards": [r.shards for r in results]},
                                                  indent=1))
    finally:
        objectstore.stop(store.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
