"""Faults of a long run on the data path, against a real object store that really goes away.

Each test that stops a store starts its own (SeaweedFS on loopback, the session store's
credentials, so the module's Ray workers can use it too) and stops only that one:

- the store restarted on the same port right after a stop (connections from the last run
  still in TIME_WAIT), with its data and credentials;
- reads and writes ride out a short outage; past ``retry_s`` a StorageError names the
  endpoint, fast;
- prepare while the store goes away: stopped mid-convert, it ends with the endpoint
  named, no partial shard is ever listed as done, and the same call finishes the job
  without converting again the groups already done and without a duplicate;
- prepare cut during its s3:// listing and before its commit continues from where it was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from fixtures.objectstore import S3Store

from pipeline.config import tiny
from pipeline.data import listing as L
from pipeline.data import objectstore, storage
from pipeline.data import schema as S
from pipeline.data import testing as T
from pipeline.data.prepare import DONE_DIR, prepare, work_uri
from pipeline.data.storage import Storage, StorageError

BUCKET = "faults"


class Interrupted(Exception):
    """Stands for the driver being killed at a chosen point."""


@pytest.fixture()
def own_store(s3_store: S3Store, tmp_path: Path) -> Iterator[objectstore.ObjectStore]:
    """A store of this test's own, with the session store's credentials."""
    store = objectstore.start(tmp_path / "store", buckets=[BUCKET], access_key=s3_store.access_key,
                              secret_key=s3_store.secret_key)
    try:
        yield store
    finally:
        objectstore.stop(store.state_dir)


def _port(store: objectstore.ObjectStore) -> int:
    return int(store.endpoint.rsplit(":", 1)[1])


def _restart(store: objectstore.ObjectStore) -> objectstore.ObjectStore:
    return objectstore.start(store.state_dir, port=_port(store))


def test_the_store_starts_again_on_its_port_at_once_with_its_data(own_store: objectstore.ObjectStore) -> None:
    port = _port(own_store)
    s3 = Storage.from_config(own_store.endpoint)
    storage.write_bytes(f"s3://{BUCKET}/kept", b"still here", s3)
    for _ in range(20):  # connections the server closes at stop linger in TIME_WAIT
        storage.read_bytes(f"s3://{BUCKET}/kept", s3)
    objectstore.stop(own_store.state_dir)
    waiting = [c for c in psutil.net_connections(kind="tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_TIME_WAIT]
    assert waiting, "no connection in TIME_WAIT on the port: the case this test is about did not arise"
    started = time.monotonic()
    again = _restart(own_store)  # must not refuse the port
    assert again.endpoint == own_store.endpoint and time.monotonic() - started < 15
    assert (again.access_key, again.secret_key) == (own_store.access_key, own_store.secret_key)
    assert storage.read_bytes(f"s3://{BUCKET}/kept", s3) == b"still here"


def test_reads_and_writes_ride_out_an_outage_then_name_the_endpoint(
    own_store: objectstore.ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    s3 = Storage.from_config(own_store.endpoint, retry_s=30)
    storage.write_bytes(f"s3://{BUCKET}/a", b"x" * 1000, s3)
    objectstore.stop(own_store.state_dir)
    back = threading.Timer(3.0, _restart, args=(own_store,))
    back.start()
    started = time.monotonic()
    storage.write_bytes(f"s3://{BUCKET}/b", b"written during the outage", s3)
    assert storage.read_bytes(f"s3://{BUCKET}/a", s3) == b"x" * 1000
    assert 2.5 < time.monotonic() - started < 30
    back.join()
    assert storage.read_bytes(f"s3://{BUCKET}/b", s3) == b"written during the outage"

    objectstore.stop(own_store.state_dir)
    short = Storage.from_config(own_store.endpoint, retry_s=2)
    started = time.monotonic()
    with pytest.raises(StorageError, match=own_store.endpoint.replace(".", r"\.") + r".*data\.s3_retry_seconds"):
        storage.read_bytes(f"s3://{BUCKET}/a", short)
    assert time.monotonic() - started < 15
    # A wrong request is not an outage: it fails at once, whatever the budget.
    _restart(own_store)
    assert [r for r in caplog.records if "retrying" in r.getMessage()], "the outages above logged no retry"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wavray.storage"), pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{BUCKET}/never-written", s3)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()], "a missing key was retried"


def _corpus(uri: str, n: int, s3: Storage) -> None:
    for i in range(n):
        audio = T.tone(0.5 + (i % 5) / 10, 22050, freq=200.0 + 13 * i, seed=i)
        storage.write_bytes(f"{uri}/d{i % 3}/u{i:03d}.wav", T.encode(audio, 22050), s3)


def _finished_groups(out: str, s3: Storage) -> list:
    """The outcome files of the groups an unfinished prepare of ``out`` has done."""
    versions = [v.base_name for v in storage.list_dir(work_uri(out), s3) if not v.base_name.startswith("listing-")]
    return [g for v in versions for g in storage.list_dir(storage.join(work_uri(out, v), DONE_DIR), s3)]


def _check_exactly_once(out: str, n: int, s3: Storage) -> None:
    summary = storage.read_json(f"{out}/{S.SUMMARY_FILE}", s3)
    assert summary["files_in"] == summary["accepted"] == n, summary
    manifest = storage.read_table(f"{out}/{S.MANIFEST_FILE}", None, s3)
    ids = manifest.column(S.ID).to_pylist()
    assert len(ids) == len(set(ids)) == n
    rows = sum(pq.read_metadata(storage.resolve(f"{out}/{s['path']}", s3)[1],
                                filesystem=storage.resolve(out, s3)[0]).num_rows for s in summary["shards"])
    assert rows == n
    fs, path = storage.resolve(f"{out}/{S.SHARDS_DIR}", s3)
    import pyarrow.fs as pafs

    parts = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    assert sorted(p.split(f"{S.SHARDS_DIR}/", 1)[1] for p in parts) == sorted(
        s["path"].split(f"{S.SHARDS_DIR}/", 1)[1] for s in summary["shards"]), "a shard part nobody lists"
    fs, work = storage.resolve(work_uri(out), s3)
    left = [i.path for i in fs.get_file_info(pafs.FileSelector(work, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File]
    assert not left, f"the work area outlived the commit: {left[:3]}"


def test_prepare_while_the_store_goes_away(own_store: objectstore.ObjectStore, ray_local: None) -> None:
    s3 = Storage.from_config(own_store.endpoint, retry_s=3)
    raw, out = f"s3://{BUCKET}/raw", f"s3://{BUCKET}/prepared"
    n = 24
    _corpus(raw, n, s3)
    # One file per group, one group at a time: the outage lands between groups, mid-convert.
    cfg = replace(tiny().data, s3_endpoint=own_store.endpoint, s3_retry_seconds=3.0, shard_size_mb=0.01,
                  valid_fraction=0.0, decode_cpus=2.0)
    done: dict[str, float] = {}
    watchers: list[threading.Thread] = []

    def stop_after_some_groups(name: str) -> None:
        if name != "convert":
            return

        def watch() -> None:
            while True:
                groups = _finished_groups(out, s3)
                if len(groups) >= 3:
                    # Recorded first: the store stops answering at SIGTERM, while its graceful
                    # shutdown can outlast the job's retry window.
                    done["stopped_at"] = len(groups)
                    objectstore.stop(own_store.state_dir)
                    return
                time.sleep(0.05)

        watchers.append(threading.Thread(target=watch, daemon=True))
        watchers[-1].start()

    started = time.monotonic()
    with pytest.raises(StorageError, match=own_store.endpoint.replace(".", r"\.")):
        prepare(raw, out, cfg, progress=lambda _: None, on_stage=stop_after_some_groups)
    failed_after = time.monotonic() - started
    for watcher in watchers:
        watcher.join(timeout=30)
    assert 3 <= done["stopped_at"] < n

    _restart(own_store)
    assert not storage.exists(f"{out}/{S.SUMMARY_FILE}", s3)
    # No partial shard is listed as done: each finished group's outcome names parts that hold
    # exactly its rows.
    finished = _finished_groups(out, s3)
    assert len(finished) >= done["stopped_at"]
    before = {}
    for info in finished:
        outcome = storage.read_table(f"s3://{info.path}", None, s3).to_pylist()
        for shard in {r[S.SHARD] for r in outcome}:
            table = storage.read_table(f"{out}/{shard}", [S.ID], s3)
            assert table.column(S.ID).to_pylist() == [r[S.ID] for r in outcome if r[S.SHARD] == shard]
        before[info.base_name] = info.mtime_ns

    progress: list[str] = []
    prepare(raw, out, cfg, progress=progress.append)
    assert any(f"{len(before)} groups done before" in p for p in progress), progress
    _check_exactly_once(out, n, s3)
    print(f"prepare: the store stopped after {done['stopped_at']} of {n} groups; the job ended naming it "
          f"{failed_after:.1f} s after it started; the rerun converted {n - len(before)} groups")


def test_prepare_cut_while_listing_and_before_its_commit_continues(
    s3_store: S3Store, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = Storage.from_config(s3_store.endpoint)
    raw, out = s3_store.uri("cut", "raw"), s3_store.uri("cut", "prepared")
    n = 30
    _corpus(raw, n, s3)
    storage.write_bytes(f"{raw}/notes.txt", b"not audio", s3)
    cfg = replace(tiny().data, shard_size_mb=0.02, valid_fraction=0.2)
    monkeypatch.setattr(storage, "LIST_PAGE_KEYS", 4)  # pages of 4 keys, saved every 8
    monkeypatch.setattr(L, "KEYS_PER_SAVED_PAGE", 8)
    listed: list[str] = []

    def cut_listing(line: str) -> None:
        listed.append(line)
        if sum("listed" in x for x in listed) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        prepare(raw, out, cfg, progress=cut_listing)
    starts: list[str] = []
    original = storage.list_keys

    def spying(uri: str, store: Storage | None = None, *, start_after: str = "") -> Iterator[list]:
        starts.append(start_after)
        yield from original(uri, store, start_after=start_after)

    monkeypatch.setattr(storage, "list_keys", spying)

    def cut_commit(name: str) -> None:
        if name == "commit":
            raise Interrupted

    progress: list[str] = []
    with pytest.raises(Interrupted):
        prepare(raw, out, cfg, progress=progress.append, on_stage=cut_commit)
    assert starts and starts[0] > "", "the listing started over instead of after its last saved key"
    assert any("resumes after" in p for p in progress), progress
    groups = _finished_groups(out, s3)
    assert groups
    stamps = {g.base_name: g.mtime_ns for g in groups}

    progress.clear()
    summary = prepare(raw, out, cfg, progress=progress.append)
    assert any(f"{len(stamps)} groups done before" in p for p in progress), progress
    assert summary["files_not_audio"] == {".txt": 1}
    _check_exactly_once(out, n, s3)
    assert len(starts) == 1, "the listing saved by the cut run was not reused"
