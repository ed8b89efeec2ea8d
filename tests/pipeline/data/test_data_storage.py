"""Object storage: the local SeaweedFS store works like S3, and a bad store fails fast, named."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from fixtures.objectstore import S3Store

from pipeline.data import objectstore, storage
from pipeline.data.storage import Storage, StorageError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_store_round_trip_and_loopback_only(s3_store: S3Store) -> None:
    uri = s3_store.uri("storage-test", "a", "x.json")
    storage.write_json(uri, {"k": [1, 2]})
    assert storage.read_json(uri) == {"k": [1, 2]}
    assert [f.base_name for f in storage.list_dir(s3_store.uri("storage-test", "a"))] == ["x.json"]
    storage.delete_dir(s3_store.uri("storage-test"))
    assert not storage.exists(uri)
    # every port weed listens on is on 127.0.0.1
    state = objectstore.load(_state_dir(s3_store))
    assert state is not None and len(state.ports) >= 10
    listening = _listening_addresses(state.pid)
    assert listening and all(addr.startswith("127.0.0.1:") for addr in listening), listening


def _state_dir(s3_store: S3Store) -> str:
    from fixtures.objectstore import _RUNNING

    assert _RUNNING and _RUNNING[0].endpoint == s3_store.endpoint
    return _RUNNING[0].state_dir


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets ``pid`` listens on (from /proc, no tools needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    host, port = cols[1].split(":")
                    if len(host) == 8:
                        ip = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
                    else:
                        ip = host
                    out.append(f"{ip}:{int(port, 16)}")
    return out


def test_unreachable_store_fails_in_seconds_naming_the_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError, match=endpoint.replace(".", r"\.")):
        storage.check_reachable("s3://bucket/prefix", Storage(endpoint=endpoint, access_key="a", secret_key="b"))
    assert time.monotonic() - start < 10


def test_wrong_credentials_and_missing_bucket_are_named(s3_store: S3Store) -> None:
    bad = Storage(endpoint=s3_store.endpoint, access_key="nobody", secret_key="wrong")
    with pytest.raises(StorageError, match=s3_store.endpoint.replace(".", r"\.")):
        storage.check_reachable(s3_store.uri("x"), bad)
    good = Storage.from_config(s3_store.endpoint)
    with pytest.raises(StorageError, match="does not exist"):
        storage.check_reachable("s3://no-such-bucket-here/x", good)
    assert "wrong" not in repr(bad) and "nobody" not in repr(bad)


def test_store_stop_ends_only_its_own_process(tmp_path: Path) -> None:
    store = objectstore.start(tmp_path / "second", buckets=["bkt"])
    try:
        assert objectstore.load(tmp_path / "second") is not None
        other = Storage(endpoint=store.endpoint, access_key=store.access_key, secret_key=store.secret_key)
        storage.write_bytes("s3://bkt/k", b"v", other)
        assert storage.read_bytes("s3://bkt/k", other) == b"v"
    finally:
        assert objectstore.stop(tmp_path / "second")
    assert objectstore.load(tmp_path / "second") is None
    assert not objectstore.stop(tmp_path / "second")  # nothing left to stop, nothing else touched


def test_prepare_and_training_input_fail_fast_on_an_unreachable_store(tmp_path: Path) -> None:
    from pipeline.config import tiny
    from pipeline.data.loader import read_dataset_info
    from pipeline.data.prepare import prepare

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    cfg = tiny().data
    cfg.s3_endpoint = endpoint
    start = time.monotonic()
    with pytest.raises(StorageError, match=endpoint.replace(".", r"\.")):
        prepare("s3://raw/audio", str(tmp_path / "out"), cfg, progress=lambda _: None)
    with pytest.raises(StorageError, match=endpoint.replace(".", r"\.")):
        read_dataset_info("s3://data/shards", Storage(endpoint=endpoint))
    assert time.monotonic() - start < 20
    with pytest.raises(ValueError, match="train_uri"):
        read_dataset_info(str(tmp_path / "nothing-here"))
