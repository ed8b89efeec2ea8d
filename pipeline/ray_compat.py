"""What wavray relies on in Ray beyond its documented API, in one place.

Upgrading Ray should break this module and its test (``tests/pipeline/test_ray_compat.py``),
not a run. Each function names the behaviour it depends on:

- :func:`start_local`: a local instance whose every process listens on 127.0.0.1. Ray
  binds its GCS, raylet, workers and agents to all interfaces or to the machine's
  external address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` puts it in its
  local-only mode (made for laptops; read into ``ray_constants.ENABLE_RAY_CLUSTER`` when
  Ray is imported, so the starting process sets both), the GCS port is taken from
  ``RAY_GCS_SERVER_PORT`` (an internal config override), and a start that misses the
  raylet's fixed start-up window fails with an exception whose only mark is the text
  "timed out during startup".
- :func:`latest_checkpoint_dir`: the checkpoint Ray Train resumes a run from, read with
  ``ray.train.Result.from_path`` (public, alpha) from the bookkeeping file Ray Train keeps
  in the run folder.
- :class:`ObjectStoreMeter`: bytes in the object stores of the whole cluster, from the
  raylet's ``FormatGlobalMemoryInfo`` reply (``ray._private.internal_api``, what
  ``ray memory --stats-only`` prints); no public API reports it.
- :func:`quiet_env` / :func:`quiet_driver_logs`: Ray Data logs every dataset's execution
  plan and progress at INFO; ``RAY_DATA_LOG_LEVEL`` is the level it reads for its logger.
- :func:`quiet_worker_logs` / :func:`train_logging_config`: Ray Train logs every
  ``ray.train.report`` of every worker at INFO ("Reporting training result ...") from a
  logger named after its source file, outside the ``ray.train`` hierarchy that its own
  ``LoggingConfig`` controls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.net import free_port

log = logging.getLogger("wavray")

START_ATTEMPTS = 3
"""Tries to start a local instance: a machine busy with other work can miss the raylet's
fixed start-up window, and a second try usually succeeds."""
STARTUP_TIMEOUT_TEXT = "timed out during startup"
"""The only mark of a start that missed that window (``ray._private.node``)."""

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # local-only mode: every process binds 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata look-ups by AWS clients
}
"""Set for the processes of a local instance (they inherit the driver's environment at
``ray.init``), whatever the user's shell holds."""
DEAD_PROXY = "http://127.0.0.1:9"
"""Ray's start probes cloud-metadata addresses over HTTP; for the instance's own
processes a proxy that answers nothing swallows those requests, loopback excepted."""
_PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")
_NO_PROXY = "127.0.0.1,localhost"


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set inside the block and restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _local_only_mode() -> Iterator[None]:
    """Ray's local-only mode for this process too: Ray reads its switch into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` when it is imported, which may have
    happened before; the variable alone reaches only the processes started from here."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def local_instance_env() -> tuple[dict[str, str], dict[str, str]]:
    """(environment of the instance's own processes, ``env_vars`` of the job's tasks and actors).

    The dead proxy applies only where the user has no proxy of their own; the job's tasks
    and actors get the proxy variables back (empty: none), so their own HTTP clients
    (MLflow on another machine, the object store) are not sent to it.
    """
    system = dict(LOOPBACK_ENV)
    tasks: dict[str, str] = {}
    if not any(os.environ.get(v) for v in _PROXY_VARS):
        system.update({v: DEAD_PROXY for v in _PROXY_VARS})
        system.update({"NO_PROXY": _NO_PROXY, "no_proxy": _NO_PROXY})
        tasks.update({v: "" for v in _PROXY_VARS})
    return system, tasks


def start_local(
    *, num_cpus: int | None = None, dashboard: bool = True, verbose: bool = False,
    object_store_memory: int | None = None,
) -> str:
    """Start a Ray instance on this machine, on 127.0.0.1 only; returns its GCS address.

    ``object_store_memory``: bytes of Ray's object store (None: Ray's default, 30% of memory).

    The GCS port is chosen here so that the address can go into every task's environment
    (``RAY_ADDRESS``): several instances may share the machine, and Ray Train's clean-up
    inside a Tune trial must find this one (STACK.md).
    """
    import ray

    system_env, task_env = local_instance_env()
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        address = f"127.0.0.1:{port}"
        before = _children()
        try:
            with _environment({**system_env, "RAY_GCS_SERVER_PORT": str(port)}), _local_only_mode():
                ray.init(
                    num_cpus=num_cpus, object_store_memory=object_store_memory, _node_ip_address="127.0.0.1",
                    include_dashboard=dashboard,
                    dashboard_host="127.0.0.1", dashboard_port=free_port() if dashboard else None,
                    runtime_env={"env_vars": {"RAY_ADDRESS": address, **task_env, **quiet_env(verbose)}},
                    configure_logging=True, logging_level=logging.INFO if verbose else logging.WARNING,
                    log_to_driver=True,
                )
            return address
        except Exception as e:
            if STARTUP_TIMEOUT_TEXT not in str(e) or attempt == START_ATTEMPTS:
                raise
            log.warning("Ray did not start (%s); retrying (%d/%d)", e, attempt, START_ATTEMPTS)
            # A failed start can leave its GCS and raylet running: end those, by PID.
            ray.shutdown()
            for pid in _children() - before:
                _end(pid)
    raise AssertionError("unreachable")


def _children() -> set[int]:
    """PIDs whose parent is this process (from /proc; no extra dependency)."""
    me, out = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.add(int(entry.name))
    return out


def _end(pid: int, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def latest_checkpoint_dir(run_path: str, fs: pafs.FileSystem) -> str | None:
    """The name of the checkpoint folder Ray Train recorded last for the run at
    ``run_path`` (a path inside ``fs``); None when it recorded none.

    Raises ``FileNotFoundError`` when the run has no bookkeeping file (never reported, or
    not a Ray Train run) and ``ValueError`` when the file cannot be read (written by
    another Ray version, or cut short).
    """
    from ray.train import Result

    try:
        result = Result.from_path(run_path, storage_filesystem=fs)
    except RuntimeError as e:  # Ray's message for a missing folder or bookkeeping file
        raise FileNotFoundError(str(e)) from None
    except Exception as e:  # a snapshot that does not parse
        raise ValueError(f"{run_path}: Ray Train's checkpoint record is unreadable: {e}") from None
    if result.checkpoint is None:
        return None
    return Path(result.checkpoint.path).name


class ObjectStoreMeter:
    """Bytes held in the object stores of the connected cluster, for benchmarks."""

    def __init__(self, address: str | None = None) -> None:
        import ray
        from ray._private import internal_api

        self._api = internal_api
        self._state = internal_api.get_state_from_address(address or ray.get_runtime_context().gcs_address)

    def bytes_used(self) -> int:
        """Object-store bytes in use over all nodes now (primary copies and secondary)."""
        reply = self._api.get_memory_info_reply(self._state, timeout_seconds=10.0)
        return int(reply.store_stats.object_store_bytes_used)


DATA_LOG_LEVEL_VAR = "RAY_DATA_LOG_LEVEL"
"""Read by Ray Data when it configures its ``ray.data`` logger in each process."""


def quiet_env(verbose: bool) -> dict[str, str]:
    """``env_vars`` for a job's tasks and actors: Ray Data's per-dataset INFO lines (execution
    plans, progress) off the console unless ``verbose``."""
    return {} if verbose else {DATA_LOG_LEVEL_VAR: "WARNING"}


def quiet_driver_logs(verbose: bool) -> None:
    """The same for the job's own process. Importing ``ray.data`` configures its logger (level
    DEBUG) and would undo a level set before, so it is imported first."""
    import ray.data  # noqa: F401

    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def train_logging_config(verbose: bool) -> Any:
    """Ray Train's ``LoggingConfig``: its own ``ray.train`` logs at WARNING unless ``verbose``."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")


def quiet_worker_logs(verbose: bool) -> None:
    """In a Ray Train worker: records of loggers without a level of their own (Ray Train's
    per-report line among them) only from WARNING up, unless ``verbose``. Loggers with
    their own level (``wavray`` is at INFO) are not affected."""
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
