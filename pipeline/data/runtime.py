"""Connecting to Ray the same way from every data job: a cluster when there is one,
else a local instance that keeps all its traffic on loopback."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

# Ray gives a new node 30 s (not configurable) to register; a machine busy with other
# work can miss that, and a second try usually succeeds.
START_ATTEMPTS = 3


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` (``ray job submit`` sets it) or start Ray on 127.0.0.1.

    A no-op when Ray is already initialised in this process. Ray Data would otherwise
    start a local instance by itself, bound to whatever interface it picks.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    for attempt in range(1, START_ATTEMPTS + 1):
        before = _children()
        try:
            ray.init(
                num_cpus=num_cpus,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                configure_logging=True,
                logging_level="WARNING",
            )
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS:
                raise
            # The failed start leaves its GCS and raylet running: end those, by PID.
            ray.shutdown()
            for pid in _children() - before:
                _end(pid)


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
