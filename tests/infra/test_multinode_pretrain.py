"""A pretraining run on a Ray cluster of several raylets on this machine, laid out like
``infra/cluster/``: a head that runs no work (0 CPUs), two ``decoder`` nodes with CPUs only,
and ``trainer`` nodes whose CPU the training worker takes whole and which advertise a custom
resource standing in for their GPUs (``scaling.worker_resources``).

One run of one epoch, three phases:

1. placement: the training input's decode tasks run on decoder nodes only, the training
   workers on trainer nodes only, as Ray's state API records them;
2. a decoder node is removed mid-epoch: Ray Data runs its tasks again on the node left and
   the run goes on without a restart;
3. a trainer node is removed after a checkpoint: Ray Train restarts the worker group (on
   the node left and a new trainer node) from the newest checkpoint, and the data position
   is exact: the batches before the checkpoint plus the batches after the restart are the
   epoch, every utterance exactly once.

Each training worker records the batches it consumes (a subclass of the pipeline's own
hooks, nothing replaced). Every node binds 127.0.0.1 (checked on the listening sockets) and
the cluster keeps its files under a temporary directory of its own; it is stopped by
removing its nodes, which ends exactly the processes each one started.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from cluster_audit import is_loopback, listening_addresses

from pipeline import config as C
from pipeline.net import free_ports

pytestmark = pytest.mark.e2e

STAND_IN = "trainer_gpu"
"""The custom resource trainer nodes advertise instead of GPUs."""
EVERY = 4
OBJECT_STORE = 80 * 1024 * 1024
PHASE_TIMEOUT_S = 240.0


def _recording_worker(loop_config: dict[str, Any], *, record_dir: str) -> None:
    """The pretraining worker, recording each consumed batch to ``record_dir``."""
    from pipeline.data.loader import IDS
    from pipeline.data.position import BATCH_INDEX, EPOCH, SHARD_INDEX
    from pipeline.train.worker import PretrainTask, RayHooks, run_worker

    node = ray.get_runtime_context().get_node_id()

    class Hooks(RayHooks):
        def on_batch(self, batch: Any) -> None:
            super().on_batch(batch)
            record = {"start": self.start_step, "rank": self.rank, "node": node, "epoch": int(batch[EPOCH]),
                      "key": [int(batch[SHARD_INDEX]), int(batch[BATCH_INDEX])], "ids": [str(i) for i in batch[IDS]]}
            with open(Path(record_dir) / f"rank{self.rank}-{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    class Task(PretrainTask):
        hooks_class = Hooks

    run_worker(loop_config, Task())


def _records(record_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(record_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


class _LoopbackCluster:
    """Ray's multi-node test cluster, every node on 127.0.0.1 and free ports, its files
    (and the address file ``ray.init`` would otherwise share with every Ray on the machine)
    under a directory of its own."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.dir = Path(tempfile.mkdtemp(prefix="wr-mn-", dir="/tmp"))  # short: unix socket paths
        (self.dir / "ray").mkdir()
        self._saved_tmpdir = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(self.dir)
        self.cluster: Any = None
        self.kinds: dict[str, str] = {}
        self.nodes: dict[str, Any] = {}
        gcs, dash, client = free_ports(3)
        try:
            self.cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
                "node_ip_address": "127.0.0.1", "gcs_server_port": gcs, "num_cpus": 0, "include_dashboard": True,
                "dashboard_host": "127.0.0.1", "dashboard_port": dash, "ray_client_server_port": client,
                "object_store_memory": OBJECT_STORE, "temp_dir": str(self.dir),
            })
        except BaseException:
            self.shutdown()
            raise
        self.kinds[self.cluster.head_node.node_id] = "head"

    def add(self, kind: str) -> str:
        resources = {STAND_IN: 1.0} if kind == "trainer" else {}
        node = self.cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1, resources=resources,
                                     object_store_memory=OBJECT_STORE, temp_dir=str(self.dir))
        self.kinds[node.node_id] = kind
        self.nodes[node.node_id] = node
        return node.node_id

    def remove(self, node_id: str) -> None:
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)

    def processes(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(self.dir) in a for a in p.info["cmdline"] or []):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def shutdown(self) -> None:
        try:
            if self.cluster is not None:
                self.cluster.shutdown()
        finally:
            # Whatever still names this cluster's directory (a start that failed half-way).
            for p in self.processes():
                with contextlib.suppress(psutil.Error):
                    p.kill()
            if self._saved_tmpdir is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = self._saved_tmpdir


@pytest.fixture(scope="module")
def cluster() -> Any:
    from ray import cloudpickle

    from pipeline.cluster import connect_ray

    if ray.is_initialized():
        ray.shutdown()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the recording worker travels by value
    c = _LoopbackCluster()
    try:
        for kind in ("decoder", "decoder", "trainer", "trainer"):
            c.add(kind)
        connect_ray(c.cluster.address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _tasks_by_node(name_part: str) -> tuple[Counter[str], set[str]]:
    """(node -> tasks whose name holds ``name_part``, every task name seen), from Ray's state API."""
    from ray.util.state import list_tasks

    tasks = list_tasks(limit=10_000, detail=True, raise_on_missing_output=False)
    return Counter(t.node_id for t in tasks if name_part in t.name and t.node_id), {t.name for t in tasks}


def test_decoders_and_trainers_apart_and_losing_either_mid_epoch(cluster: Any, tmp_path: Path) -> None:
    from pipeline.data.demo_corpus import make_corpus
    from pipeline.data.loader import read_dataset_info
    from pipeline.data.prepare import prepare
    from pipeline.train.trainer import fit_run, latest_checkpoint_uri, read_trainer_state

    t0 = time.monotonic()
    listening: set[tuple[str, int, str]] = set()
    make_corpus(tmp_path / "corpus", minutes=2.0, seed=11, progress=lambda _: None)
    shards = str(tmp_path / "shards")
    data = C.tiny().data
    data.shard_size_mb = 0.5  # several shards: decode work for both decoders
    prepare(str(tmp_path / "corpus"), shards, data, progress=lambda _: None)
    listening |= listening_addresses(cluster.processes())
    records = tmp_path / "records"
    records.mkdir()
    runs = tmp_path / "runs"
    cfg = C.apply_overrides(C.tiny(), [
        f"data.train_uri={shards}", f"checkpoint.storage_path={runs}", "checkpoint.run_name=mn",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.max_steps=1000", "data.max_epochs=1",
        "train.log_every=1", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=5", "checkpoint.max_failures=2",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", f"scaling.worker_resources=[{STAND_IN}=1]",
        "deepspeed.zero_stage=2", "data.decode_cpus=0.5", "data.max_samples_per_batch=32000",
        "data.max_sample_size=32000", "data.min_sample_size=8000",
    ])

    events: dict[str, Any] = {}
    failure: list[BaseException] = []
    stop = threading.Event()

    def chaos() -> None:
        """Phase 2 at the 3rd consumed batch, phase 3 two updates past a checkpoint at step >= 8."""
        try:
            deadline = time.monotonic() + PHASE_TIMEOUT_S
            while not stop.is_set() and time.monotonic() < deadline:
                seen = _records(records)
                if "decoder_removed" not in events and len(seen) >= 3:
                    victim = next(n for n, k in cluster.kinds.items() if k == "decoder" and n in cluster.nodes)
                    cluster.remove(victim)
                    events["decoder_removed"] = (victim, len(seen))
                latest = latest_checkpoint_uri(str(runs / "mn"), recorded_only=True) if (runs / "mn").is_dir() else None
                step = read_trainer_state(latest).step if latest else 0
                rank1 = [r for r in seen if r["rank"] == 1 and r["start"] == 0]
                if "decoder_removed" in events and step >= 2 * EVERY and len(rank1) >= step + 2:
                    victim = rank1[-1]["node"]
                    cluster.remove(victim)
                    events["trainer_removed"] = (victim, step)
                    events["trainer_added"] = cluster.add("trainer")
                    return
                nonlocal listening
                listening |= listening_addresses(cluster.processes())
                time.sleep(0.2)
        except BaseException as e:  # reported by the test thread
            failure.append(e)

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    try:
        result = fit_run(cfg, functools.partial(_recording_worker, record_dir=str(records)))
    finally:
        stop.set()
        chaos_thread.join(timeout=30)
    assert not failure, failure
    t_run = time.monotonic() - t0

    # 1. Placement, from Ray's state: the run's decode tasks on decoders only (prepare's, run
    # before training took the trainers' CPUs, may use any node with a free CPU).
    kinds = cluster.kinds
    placed, names = _tasks_by_node("TrainSource")
    assert placed, f"no decode task of the training input in Ray's state (tasks: {sorted(names)[:20]})"
    assert {kinds[n] for n in placed} == {"decoder"}, {kinds.get(n, n): c for n, c in placed.items()}
    assert events["decoder_removed"][0] in placed, "the removed decoder had decoded nothing: phase 2 tested nothing"
    seen = _records(records)
    assert {kinds[r["node"]] for r in seen} == {"trainer"}
    from ray.util.state import list_actors

    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100, raise_on_missing_output=False)
    assert workers and {kinds[a.node_id] for a in workers} == {"trainer"}, [(a.node_id, a.state) for a in workers]

    # 2. + 3. Two worker groups only: the decoder's loss cost no restart; the trainer's one.
    assert "decoder_removed" in events and "trainer_removed" in events, events
    starts = sorted({r["start"] for r in seen})
    assert len(starts) == 2 and starts[0] == 0, starts
    resumed = starts[1]
    assert resumed % EVERY == 0 and resumed >= 2 * EVERY, (resumed, events)
    removed_decoder, at = events["decoder_removed"]
    assert at < sum(1 for r in seen if r["start"] == 0), "the decoder left before the epoch was read"
    first = [r for r in seen if r["start"] == 0]
    second = [r for r in seen if r["start"] == resumed]
    assert {r["node"] for r in second} >= {events["trainer_added"]}, "the restarted group uses the new trainer"
    assert events["trainer_removed"][0] not in {r["node"] for r in second}

    # Exact data position: per rank, the first `resumed` batches of the first group, then the
    # second group's, make the epoch with every planned batch and every utterance exactly once.
    before = [r for rank in (0, 1) for r in [x for x in first if x["rank"] == rank][:resumed]]
    kept = before + second
    keys = Counter(tuple(r["key"]) for r in kept)
    assert max(keys.values()) == 1, [k for k, c in keys.items() if c > 1]
    state = read_trainer_state(str(runs / "mn" / f"checkpoint_{resumed:09d}"))
    from pipeline.data.position import DataPosition

    position = DataPosition(state.data_position)
    assert all(position.contains(0, *r["key"]) for r in before)
    assert not any(position.contains(0, *r["key"]) for r in second)
    ids = Counter(i for r in kept for i in r["ids"])
    info = read_dataset_info(shards)
    import pyarrow.compute as pc

    from pipeline.data import schema as S
    from pipeline.data import storage

    manifest = storage.read_table(storage.join(shards, S.MANIFEST_FILE), [S.ID, S.SPLIT, S.NUM_SAMPLES])
    train = manifest.filter(pc.and_(pc.equal(manifest.column(S.SPLIT), "train"),
                                    pc.greater_equal(manifest.column(S.NUM_SAMPLES), cfg.data.min_sample_size)))
    assert set(ids) == set(train.column(S.ID).to_pylist()) and max(ids.values()) == 1
    assert all(r["epoch"] == 0 for r in kept)
    assert result.step == len(kept) // 2, (result.step, len(kept))
    assert len(info.split("train")) > 1

    # Every listening socket of the cluster on loopback.
    assert listening, "the socket audit saw nothing"
    external = {a for a in listening if not is_loopback(a[0])}
    assert not external, f"bound outside loopback: {sorted(external)}"
    print(f"multi-node: decoder removed after {at} batches, trainer removed at checkpoint step "
          f"{events['trainer_removed'][1]}, resumed from {resumed}, {len(kept)} batches, {result.step} updates, "
          f"{t_run:.0f} s; {len(listening)} listening sockets, all on loopback")
