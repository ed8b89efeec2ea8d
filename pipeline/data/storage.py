"""Local directories and s3:// prefixes behind one pyarrow filesystem interface.

Every reader and writer of the data path goes through :func:`resolve`, so a local path
works wherever an s3:// URI does. The S3 endpoint and region come from the config or
the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``); credentials
from the AWS chain of the process that opens the filesystem (the config is logged to
MLflow, so it must never hold them). Nothing here prints a credential.

Credentials are never copied into anything that travels to Ray tasks or workers
(:class:`Storage`). An unreachable or misconfigured store must fail in seconds with the endpoint named,
not hang in the SDK's retry loop: connections time out after a few seconds and retries
are bounded.

Once a job runs, the store going away for a while (a restart, a network blip, S3 throttling)
must not end it: every s3:// operation made through :func:`resolve` (our reads and writes,
and Ray Train's, which gets the same filesystem) is retried with backoff for
``Storage.retry_s`` seconds (``data.s3_retry_seconds``), then fails with a
:class:`StorageError` naming the endpoint, and the same command run again resumes. Only
faults of the connection class are retried (:func:`is_transient`); a missing key or a
refused credential fails at once. Writes are buffered locally and uploaded whole when the
file is closed, so an object is either all there or absent, and an upload that failed
half-way is simply made again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("wavray.storage")

CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3
RETRY_S = 300.0
"""Default of ``data.s3_retry_seconds``: how long a running job rides out an object store
that cannot be reached."""
BACKOFF_S = (0.5, 10.0)
"""First and longest pause between two tries."""
SPOOL_MEMORY_BYTES = 16 << 20
"""An upload is buffered in memory up to this size, beyond it in a local temporary file."""

T = TypeVar("T")


class StorageError(RuntimeError):
    """The object store cannot be used: unreachable, refused, or missing a bucket."""


class LocalDiskFullError(OSError):
    """A local directory the job writes to (upload buffer, checkpoint staging, Ray's spilling
    directory) is full."""


@dataclass(frozen=True)
class Storage:
    """How to reach s3:// URIs: endpoint and region, nothing secret.

    It travels with the work (Ray tasks, the training workers' config), so it carries no
    credentials: each process that opens the filesystem resolves them itself, through
    the AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile, an
    instance role), from its own environment: the cluster's, or a Ray runtime
    environment. Explicit keys are for code in one process (tests, benchmarks); a
    ``Storage`` holding them refuses to be pickled, so they cannot travel by accident.
    """

    endpoint: str = ""
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    retry_s: float = RETRY_S
    """How long an operation of a running job is retried while the store cannot be reached."""

    def __repr__(self) -> str:
        who = "given" if self.access_key else "from the environment"
        return f"Storage(endpoint={self.endpoint!r}, region={self.region!r}, credentials={who})"

    def __getstate__(self) -> dict[str, Any]:
        if self.access_key or self.secret_key:
            raise TypeError(
                "Storage with explicit credentials cannot be pickled: credentials are resolved where they are "
                "used (AWS_* variables, instance role, Ray runtime env), never carried with the work"
            )
        return dict(self.__dict__)

    @classmethod
    def from_config(cls, endpoint: str = "", region: str = "", retry_s: float = RETRY_S) -> Storage:
        """Endpoint/region from the config, else the AWS variables; credentials resolved at use."""
        return cls(
            endpoint=endpoint or os.environ.get("AWS_ENDPOINT_URL_S3", "") or os.environ.get("AWS_ENDPOINT_URL", ""),
            region=region or os.environ.get("AWS_DEFAULT_REGION", "") or os.environ.get("AWS_REGION", "") or "us-east-1",
            retry_s=retry_s,
        )

    @classmethod
    def for_data(cls, cfg: Any) -> Storage:
        """From a ``data`` config section (``s3_endpoint``, ``s3_region``, ``s3_retry_seconds``)."""
        return cls.from_config(cfg.s3_endpoint, cfg.s3_region, cfg.s3_retry_seconds)

    def describe(self) -> str:
        """Where s3:// requests go, for error messages."""
        return self.endpoint or f"AWS S3 ({self.region})"

    def s3(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {
            "region": self.region or "us-east-1",
            "connect_timeout": CONNECT_TIMEOUT_S,
            "request_timeout": REQUEST_TIMEOUT_S,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
            "allow_bucket_creation": True,
        }
        if self.endpoint:
            scheme, _, rest = self.endpoint.partition("://")
            if not rest:
                raise ValueError(
                    f"S3 endpoint: expected a URL like http://127.0.0.1:8333, got {self.endpoint!r}"
                )
            kwargs["endpoint_override"] = rest.rstrip("/")
            kwargs["scheme"] = scheme
        if self.access_key or self.secret_key:
            kwargs["access_key"] = self.access_key
            kwargs["secret_key"] = self.secret_key
        return pafs.S3FileSystem(**kwargs)


# --- riding out an object store that goes away -------------------------------------------------

_TRANSIENT_MARKS = (
    "NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Connection refused", "Connection reset",
    "curlCode: 7,", "curlCode: 28,", "curlCode: 52,", "curlCode: 55,", "curlCode: 56,", "Timeout was reached",
    "SERVICE_UNAVAILABLE", "SLOW_DOWN", "SlowDown", "INTERNAL_FAILURE", "THROTTLING", "REQUEST_TIMEOUT",
    "HTTP status 500", "HTTP status 502", "HTTP status 503", "HTTP status 504", "Empty reply from server",
)
_TRANSIENT_TYPES = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError")


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` says the store could not be reached or was overloaded (worth retrying),
    rather than that the request was wrong (a missing key, denied credentials)."""
    if type(e).__name__ in _TRANSIENT_TYPES:
        return True
    response = getattr(e, "response", None)  # botocore's ClientError
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"):
        return True
    if not isinstance(e, OSError):
        return False
    text = str(e)
    return any(mark in text for mark in _TRANSIENT_MARKS)


def retrying(what: str, fn: Callable[[], T], store: Storage) -> T:
    """``fn()``, tried again with backoff while the store cannot be reached, for up to
    ``store.retry_s`` seconds; then a :class:`StorageError` naming the endpoint and ``what``."""
    deadline = 0.0
    delay = BACKOFF_S[0]
    started = 0.0
    while True:
        try:
            result = fn()
        except Exception as e:
            if not is_transient(e):
                raise
            now = time.monotonic()
            if not deadline:
                started, deadline = now, now + store.retry_s
                log.warning("object store at %s cannot be reached while %s (%s); retrying for up to %.0f s "
                            "(data.s3_retry_seconds)", store.describe(), what, _short(e), store.retry_s)
            if now >= deadline:
                raise StorageError(
                    f"object store at {store.describe()} could not be reached for {store.retry_s:.0f} s "
                    f"(data.s3_retry_seconds) while {what}: {_short(e)}. Once it is back, run the same "
                    "command again: it resumes."
                ) from None
            time.sleep(min(delay, deadline - now))
            delay = min(2 * delay, BACKOFF_S[1])
            continue
        if deadline:
            log.warning("object store at %s reachable again after %.1f s (%s)", store.describe(),
                        time.monotonic() - started, what)
        return result


_STORAGE_FAILURE = re.compile(r"StorageError: (.+)")


def failure_in(error: BaseException) -> BaseException | None:
    """The :class:`StorageError` (or :class:`LocalDiskFullError`) inside ``error``, out of the
    wrapping of Ray (a task's error, a Train worker group's or controller's, carrying the
    original as an object or only as the text of its traceback), so that a job can say it
    plainly; None when the failure is of another kind."""
    seen: set[int] = set()
    stack: list[Any] = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, dict):
            stack.extend(e.values())
            continue
        if not isinstance(e, BaseException):
            continue
        if isinstance(e, StorageError | LocalDiskFullError):
            return e
        if any(c.__name__ == "OutOfDiskError" for c in type(e).__mro__) or _RAY_DISK_FULL in str(e):
            return ray_disk_full_error()
        stack.extend([e.__cause__, e.__context__, *vars(e).values()])
        found = _STORAGE_FAILURE.search(str(e))
        if found:
            return StorageError(found.group(1).strip())
    return None


_RAY_DISK_FULL = "The object cannot be created because the local object store is full and the local disk"
"""What Ray's ``OutOfDiskError`` says (its text survives where the error is only a traceback)."""


def ray_disk_full_error() -> LocalDiskFullError:
    """Ray's ``OutOfDiskError`` said plainly: objects no longer fit in Ray's object store and the
    disk it spills them to is over Ray's capacity threshold, so Ray refuses new objects (at
    once, rather than the job hanging on spills that cannot be written)."""
    return LocalDiskFullError(
        errno.ENOSPC,
        "Ray's object store is full and the local disk it spills objects to is full (over Ray's "
        "local_fs_capacity_threshold, 95% by default): free space in Ray's spilling directory (ray start "
        "--object-spilling-directory; by default under Ray's temp directory, /tmp/ray) or point it at a larger disk",
    )


class _RetryingS3(pafs.FileSystemHandler):
    """S3 through pyarrow, every call retried by :func:`retrying`; writes uploaded whole on close.

    Picklable when its :class:`Storage` is (no explicit credentials): the S3 client is made
    in each process on first use, from that process's own credentials.
    """

    def __init__(self, store: Storage) -> None:
        self.store = store
        self._fs: pafs.S3FileSystem | None = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_RetryingS3, (self.store,))

    @property
    def s3(self) -> pafs.S3FileSystem:
        with self._lock:
            if self._fs is None:
                self._fs = self.store.s3()
            return self._fs

    def _do(self, what: str, fn: Callable[[], T]) -> T:
        return retrying(what, fn, self.store)

    def get_type_name(self) -> str:
        return "wavray-s3"

    def equals(self, other: Any) -> bool:
        return self == getattr(other, "handler", other)

    # pyarrow compares two such filesystems by their handlers: the same store is the same
    # filesystem (Ray Train checks a checkpoint's against the run's).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RetryingS3) and other.store == self.store

    def __hash__(self) -> int:
        return hash(self.store)

    def normalize_path(self, path: str) -> str:
        return self.s3.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._do(f"looking up {_show(paths)}", lambda: self.s3.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._do(f"listing s3://{selector.base_dir}", lambda: self.s3.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._do(f"creating s3://{path}", lambda: self.s3.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._do(f"deleting s3://{path}", lambda: self.s3.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._do(f"emptying s3://{path}",
                 lambda: self.s3.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise OSError("wavray never empties a whole object store")

    def delete_file(self, path: str) -> None:
        self._do(f"deleting s3://{path}", lambda: self.s3.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._do(f"moving s3://{src}", lambda: self.s3.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._do(f"copying s3://{src}", lambda: self.s3.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_RetryingReader(self, path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_RetryingReader(self, path), mode="r")

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return pa.PythonFile(_WholeUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        raise OSError(f"s3://{path}: S3 objects cannot be appended to")


def _show(paths: list[str]) -> str:
    return f"s3://{paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "") if paths else "nothing"


class _RetryingReader:
    """A readable, seekable file over an S3 object; each read retried on its own."""

    def __init__(self, handler: _RetryingS3, path: str) -> None:
        self._handler = handler
        self._path = path
        self._file = handler._do(f"opening s3://{path}", lambda: handler.s3.open_input_file(path))
        self._size = self._file.size()
        self._pos = 0
        self.closed = False

    def read(self, nbytes: int | None = -1) -> bytes:
        left = self._size - self._pos
        n = left if nbytes is None or nbytes < 0 else min(nbytes, left)
        if n <= 0:
            return b""
        pos = self._pos
        data = self._handler._do(f"reading s3://{self._path}", lambda: self._file.read_at(n, pos))
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()


class _WholeUpload:
    """A writable file buffered locally and uploaded as one object when closed: the object is
    all there or absent, and an upload cut by the store going away is made again whole."""

    def __init__(self, handler: _RetryingS3, path: str, metadata: Any) -> None:
        self._handler = handler
        self._path = path
        self._metadata = metadata
        self._buffer = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES, prefix="wavray-upload-")
        self.closed = False

    def write(self, data: Any) -> int:
        try:
            return self._buffer.write(data)
        except OSError as e:
            raise local_disk_error(e, tempfile.gettempdir(), f"buffering s3://{self._path} for upload") from None

    def tell(self) -> int:
        return self._buffer.tell()

    def flush(self) -> None:
        pass

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._handler._do(f"uploading s3://{self._path}", self._upload)
        finally:
            self._buffer.close()

    def _upload(self) -> None:
        self._buffer.seek(0)
        with self._handler.s3.open_output_stream(self._path, metadata=self._metadata) as out:
            while chunk := self._buffer.read(8 << 20):
                out.write(chunk)


def local_disk_error(e: OSError, directory: str | os.PathLike, doing: str) -> OSError:
    """``e`` as a :class:`LocalDiskFullError` naming ``directory`` and its free space when the disk
    is full (ENOSPC, EDQUOT, EFBIG), else ``e`` itself."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return e
    try:
        import shutil

        free = f"{shutil.disk_usage(directory).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return LocalDiskFullError(
        e.errno, f"the local disk at {directory} is full ({free}) while {doing}; free space there or point "
                 "TMPDIR (uploads, checkpoint staging) or Ray's spilling directory at a larger disk"
    )


_FS_CACHE: dict[Storage, pafs.FileSystem] = {}
_HANDLERS: dict[Storage, _RetryingS3] = {}
_CLIENTS: dict[Storage, Any] = {}
_CLIENTS_LOCK = threading.Lock()
LIST_PAGE_KEYS = 1000
"""Keys per ListObjectsV2 request (S3's maximum)."""


def _client(store: Storage) -> Any:
    """A botocore S3 client for ``store`` (one per process), for what pyarrow's filesystem
    cannot do: list a prefix page by page from a given key."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(store)
        if client is None:
            import botocore.config  # installed with s3fs
            import botocore.session

            kwargs: dict[str, Any] = {"region_name": store.region or "us-east-1", "config": botocore.config.Config(
                connect_timeout=CONNECT_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}, s3={"addressing_style": "path"},
            )}
            if store.endpoint:
                kwargs["endpoint_url"] = store.endpoint
            if store.access_key or store.secret_key:
                kwargs.update(aws_access_key_id=store.access_key, aws_secret_access_key=store.secret_key)
            client = _CLIENTS[store] = botocore.session.get_session().create_client("s3", **kwargs)
        return client


def list_keys(uri: str, store: Storage | None = None, *, start_after: str = "") -> Iterator[list[tuple[str, int, int]]]:
    """Pages of ``(key relative to uri, size, mtime_ns)`` under an s3:// prefix, in key order,
    starting after the relative key ``start_after``; each request retried like every other."""
    store = store or Storage.from_config()
    _, path = resolve(uri, store)
    bucket, _, prefix = path.partition("/")
    prefix = prefix + "/" if prefix else ""
    client = _client(store)
    token = ""
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE_KEYS}
        if token:
            kwargs["ContinuationToken"] = token
        elif start_after:
            kwargs["StartAfter"] = prefix + start_after
        try:
            reply = retrying(f"listing {uri}", lambda kw=kwargs: client.list_objects_v2(**kw), store)
        except StorageError:
            raise
        except Exception as e:  # botocore's ClientError: denied, no such bucket
            raise StorageError(f"object store at {store.describe()}: cannot list {uri}: {_short(e)}") from None
        page = []
        for obj in reply.get("Contents", []):
            key = obj["Key"][len(prefix):]
            if not key or key.endswith("/"):  # directory markers some tools leave
                continue
            when = obj["LastModified"]
            page.append((key, int(obj["Size"]), int(when.timestamp()) * 10**9 + when.microsecond * 1000))
        yield page
        if not reply.get("IsTruncated"):
            return
        token = reply["NextContinuationToken"]


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str, storage: Storage | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` (local path or ``s3://bucket/key``) -> (filesystem, path inside it).

    For s3:// the filesystem retries while the store cannot be reached (see the module's
    docstring); :func:`check_reachable` is the fail-fast check before a job starts."""
    if is_s3(uri):
        storage = storage or Storage.from_config()
        fs = _FS_CACHE.get(storage)
        if fs is None:
            handler = _HANDLERS[storage] = _RetryingS3(storage)
            fs = _FS_CACHE[storage] = pafs.PyFileSystem(handler)
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise ValueError(f"{uri!r}: expected s3://bucket[/prefix]")
        return fs, path
    if "://" in uri:
        raise ValueError(f"{uri!r}: expected a local path or an s3:// URI")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join URI parts with ``/`` (local paths too: pyarrow takes forward slashes)."""
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):].rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def relative(root: str, path: str) -> str:
    """``path`` (as the filesystem lists it) relative to ``root`` (likewise)."""
    root = root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{path!r} is not under {root!r}")
    return path[len(root) + 1:]


def check_reachable(uri: str, storage: Storage | None = None, *, wait: bool = False) -> None:
    """Fail in seconds, naming the endpoint, when ``uri``'s object store cannot be used.

    Local paths always pass. For s3:// it asks for the bucket: a refused connection, a
    timeout, denied credentials and a missing bucket each give a :class:`StorageError`.
    ``wait``: ride out a store that cannot be reached for ``retry_s`` first, as a running
    job does (a restart of a run's workers), instead of failing fast as a job that starts.
    """
    if not is_s3(uri):
        return
    storage = storage or Storage.from_config()
    _, path = resolve(uri, storage)
    bucket = path.split("/", 1)[0]
    raw = _raw_s3(storage)
    try:
        if wait:
            info = retrying(f"looking for bucket {bucket}", lambda: raw.get_file_info(bucket), storage)
        else:  # not retried: a job must not start on a dead store
            info = raw.get_file_info(bucket)
    except OSError as e:
        raise StorageError(
            f"object store at {storage.describe()} is not usable for {uri!r}: {_short(e)}. "
            "Check data.s3_endpoint / AWS_ENDPOINT_URL and the AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY variables."
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"object store at {storage.describe()}: bucket {bucket!r} of {uri!r} does not exist")


def ensure_bucket(uri: str, storage: Storage | None = None) -> None:
    """Create the bucket of an s3:// output URI when missing (a no-op for local paths)."""
    if not is_s3(uri):
        return
    store = storage or Storage.from_config()
    _, path = resolve(uri, store)
    bucket = path.split("/", 1)[0]
    fs = store.s3()
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            fs.create_dir(bucket)
    except OSError as e:
        raise StorageError(
            f"object store at {(storage or Storage.from_config()).describe()}: cannot create bucket "
            f"{bucket!r}: {_short(e)}"
        ) from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def exists(uri: str, storage: Storage | None = None) -> bool:
    fs, path = resolve(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage: Storage | None = None) -> bytes:
    fs, path = resolve(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read()


@contextlib.contextmanager
def atomic_path(uri: str, storage: Storage | None = None) -> Iterator[tuple[pafs.FileSystem, str]]:
    """``(filesystem, path)`` to write ``uri`` through, so that ``uri`` appears whole or not at all.

    The file is written under a temporary name and published only when the block ends
    without an error: renamed into place beside it (local), or written in the local
    temporary directory and uploaded whole (s3://). A writer that fails half-way (its
    ``close`` still runs) publishes nothing.
    """
    if is_s3(uri):
        fd, local = tempfile.mkstemp(prefix="wavray-upload-")
        os.close(fd)
        try:
            yield pafs.LocalFileSystem(), local
            upload_file(local, uri, storage)
        except OSError as e:
            raise local_disk_error(e, tempfile.gettempdir(), f"writing {uri} before its upload") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(local)
        return
    fs, path = resolve(uri, storage)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield fs, tmp
        fs.move(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise local_disk_error(e, parent, f"writing {uri}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def write_bytes(uri: str, data: bytes, storage: Storage | None = None) -> None:
    """Write ``uri`` whole (never half-written, see :func:`atomic_path`)."""
    with atomic_path(uri, storage) as (fs, path), fs.open_output_stream(path) as f:
        f.write(data)


def upload_file(local: str | os.PathLike, uri: str, storage: Storage | None = None) -> None:
    """Copy a local file (or a directory, file by file) to ``uri``, whole or not at all; to
    s3:// straight from the file (no second local copy) through the plain S3 filesystem, one
    file at a time (copies into the retrying filesystem can deadlock), the whole transfer
    retried while the store cannot be reached."""
    local = str(local)
    if not is_s3(uri):
        with atomic_path(uri, storage) as (fs, path):
            pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        return
    store = storage or Storage.from_config()
    _, path = resolve(uri, store)
    retrying(f"uploading {uri}", lambda: pafs.copy_files(
        local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=_raw_s3(store),
        use_threads=False,  # pyarrow's threaded copy to S3 is unsafe (apache/arrow#32372)
    ), store)


def _raw_s3(store: Storage) -> pafs.S3FileSystem:
    """The S3 filesystem under ``store``'s retrying one (each call not retried)."""
    resolve("s3://bucket", store)
    return _HANDLERS[store].s3


def write_table(uri: str, table: pa.Table, storage: Storage | None = None, **kwargs: Any) -> None:
    """A Parquet file at ``uri``, written whole (see :func:`atomic_path`)."""
    with atomic_path(uri, storage) as (fs, path):
        pq.write_table(table, path, filesystem=fs, **kwargs)


def read_json(uri: str, storage: Storage | None = None) -> Any:
    return json.loads(read_bytes(uri, storage).decode("utf-8"))


def write_json(uri: str, obj: Any, storage: Storage | None = None) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"), storage)


def delete_dir(uri: str, storage: Storage | None = None) -> None:
    """Remove a directory/prefix and everything under it (absent: nothing to do)."""
    fs, path = resolve(uri, storage)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    with contextlib.suppress(FileNotFoundError):  # an S3 "directory" with nothing left under it
        fs.delete_dir(path)


def list_dir(uri: str, storage: Storage | None = None) -> list[pafs.FileInfo]:
    """Direct children of a directory/prefix ([] when absent)."""
    fs, path = resolve(uri, storage)
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []


def read_table(uri: str, columns: list[str] | None = None, storage_: Storage | None = None) -> pa.Table:
    """A Parquet file (local or s3://) as an Arrow table."""
    fs, path = resolve(uri, storage_)
    return pq.read_table(path, filesystem=fs, columns=columns)
