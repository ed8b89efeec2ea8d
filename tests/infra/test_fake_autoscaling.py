"""The worker types of infra/cluster/aws.yaml on Ray's fake multi-node autoscaler.

Ray's ``AutoscalingCluster`` runs the real autoscaler (the ``monitor`` process of the head)
with the ``fake_multinode`` node provider, which "launches" a node by starting another raylet
on this machine. The node types come from aws.yaml with their sizes scaled down to fit two
cores (1 CPU each; a GPU count of 1: Ray schedules GPUs as a logical resource, so a node may
advertise one without having one). CPU-only work must add a decoder node and no trainer; a
GPU bundle must add a trainer; once idle, every worker node must go.

The base class is kept for its config layout and the fake provider, but its ``start()`` and
``shutdown()`` run ``ray stop --force``, which ends every Ray process of the user on the
machine (other people's too), and it reads an example YAML that the ray wheel does not ship.
The subclass starts the head itself, bound to 127.0.0.1 on free ports, in a process group
of its own, and ends exactly that group.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from cluster_audit import is_loopback, listening_addresses
from infra_specs import AWS_YAML, launcher_worker_groups, prepared_cluster_config
from ray.cluster_utils import AutoscalingCluster

from pipeline.net import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray's minimum is 75 MiB
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s: long enough to see the nodes, short enough for a test
START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 150.0


class LoopbackAutoscalingCluster(AutoscalingCluster):
    """A fake autoscaling cluster on 127.0.0.1 that stops only the processes it started."""

    def __init__(self, head_resources: dict[str, Any], worker_node_types: dict[str, Any], *,
                 idle_timeout_minutes: float) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="wr-as-", dir="/tmp"))  # short: unix socket paths
        self._idle_timeout_minutes = idle_timeout_minutes
        self._proc: subprocess.Popen[bytes] | None = None
        super().__init__(head_resources=head_resources, worker_node_types=worker_node_types)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _generate_config(self, head_resources: dict[str, Any], worker_node_types: dict[str, Any],
                         autoscaler_v2: bool = False, **config_kwargs: Any) -> dict[str, Any]:
        node_types = {name: dict(spec) for name, spec in worker_node_types.items()}
        node_types["ray.head.default"] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "wavray-fake",
            "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                # Fake nodes join this GCS instead of the default port 6379.
                "gcs_address": self.address,
            },
            "available_node_types": node_types,
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self._idle_timeout_minutes,
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            **config_kwargs,
        }

    def env(self) -> dict[str, str]:
        """Environment of the head, of every fake node (the autoscaler inherits it) and of drivers."""
        env = dict(os.environ)
        env.update({
            # get_node_ip_address() answers 127.0.0.1, for the fake nodes too (tests/conftest.py
            # sets it from infra/loopback.env; repeated here because the nodes depend on it).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # A token of this cluster's own, not the shared ~/.ray/auth_token.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.workdir / "auth_token"),
        })
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, _system_config: dict[str, Any] | None = None,
              override_env: dict[str, str] | None = None) -> None:
        (self.workdir / "auth_token").write_text(secrets.token_hex(32))
        config_path = self.workdir / "autoscaling.json"
        config_path.write_text(json.dumps(self._config))
        head = dict(self._head_resources)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--autoscaling-config={config_path}",
            f"--temp-dir={self.workdir}",
            f"--num-cpus={head.pop('CPU', 0)}",
            f"--object-store-memory={head.pop('object_store_memory', OBJECT_STORE_BYTES)}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats",
        ]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        env = self.env()
        env.update({"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"})
        env.update(override_env or {})
        log = (self.workdir / "head.log").open("wb")
        # A new session: the head, the autoscaler and every fake node it starts share one
        # process group, which shutdown() ends and nothing else.
        self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.workdir / "ray_current_cluster").exists():
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._proc.returncode}: {self.head_log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"head not up after {START_TIMEOUT_S} s: {self.head_log()}")
            time.sleep(0.5)

    def head_log(self) -> str:
        path = self.workdir / "head.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: its process group plus anything naming its temp dir."""
        if self._proc is None:
            return []
        mine = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.pid) == self._proc.pid or any(str(self.workdir) in a for a in p.info["cmdline"] or []):
                    mine.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return mine

    def listening_addresses(self) -> set[tuple[str, int, str]]:
        """(ip, port, process name) of every listening TCP socket of this cluster."""
        return listening_addresses(self.processes())

    def shutdown(self) -> None:
        if self._proc is None:
            return
        pgid = self._proc.pid
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self._proc.poll()
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
        self._proc.wait(timeout=5)
        # Stray processes outside the group that still name this cluster's temp dir.
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass


def scaled_worker_types(config: dict[str, Any], max_per_type: int = 1) -> dict[str, Any]:
    """The launcher's worker types at the size of this machine: 1 CPU, 1 GPU where there are GPUs."""
    types = {}
    for name, group in launcher_worker_groups(config).items():
        resources: dict[str, Any] = {"CPU": 1, "object_store_memory": OBJECT_STORE_BYTES}
        if group["resources"].get("GPU", 0) > 0:
            resources["GPU"] = 1
        types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": group["min"],
            "max_workers": min(group["max"], max_per_type),
        }
    return types


def test_trainer_and_decoder_types_scale_separately_and_back_to_zero() -> None:
    config = prepared_cluster_config(AWS_YAML)
    groups = launcher_worker_groups(config)
    trainers = [n for n, g in groups.items() if g["resources"].get("GPU", 0) > 0]
    decoders = [n for n, g in groups.items() if g["resources"].get("GPU", 0) == 0]
    assert trainers and decoders, f"aws.yaml: expected GPU and CPU-only worker types, got {groups}"
    assert all(g["min"] == 0 for g in groups.values()), "worker types must scale from zero"
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"].get("CPU")

    cluster = LoopbackAutoscalingCluster(
        head_resources={"CPU": head_cpus}, worker_node_types=scaled_worker_types(config),
        idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
    )
    # A process that `ray stop` would take for a Ray worker (it matches "default_worker.py"
    # in command lines), standing for someone else's Ray on this machine: it must survive.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", "300", "default_worker.py"],
        start_new_session=True,
    )
    t0 = time.monotonic()
    listening: set[tuple[str, int, str]] = set()
    try:
        cluster.start()
        t_head = time.monotonic() - t0
        driver = subprocess.Popen(
            [sys.executable, str(HERE / "fake_cluster_job.py"), "--address", cluster.address,
             # One decode task: it fits the one scaled decoder node. More CPU demand than the
             # decoders can hold is placed on trainer nodes too (Ray only prefers to keep GPU
             # nodes for GPU work), which is what a real cluster does past decoder max_workers.
             "--num-decode-tasks", "1", "--trainer-bundle", json.dumps({"CPU": 1, "GPU": 1}),
             "--step-timeout-s", "60", "--scale-down-timeout-s", "60"],
            env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        # While the job runs, record every listening socket of the cluster's processes.
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while driver.poll() is None and time.monotonic() < deadline:
            listening |= cluster.listening_addresses()
            time.sleep(1.0)
        if driver.poll() is None:
            driver.kill()
        output = driver.communicate(timeout=10)[0].decode(errors="replace")
        assert driver.returncode == 0, f"driver failed ({driver.returncode}):\n{output[-4000:]}\n{cluster.head_log()}"
        started = cluster.processes()
        t_job = time.monotonic() - t0
    finally:
        cluster.shutdown()
        bystander_alive = bystander.poll() is None
        bystander.kill()
        bystander.wait(timeout=10)
    elapsed = time.monotonic() - t0
    left = cluster.processes()
    shutil.rmtree(cluster.workdir, ignore_errors=True)

    lines = [ln for ln in output.splitlines() if ln.startswith("FAKE_CLUSTER_REPORT ")]
    assert lines, f"no report from the driver:\n{output[-4000:]}"
    report = json.loads(lines[-1].split(" ", 1)[1])

    # Nothing bound the external interface; everything we started is gone.
    assert report["driver_ip"] == "127.0.0.1"
    assert listening, "no listening socket seen: the audit did not run"
    external = {a for a in listening if not is_loopback(a[0])}
    assert not external, f"bound outside loopback: {sorted(external)}"
    assert started, "no cluster process found while the job ran"
    assert not left, f"left running: {[p.pid for p in left]}"
    assert bystander_alive, "shutdown ended a process it did not start"

    # The head alone at the start: every worker type has min_workers 0.
    assert len(report["nodes_at_start"]) == 1
    # CPU-only demand added a decoder node and no trainer.
    assert {d["node_type"] for d in report["decode"]} <= set(decoders), report["decode"]
    assert len(report["nodes_after_decode"]) == 2, report["nodes_after_decode"]
    assert not any(n["resources"].get("GPU") for n in report["nodes_after_decode"]), report["nodes_after_decode"]
    # The GPU bundle added a trainer node, and the worker in it was given the GPU.
    assert report["train"]["node_type"] in trainers, report["train"]
    assert report["train"]["gpu_ids"] == ["0"], report["train"]
    assert report["train"]["node_id"] in {n["node_id"] for n in report["nodes_at_peak"]}
    # Once idle, every worker node was removed.
    assert len(report["nodes_at_end"]) == 1, report["nodes_at_end"]
    assert not report["nodes_at_end"][0]["resources"].get("CPU"), "the node left should be the CPU-less head"
    print(f"fake autoscaling: decode at {report['decode_done_s']:.1f} s, train at {report['train_done_s']:.1f} s, "
          f"scaled down at {report['scale_down_done_s']:.1f} s (after connecting); head up at {t_head:.1f} s, "
          f"job done at {t_job:.1f} s, all stopped at {elapsed:.1f} s; "
          f"{len(listening)} listening sockets, all on loopback")
