"""Object stores for index files and original papers: a local folder or an S3 bucket.

Both expose the same small interface. Writes are atomic: readers see the old object or the
new one, never a partial file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class ObjectStore(Protocol):
    """Key/value storage for files; keys are '/'-separated relative paths."""

    url: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}: use a relative path without '.' or '..'")
    return key


def fsync_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class LocalObjectStore:
    """A folder on the local filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        fsync_write(self._path(key), data)

    def put_file(self, key: str, path: Path) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def get_file(self, key: str, path: Path) -> None:
        fsync_write(Path(path), self.get_bytes(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def list(self, prefix: str = "") -> Iterator[str]:
        if not self.root.exists():
            return
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


#: botocore attempts per S3 call, in its standard retry mode (exponential backoff with jitter on
#: throttling, 5xx and connection errors): a store answering 20% of requests 503 still serves.
S3_MAX_ATTEMPTS = 10


def retry_config():  # noqa: ANN201
    """The botocore Config of the pipeline's S3 clients: standard retries, S3_MAX_ATTEMPTS attempts."""
    from botocore.config import Config

    return Config(retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS})


class S3ObjectStore:
    """An S3 bucket (or any S3-compatible endpoint) under an optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", client=None, endpoint_url: str | None = None):
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, config=retry_config())
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers never see a partial object.
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None

    def get_file(self, key: str, path: Path) -> None:
        fsync_write(Path(path), self.get_bytes(key))

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, key: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        # A listing prefix is not a key: "indexes/" (a folder) and "indexes/g" (a name start) are both fine.
        if prefix.startswith("/") or any(p in (".", "..") for p in prefix.split("/")):
            raise ValueError(f"invalid object key prefix {prefix!r}: use a relative path without '.' or '..'")
        full = (self.prefix + "/" if self.prefix else "") + prefix
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def open_object_store(url: str, endpoint_url: str | None = None, client=None) -> ObjectStore:
    """`s3://bucket/prefix` opens S3; anything else is a local folder path."""
    if url.startswith("s3://"):
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"RP_OBJECT_STORE_URL {url!r} names no bucket (expected s3://bucket/prefix)")
        return S3ObjectStore(bucket, prefix, client=client, endpoint_url=endpoint_url)
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"RP_OBJECT_STORE_URL {url!r}: use a local path, file:///path or s3://bucket/prefix")
    return LocalObjectStore(url.removeprefix("file://"))
