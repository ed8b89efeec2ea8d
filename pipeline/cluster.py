"""Joining or starting the Ray instance a job runs on: one way for every job.

An explicit address (``--address``; ``auto`` is the cluster ``ray start`` left on this
machine), else ``RAY_ADDRESS`` (set by ``ray job submit``), else a local instance whose
every process listens on 127.0.0.1, whatever the shell's environment holds
(:func:`pipeline.ray_compat.start_local`). Never a cluster found by chance: a machine may
run other people's clusters.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def connect_ray(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True, verbose: bool = False
) -> str:
    """Connect to one Ray instance and return its address.

    A Train run inside a Tune trial releases its workers' CPUs through a detached
    clean-up actor that asks the state API whether the trial's Train controller is alive;
    that needs the dashboard and the address of this instance in every worker's
    environment (``RAY_ADDRESS``), since several Ray instances may share the machine.
    ``dashboard=False`` suits jobs without Ray Train (``jobs.prepare``): a faster start.
    ``verbose``: Ray's own INFO logs on the console (WARNING and up otherwise).
    """
    import ray

    from pipeline.ray_compat import quiet_driver_logs, quiet_env, start_local

    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if address == "auto":
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if not current.is_file():
            raise ValueError("--address auto: no Ray cluster started on this machine (ray start --head)")
        address = current.read_text().strip()
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": address, **quiet_env(verbose)}},
                 log_to_driver=True)
    else:
        address = start_local(num_cpus=num_cpus, dashboard=dashboard, verbose=verbose)
    quiet_driver_logs(verbose)
    return address
