"""Pins of what wavray relies on in Ray beyond its documented API (``pipeline/ray_compat.py``):
upgrading Ray fails here first, by name, instead of in a run."""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import ray_compat as RC


def test_the_switches_and_messages_ray_is_read_by() -> None:
    import ray._private.node
    from ray._private import ray_constants

    # Local-only mode: the variable and the constant it is read into at import.
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert set(RC.LOOPBACK_ENV) >= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED"}
    # A start that missed the raylet's window is known by its message only.
    assert RC.STARTUP_TIMEOUT_TEXT in inspect.getsource(ray._private.node)
    # Ray Data's logger level comes from this variable in every process.
    import ray.data._internal.logging as data_logging

    assert RC.DATA_LOG_LEVEL_VAR in inspect.getsource(data_logging)
    # Ray Train's run record reader and logging switch are public (alpha) and take what we pass.
    import ray.train

    assert "storage_filesystem" in inspect.signature(ray.train.Result.from_path).parameters
    assert RC.train_logging_config(False).log_level == "WARNING"


def test_the_driver_stays_quiet_when_ray_data_is_imported_after() -> None:
    """Importing ``ray.data`` configures its logger; a job that quiets it first must stay quiet."""
    code = ("import logging; from pipeline.ray_compat import quiet_driver_logs; quiet_driver_logs(False); "
            "import ray.data; print(logging.getLogger('ray.data').getEffectiveLevel())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == str(logging.WARNING), out.stderr[-2000:]


def test_the_job_proxy_variables_stay_the_users(monkeypatch) -> None:
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    system, tasks = RC.local_instance_env()
    assert system["HTTP_PROXY"] == RC.DEAD_PROXY and tasks["HTTP_PROXY"] == ""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    system, tasks = RC.local_instance_env()
    assert "HTTP_PROXY" not in system and not tasks, "a user's own proxy is left alone"


@pytest.mark.e2e
def test_latest_checkpoint_and_a_quiet_console(capfd) -> None:
    """A real Ray Train run of two reports: the run record names the newest checkpoint, and
    with the quiet settings no per-report line of Ray Train reaches the console."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import connect_ray

    def train_fn(config: dict) -> None:
        RC.quiet_worker_logs(False)
        for step in (1, 2):
            with tempfile.TemporaryDirectory() as d:
                Path(d, "x").write_text(str(step))
                ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint_{step:09d}")

    connect_ray(num_cpus=2, dashboard=False)
    storage = Path(tempfile.mkdtemp(prefix="wr-rc-"))
    try:
        TorchTrainer(
            train_fn,
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(name="pin", storage_path=str(storage),
                                           logging_config=RC.train_logging_config(False)),
        ).fit()
        out = capfd.readouterr()
        assert "Reporting training result" not in out.out + out.err
        fs = pafs.LocalFileSystem()
        assert RC.latest_checkpoint_dir(str(storage / "pin"), fs) == "checkpoint_000000002"
        with pytest.raises(FileNotFoundError):
            RC.latest_checkpoint_dir(str(storage / "never-ran"), fs)
        record = next(p for p in (storage / "pin").iterdir() if p.suffix == ".json")
        record.write_text(json.dumps({"not": "a record"}))
        with pytest.raises(ValueError, match="unreadable"):
            RC.latest_checkpoint_dir(str(storage / "pin"), fs)
        # The object-store meter of the scale benchmark sees what is put there.
        import numpy as np

        meter = RC.ObjectStoreMeter()
        before = meter.bytes_used()
        held = ray.put(np.ones(16 << 20, dtype=np.uint8))
        assert meter.bytes_used() - before >= 16 << 20
        del held
    finally:
        ray.shutdown()
