"""Faults of a long run on the training side, with real parts: Ray Train + DeepSpeed, a
SeaweedFS store that really stops, a checkpoint upload really killed, a disk really full.

- The object store goes away twice during one run: for a few seconds (shorter than
  ``data.s3_retry_seconds``), which the run rides out without a restart; then for good,
  which stops the run with an error naming the endpoint. Started again, the same command
  resumes from the newest complete checkpoint.
- A checkpoint upload killed half-way leaves a folder that nothing takes for a checkpoint.
- A full local checkpoint directory stops the run at once with an error naming it, instead
  of Ray Train restarting into the same full disk (or hanging).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures.objectstore import S3Store

from pipeline.data import objectstore, storage
from pipeline.data.storage import Storage

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[3]
BUCKET = "train-faults"
RETRY_S = 15.0
COMMON = [
    "--config", str(ROOT / "jobs/configs/pretrain/tiny.yaml"), "checkpoint.every_steps=4", "train.log_every=1",
    "data.decode_cpus=0.5", "data.max_samples_per_batch=64000", "data.max_sample_size=32000",
    "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "checkpoint.max_failures=1",
]


@pytest.fixture(scope="module")
def ray_instance(s3_store: S3Store) -> Iterator[None]:
    """One Ray instance for the module, started after the store put its credentials in the environment."""
    import ray

    from pipeline.cluster import connect_ray

    if ray.is_initialized():
        ray.shutdown()
    connect_ray(num_cpus=2, dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.data.demo_corpus import make_corpus

    root = tmp_path_factory.mktemp("train_faults") / "corpus"
    make_corpus(root, minutes=1.0, seed=7, progress=lambda _: None)
    return root


def _port(store: objectstore.ObjectStore) -> int:
    return int(store.endpoint.rsplit(":", 1)[1])


def test_a_run_rides_out_a_short_outage_stops_on_a_long_one_and_resumes(
    s3_store: S3Store, ray_instance: None, corpus: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from jobs.pretrain import main
    from pipeline.config import tiny
    from pipeline.data.prepare import prepare
    from pipeline.train.checkpoint import STATE_FILE
    from pipeline.train.trainer import latest_checkpoint_uri

    store = objectstore.start(tmp_path / "store", buckets=[BUCKET], access_key=s3_store.access_key,
                              secret_key=s3_store.secret_key)
    s3 = Storage.from_config(store.endpoint, retry_s=RETRY_S)
    data, runs = f"s3://{BUCKET}/demo", f"s3://{BUCKET}/runs"
    try:
        cfg = tiny().data
        cfg.s3_endpoint, cfg.shard_size_mb = store.endpoint, 0.5
        prepare(str(corpus), data, cfg, progress=lambda _: None)
        args = [*COMMON, f"data.train_uri={data}", f"data.s3_endpoint={store.endpoint}",
                f"data.s3_retry_seconds={RETRY_S}", f"checkpoint.storage_path={runs}", "checkpoint.run_name=outage",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.max_steps=16"]
        events: dict[str, float] = {}
        finished = threading.Event()

        def mlflow_run() -> Any:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
            ids = [e.experiment_id for e in client.search_experiments()]
            (found,) = client.search_runs(ids, filter_string="tags.`wavray.run_name` = 'outage'")
            return found

        def logged_steps(run: Any) -> list[int]:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
            return [m.step for m in client.get_metric_history(run.info.run_id, "loss")]

        def step_recorded() -> int:
            uri = latest_checkpoint_uri(f"{runs}/outage", s3, recorded_only=True)
            return int(uri.rsplit("_", 1)[1]) if uri else 0

        def outages() -> None:
            deadline = time.monotonic() + 300
            while step_recorded() < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            # A short outage: the run must not notice beyond a pause. It lasts from SIGTERM (the
            # store stops answering at once; its graceful shutdown takes seconds) until the
            # restarted store answers.
            events["short_stop"] = time.monotonic()
            objectstore.stop(store.state_dir)
            time.sleep(1.0)
            objectstore.start(store.state_dir, port=_port(store))
            events["short_back"] = time.monotonic()
            while step_recorded() < 8 and time.monotonic() < deadline:
                time.sleep(0.1)
            objectstore.stop(store.state_dir)  # for good, until the run has stopped
            events["long_stop"] = time.monotonic()
            finished.wait(timeout=300)

        chaos = threading.Thread(target=outages, daemon=True)
        chaos.start()
        try:
            first = main(args)
        finally:
            events["first_ended"] = time.monotonic()
            finished.set()
            chaos.join(timeout=30)
        out = capfd.readouterr()
        short = events.get("short_back", float("inf")) - events.get("short_stop", 0.0)
        assert short < RETRY_S, f"the 'short' outage took {short:.1f} s, not shorter than {RETRY_S} s: nothing tested"
        assert "long_stop" in events, (events, out.out[-3000:], out.err[-3000:])
        assert first == 1, out.err[-3000:]
        assert f"error: object store at {store.endpoint} could not be reached for {RETRY_S:.0f} s" in out.err, \
            out.err[-3000:]
        assert "run the same command again" in out.err
        # What the workers did is read from MLflow, which rank 0 writes before the run ends; their
        # console lines reach this process through Ray's log streaming, which may lag behind.
        run = mlflow_run()
        assert "wavray.resumed_from" not in run.data.tags, "the short outage restarted the workers"
        assert max(logged_steps(run)) >= 8, logged_steps(run)

        objectstore.start(store.state_dir, port=_port(store))
        second = main(args)
        out2 = capfd.readouterr()
        assert second == 0, out2.err[-3000:]
        run = mlflow_run()
        assert run.data.tags.get("wavray.resumed_from") == "8", (run.data.tags, out2.err[-3000:])
        assert max(logged_steps(run)) == 16 and run.info.status == "FINISHED", (logged_steps(run), run.info.status)
        # Every checkpoint folder with its state file is complete; none is half-written.
        fs, path = storage.resolve(f"{runs}/outage", s3)
        for info in storage.list_dir(f"{runs}/outage", s3):
            if info.base_name.startswith("checkpoint_") and storage.exists(f"s3://{info.path}/{STATE_FILE}", s3):
                names = {i.base_name for i in storage.list_dir(f"s3://{info.path}", s3)}
                assert {"config.yaml", "model.safetensors", "deepspeed", "rng"} <= names, (info.base_name, names)
        print(f"outage: short one {events['short_back'] - events['short_stop']:.1f} s ridden out; the long one "
              f"stopped the run {events['first_ended'] - events['long_stop']:.1f} s after it began "
              f"(data.s3_retry_seconds={RETRY_S:.0f})")
    finally:
        objectstore.stop(store.state_dir)


def _checkpoint_files(root: Path, step: int, big_mb: int) -> None:
    rng = np.random.default_rng(step)
    (root / "deepspeed" / f"step_{step:09d}").mkdir(parents=True)
    (root / "rng").mkdir()
    (root / "config.yaml").write_text("preset: tiny\n")
    (root / "model.safetensors").write_bytes(rng.bytes(big_mb << 20))
    for rank in range(4):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        (root / "deepspeed" / f"step_{step:09d}" / name).write_bytes(rng.bytes(big_mb << 20))
    (root / "rng" / "rank_0.pt").write_bytes(b"rng")
    (root / "trainer_state.json").write_text(json.dumps({"step": step, "version": 1}))


def test_a_checkpoint_upload_killed_half_way_is_never_taken(s3_store: S3Store, tmp_path: Path) -> None:
    from pipeline.train.checkpoint import STATE_FILE, upload
    from pipeline.train.trainer import latest_checkpoint_uri

    run = s3_store.uri("cut-upload", "run")
    _checkpoint_files(tmp_path / "c4", 4, 1)
    upload(tmp_path / "c4", f"{run}/checkpoint_000000004", rank=0)
    _checkpoint_files(tmp_path / "c8", 8, 24)
    dest = f"{run}/checkpoint_000000008"
    code = ("import sys; from pipeline.train.checkpoint import upload; "
            "upload(sys.argv[1], sys.argv[2], rank=0); print('finished', flush=True)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c8"), dest], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not storage.list_dir(dest):
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        out = child.communicate(timeout=30)[0].decode()
    assert "finished" not in out, "the upload ended before it was killed: nothing was tested"
    assert storage.list_dir(dest), "nothing was uploaded before the kill"
    assert not storage.exists(f"{dest}/{STATE_FILE}")
    assert latest_checkpoint_uri(run) == f"{run}/checkpoint_000000004"


@contextlib.contextmanager
def _full_disk(where: Path) -> Iterator[Path]:
    """A small tmpfs at ``where``, filled to the last byte (needs the right to mount)."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "wavray-test-full", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        with contextlib.suppress(OSError), open(where / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_local_checkpoint_disk_stops_the_run_naming_it(
    ray_instance: None, corpus: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from jobs.pretrain import main
    from pipeline.config import tiny
    from pipeline.data.prepare import prepare

    shards = tmp_path / "shards"
    prepare(str(corpus), str(shards), tiny().data, progress=lambda _: None)
    with _full_disk(tmp_path / "full") as full:
        started = time.monotonic()
        code = main([*COMMON, f"data.train_uri={shards}", f"checkpoint.storage_path={tmp_path / 'runs'}",
                     "checkpoint.run_name=full", f"checkpoint.local_dir={full}", "train.max_steps=8",
                     f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
        elapsed = time.monotonic() - started
    out = capfd.readouterr()
    assert code == 3, out.err[-3000:]
    assert f"the local disk at {full} is full" in out.err and "checkpoint of step 4" in out.err, out.err[-3000:]
    print(f"full disk: the run stopped {elapsed:.0f} s after it started, naming {full}")


def test_a_full_spilling_directory_is_a_clear_error_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects that no longer fit in Ray's object store spill to disk; when that disk is full,
    Ray refuses new objects at once (OutOfDiskError, past its capacity threshold) and the
    job's error says which disk and what to do, out of Ray's wrapping."""
    import ray
    import ray.data

    from pipeline.ray_compat import start_local

    with _full_disk(tmp_path / "spill") as spill:
        if ray.is_initialized():
            ray.shutdown()
        # Ray reads its system config from RAY_<name> in the environment of the processes it starts.
        monkeypatch.setenv("RAY_object_spilling_config",
                           json.dumps({"type": "filesystem", "params": {"directory_path": str(spill)}}))
        start_local(num_cpus=1, dashboard=False, object_store_memory=80 << 20)
        try:
            started = time.monotonic()
            with pytest.raises(Exception) as caught:  # noqa: PT011 - Ray's wrapping varies; failure_in unwraps it
                # 12 blocks of 10 MiB held at once: more than the 80 MiB store, so Ray must spill.
                ray.data.range(12, override_num_blocks=12).map_batches(
                    lambda _: {"x": np.zeros((1, 10 << 20), np.uint8)}, batch_size=1
                ).materialize()
            elapsed = time.monotonic() - started
        finally:
            ray.shutdown()
    cause = storage.failure_in(caught.value)
    assert isinstance(cause, storage.LocalDiskFullError), repr(caught.value)[:2000]
    assert "spilling directory" in str(cause) and "--object-spilling-directory" in str(cause)
    print(f"full spilling directory: the job failed {elapsed:.0f} s after it started: {cause}")
