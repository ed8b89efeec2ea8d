"""Benchmark ``data``: the training input against plain decoding, per CPU.

    python -m jobs.bench data [--minutes 20] [--num-cpus 1] [--epochs 2] [--dataset URI]
    python -m jobs.benchmarks.data ...          (the same, without the registry)

Decodes the same prepared shards (a) with plain soundfile in one process and (b) through
the full training input (Ray Data read tasks -> planned batches -> streaming_split ->
iter_train_batches) on a Ray instance with ``--num-cpus`` CPUs, from a local directory
and from the local S3 object store, and prints audio-seconds per second, per CPU and as
a ratio to plain decoding. The goal is a ratio of 0.8 or better per CPU.

Without ``--dataset`` it synthesises ``--minutes`` of speech (pipeline.data.demo_corpus)
and prepares it in a temporary directory. Rows:

* ``plain``: every FLAC of the train split decoded whole, one process (= 1 CPU).
* ``input (whole)``: pad mode, no crop: the same audio, every sample decoded.
* ``input (crop, tiny|base)``: the preset's crop and batch settings (tiny: 3 s crops,
  12 s batches; base: 15.6 s crops, 87.5 s batches): what training reads; audio-s
  counts the delivered samples, and decoding seeks to each crop.

``steady`` excludes the start-up (Ray Data planning, worker start, first task) by timing
from the first batch to the last. ``per CPU-s`` divides the audio by the CPU time that
this process and every process it started (Ray's GCS, raylet, workers) spent while
measuring: unlike wall time it is not distorted by other work on a shared machine, and
it charges the training input for all of Ray's overhead. Ray's workers are started at
nice 0 here (Ray's default is 15) so that they compete on equal terms with the plain
baseline in wall time too.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import soundfile as sf

from pipeline.cluster import connect_ray
from pipeline.config import DataConfig, tiny
from pipeline.data import objectstore, storage
from pipeline.data import schema as S
from pipeline.data.loader import build_train_dataset, iter_train_batches, read_dataset_info


@dataclass
class Row:
    path: str
    source: str
    cpus: float
    audio_s: float
    wall_s: float
    steady_audio_s: float = 0.0
    steady_wall_s: float = 0.0
    cpu_s: float = 0.0
    """CPU seconds of this process and its descendants over the steady part."""
    cpu_roles: dict[str, float] | None = None

    @property
    def rate(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s else 0.0

    @property
    def steady_rate(self) -> float:
        return self.steady_audio_s / self.steady_wall_s if self.steady_wall_s else self.rate

    @property
    def per_cpu_second(self) -> float:
        audio = self.steady_audio_s or self.audio_s
        return audio / self.cpu_s if self.cpu_s else 0.0


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds) for this process and all its live descendants."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            name = " ".join(proc.cmdline()[:1])
        except psutil.Error:
            continue
        if proc.pid == me.pid:
            role = "driver"
        elif "SplitCoordinator" in name:
            role = "coordinator"
        elif name.startswith("ray::") and "Actor" not in name and "Agent" not in name:
            role = "decode"  # read-task workers (named ray::IDLE between tasks)
        else:
            role = "services"
        out[proc.pid] = (role, t.user + t.system)
    return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    roles: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        roles[role] = roles.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return roles


def measure_plain(uri: str) -> Row:
    """Every train-split FLAC decoded whole with soundfile, in this process."""
    info = read_dataset_info(uri)
    start, cpu = time.perf_counter(), time.process_time()
    samples = 0
    for shard in info.split("train"):
        for flac in storage.read_table(storage.join(uri, shard.path), [S.AUDIO]).column(S.AUDIO).to_pylist():
            samples += len(sf.read(io.BytesIO(flac), dtype="float32")[0])
    wall = time.perf_counter() - start
    return Row("plain soundfile", _where(uri), 1, samples / info.sample_rate, wall,
               cpu_s=time.process_time() - cpu)


def measure_input(uri: str, cfg: DataConfig, *, label: str, cpus: float) -> Row:
    """The training input consumed by one worker's iterator, as under Ray Train."""
    cfg = replace(cfg, train_uri=uri)
    start = time.perf_counter()
    ds = build_train_dataset(cfg, num_splits=1)
    (shard,) = ds.streaming_split(1, equal=True)
    samples = first_samples = 0
    first = None
    first_cpu: dict[int, tuple[str, float]] = {}
    for batch in iter_train_batches(shard, cfg):
        n = int(batch["num_samples"].sum())
        if first is None:
            first, first_samples, first_cpu = time.perf_counter(), n, cpu_by_process()
        samples += n
    end = time.perf_counter()
    roles = cpu_delta(first_cpu, cpu_by_process())
    rate = cfg.sample_rate
    return Row(label, _where(uri), cpus, samples / rate, end - start, (samples - first_samples) / rate,
               end - (first or end), cpu_s=sum(roles.values()), cpu_roles=roles)


def whole_config(epochs: int) -> DataConfig:
    """Pad mode without crops: the input decodes exactly what the plain path decodes."""
    return replace(tiny().data, batch_mode="pad", min_sample_size=0, max_sample_size=16000 * 60,
                   max_samples_per_batch=16000 * 600, max_epochs=epochs)


def crop_config(epochs: int, preset: str = "tiny") -> DataConfig:
    from pipeline.config import preset_config

    return replace(preset_config(preset).data, max_epochs=epochs)


def _where(uri: str) -> str:
    return "s3" if storage.is_s3(uri) else "local"


def format_rows(rows: list[Row]) -> str:
    plain = {r.source: r.rate for r in rows if r.path.startswith("plain")}
    per_cpu_s = {r.source: r.per_cpu_second for r in rows if r.path.startswith("plain")}
    lines = [f"{'path':<22}{'source':<7}{'CPUs':>5}{'audio-s':>9}{'wall-s':>8}{'audio-s/s':>10}"
             f"{'steady':>8}{'/CPU':>7}{'vs plain':>9}{'per CPU-s':>10}{'vs plain':>9}"]
    for r in rows:
        per_cpu = r.steady_rate / r.cpus
        ratio = per_cpu / plain[r.source] if plain.get(r.source) else float("nan")
        cpu_ratio = r.per_cpu_second / per_cpu_s[r.source] if per_cpu_s.get(r.source) else float("nan")
        lines.append(f"{r.path:<22}{r.source:<7}{r.cpus:>5g}{r.audio_s:>9.0f}{r.wall_s:>8.2f}{r.rate:>10.0f}"
                     f"{r.steady_rate:>8.0f}{per_cpu:>7.0f}{ratio:>8.2f}x{r.per_cpu_second:>10.0f}{cpu_ratio:>8.2f}x")
    lines.append("CPU-s of the steady part by role (decode = read-task workers; the rest is Ray's control plane "
                 "and the consumer):")
    for r in rows:
        if r.cpu_roles:
            decode = r.cpu_roles.get("decode", 0.0)
            only = (r.steady_audio_s / decode) / per_cpu_s[r.source] if decode and per_cpu_s.get(r.source) else 0.0
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.cpu_roles.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {r.path:<20}{r.source:<7}{parts}; decode workers alone: {only:.2f}x plain per CPU-s")
    return "\n".join(lines)


def _make_dataset(work: Path, minutes: float, shard_size_mb: float) -> str:
    from pipeline.data.demo_corpus import make_corpus
    from pipeline.data.prepare import prepare

    make_corpus(work / "corpus", minutes=minutes, progress=lambda _: None)
    connect_ray(dashboard=False)
    cfg = replace(tiny().data, shard_size_mb=shard_size_mb)
    prepare(str(work / "corpus"), str(work / "shards"), cfg, progress=lambda m: print(m, flush=True))
    return str(work / "shards")


def _copy_to_s3(local: str, store: objectstore.ObjectStore, bucket: str) -> str:
    s3 = storage.Storage(endpoint=store.endpoint, access_key=store.access_key, secret_key=store.secret_key)
    storage.upload_file(local, f"s3://{bucket}/shards", s3)
    return f"s3://{bucket}/shards"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=None, help="a prepared local dataset (default: synthesise one)")
    parser.add_argument("--minutes", type=float, default=20.0, help="speech to synthesise without --dataset")
    parser.add_argument("--shard-size-mb", type=float, default=8.0, help="shard size when preparing")
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs of the Ray instance (plain uses 1)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs the training input streams")
    parser.add_argument("--no-s3", action="store_true", help="skip the object-store rows")
    args = parser.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    with tempfile.TemporaryDirectory(prefix="wavray-bench-") as tmp:
        work = Path(tmp)
        local = args.dataset or _make_dataset(work, args.minutes, args.shard_size_mb)
        if ray.is_initialized():
            ray.shutdown()
        store = None
        sources = [local]
        try:
            if not args.no_s3:
                store = objectstore.start(work / "objectstore", buckets=["bench"])
                os.environ.update(store.env())
                sources.append(_copy_to_s3(local, store, "bench"))
            info = read_dataset_info(local)
            train = [s for s in info.shards if s.split == "train"]
            print(f"data benchmark: {sum(s.num_samples for s in train) / info.sample_rate / 60:.1f} min of train "
                  f"audio in {len(train)} shards, {sum(s.num_bytes for s in train) / 2**20:.1f} MiB of FLAC; "
                  f"Ray with {args.num_cpus} CPU(s), {args.epochs} epochs", flush=True)
            connect_ray(num_cpus=args.num_cpus, dashboard=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            rows = []
            for uri in sources:
                rows.append(measure_plain(uri))
                rows.append(measure_input(uri, whole_config(args.epochs), label="input (whole)", cpus=args.num_cpus))
                for preset in ("tiny", "base"):
                    rows.append(measure_input(uri, crop_config(args.epochs, preset), label=f"input (crop, {preset})",
                                              cpus=args.num_cpus))
            print(format_rows(rows))
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if store is not None:
                objectstore.stop(store.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
