"""How a job finds its Ray instance: an explicit ``auto`` needs a cluster ``ray start`` left
on this machine, and says so when there is none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_auto_without_a_started_cluster_is_a_clear_error(tmp_path: Path) -> None:
    # In a child process, with its temporary directory empty: no ``ray/ray_current_cluster``.
    code = (
        "from pipeline.cluster import connect_ray\n"
        "try:\n"
        "    connect_ray('auto')\n"
        "except ValueError as e:\n"
        "    print('ERROR', e)\n"
        "else:\n"
        "    print('CONNECTED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**_env(), "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERROR") and "ray start --head" in out.stdout, out.stdout


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
