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
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3


class StorageError(RuntimeError):
    """The object store cannot be used: unreachable, refused, or missing a bucket."""


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
    def from_config(cls, endpoint: str = "", region: str = "") -> Storage:
        """Endpoint/region from the config, else the AWS variables; credentials resolved at use."""
        return cls(
            endpoint=endpoint or os.environ.get("AWS_ENDPOINT_URL_S3", "") or os.environ.get("AWS_ENDPOINT_URL", ""),
            region=region or os.environ.get("AWS_DEFAULT_REGION", "") or os.environ.get("AWS_REGION", "") or "us-east-1",
        )

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


_FS_CACHE: dict[Storage, pafs.S3FileSystem] = {}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str, storage: Storage | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` (local path or ``s3://bucket/key``) -> (filesystem, path inside it)."""
    if is_s3(uri):
        storage = storage or Storage.from_config()
        fs = _FS_CACHE.get(storage)
        if fs is None:
            fs = _FS_CACHE[storage] = storage.s3()
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


def check_reachable(uri: str, storage: Storage | None = None) -> None:
    """Fail in seconds, naming the endpoint, when ``uri``'s object store cannot be used.

    Local paths always pass. For s3:// it asks for the bucket: a refused connection, a
    timeout, denied credentials and a missing bucket each give a :class:`StorageError`.
    """
    if not is_s3(uri):
        return
    storage = storage or Storage.from_config()
    fs, path = resolve(uri, storage)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
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
    fs, path = resolve(uri, storage)
    bucket = path.split("/", 1)[0]
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


def write_bytes(uri: str, data: bytes, storage: Storage | None = None) -> None:
    fs, path = resolve(uri, storage)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str, storage: Storage | None = None) -> Any:
    return json.loads(read_bytes(uri, storage).decode("utf-8"))


def write_json(uri: str, obj: Any, storage: Storage | None = None) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"), storage)


def delete_dir(uri: str, storage: Storage | None = None) -> None:
    """Remove a directory/prefix and everything under it (absent: nothing to do)."""
    fs, path = resolve(uri, storage)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
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
