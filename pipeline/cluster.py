"""Joining or starting the Ray instance a job runs on.

Every job connects the same way: an explicit address (``--address``; ``auto`` is the
cluster ``ray start`` left on this machine), else ``RAY_ADDRESS`` (set by ``ray job
submit``), else a local instance bound to 127.0.0.1. Never a cluster found by chance: a
machine may run other people's clusters.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

log = logging.getLogger("wavray")

START_ATTEMPTS = 3
"""Tries to start a local Ray instance (see :func:`connect_ray`)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Connect to one Ray instance and return its GCS address.

    A Train run inside a Tune trial releases its workers' CPUs through a detached
    clean-up actor that asks the state API whether the trial's Train controller is alive;
    that needs the dashboard and the address of this instance in every worker's
    environment (``RAY_ADDRESS``), since several Ray instances may share the machine.
    ``address`` (or ``RAY_ADDRESS``, set by ``ray job submit``) joins a cluster; without
    one, a local instance starts on 127.0.0.1 with its GCS on a port chosen here.
    """
    import ray

    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if address == "auto":
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if not current.is_file():
            raise ValueError("--address auto: no Ray cluster started on this machine (ray start --head)")
        address = current.read_text().strip()
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": address}}, log_to_driver=True)
        return address
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            port = _free_port()
            address = f"127.0.0.1:{port}"
            os.environ["RAY_GCS_SERVER_PORT"] = str(port)
            try:
                ray.init(
                    num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                    dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                    runtime_env={"env_vars": {"RAY_ADDRESS": address}},
                    configure_logging=True, logging_level="WARNING", log_to_driver=True,
                )
                return address
            except Exception as e:
                # The raylet gives its agents a fixed few seconds to come up, which a loaded
                # machine can miss; a failed start leaves nothing running, so try again.
                if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS:
                    raise
                log.warning("Ray did not start (%s); retrying (%d/%d)", e, attempt, START_ATTEMPTS)
                ray.shutdown()
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    raise AssertionError("unreachable")
