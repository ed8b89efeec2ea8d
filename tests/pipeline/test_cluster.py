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


_AUDIT = """
import ipaddress, json, os, time
import psutil, ray
from pipeline.cluster import connect_ray

connect_ray()

@ray.remote
def task():
    return os.getpid()

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
ray.get([task.remote(), actor.pid.remote()])
time.sleep(2)  # the agents finish binding their ports
ours = {p.pid: p for p in psutil.Process().children(recursive=True)}
ours[os.getpid()] = psutil.Process()
listening = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in ours:
        listening.append([c.laddr.ip, c.laddr.port, ours[c.pid].name()])
print("LISTENING " + json.dumps(listening))
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_a_job_started_from_a_bare_shell_keeps_its_ray_on_loopback(tmp_path: Path) -> None:
    """No loopback variables in the environment (a user who never sourced infra/loopback.env):
    every listening socket of the job's own Ray instance is still on loopback."""
    import json
    import os

    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _AUDIT], capture_output=True, text=True, cwd=ROOT, timeout=240,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("LISTENING "))
    listening = json.loads(line[len("LISTENING "):])
    assert len(listening) >= 5, f"too few sockets seen for a Ray instance: {listening}"
    outside = [s for s in listening if not _is_loopback(s[0])]
    assert not outside, f"listening beyond loopback: {outside}"
