"""Talking to the target bucket: retries on transient errors, and what S3 itself stored.

Objects are uploaded with `ChecksumAlgorithm="SHA256"`, so S3 computes and keeps the checksum
of the bytes it received; verification compares that checksum (head_object with
`ChecksumMode="ENABLED"`: base64 of the raw sha256 digest) with the source's sha256, not a tag
the uploader wrote. A multipart object's checksum is S3's composite (the sha256 of the parts'
digests, "<base64>-<parts>"), recomputed from the source in the uploader's part size. Where the
endpoint keeps no checksum (an object from an older upload, an S3 without checksums), the
object's bytes are read back and hashed.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from research_pipeline.lib.migration.endpoints import MigrationTarget

log = logging.getLogger(__name__)

#: Multipart threshold and part size of uploads (the composite checksum depends on it).
PART_SIZE = 16 << 20
#: S3 answers that mean "try again later" (throttling, a node restarting).
_TRANSIENT_S3_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling"})
_MISSING_CODES = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def with_s3_retries(fn: Callable[..., Any], *args: Any, attempts: int = 6) -> Any:
    """`fn(*args)`, tried again with backoff on transient S3 errors that botocore gave up on.

    botocore retries each call, but its retry quota runs dry in a storm of 503s and then it
    raises at once; a migration would rather wait a few seconds than fail a shard.
    """
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError
    from botocore.exceptions import ConnectionError as S3ConnectionError

    for attempt in range(attempts - 1):
        try:
            return fn(*args)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status < 500 and exc.response.get("Error", {}).get("Code") not in _TRANSIENT_S3_CODES:
                raise
        except (S3ConnectionError, S3UploadFailedError):
            # upload_file wraps whatever failed in S3UploadFailedError; uploads are idempotent.
            pass
        pause = min(8.0, 0.25 * 2**attempt)
        log.info("transient S3 error in %s, trying again in %.2fs", getattr(fn, "__name__", fn), pause)
        time.sleep(pause)
    return fn(*args)


def head(target: MigrationTarget, key: str) -> dict | None:
    """head_object of an object-store key under the target prefix, checksum included (None: absent)."""
    try:
        return target.s3.head_object(Bucket=target.bucket, Key=target.key(key), ChecksumMode="ENABLED")
    except target.s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
            return None
        raise


def ensure_bucket(target: MigrationTarget) -> None:
    """Create the target bucket when it does not exist yet, with versioning and retention on."""
    s3 = target.s3
    try:
        s3.head_bucket(Bucket=target.bucket)
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        region = s3.meta.region_name
        kwargs = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=target.bucket, **kwargs)
    ensure_versioning(target)


#: Days an overwritten or deleted object's old version is kept (a bad write or a wrong delete
#: of a paper or an index file can be undone within them; docs/runbooks/object-store.md).
NONCURRENT_DAYS = 30
#: Days before S3 drops the parts of a multipart upload that never completed.
ABORT_MULTIPART_DAYS = 2
RETENTION_RULE_ID = "research-pipeline-retention"


def retention_rule(prefix: str) -> dict:
    """The lifecycle rule of the pipeline's objects under `prefix` ('' : the whole bucket)."""
    return {
        "ID": RETENTION_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": prefix.strip("/") + "/" if prefix.strip("/") else ""},
        "NoncurrentVersionExpiration": {"NoncurrentDays": NONCURRENT_DAYS},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_MULTIPART_DAYS},
    }


def ensure_versioning(target: MigrationTarget) -> None:
    """Bucket versioning on, and the retention rule (`retention_rule`) among the bucket's
    lifecycle rules (others are kept). Idempotent: changes only what is missing.

    Where the credentials may not change bucket settings (AccessDenied), the migration goes on
    and says what to ask the bucket's owner for.
    """
    s3 = target.s3
    try:
        if s3.get_bucket_versioning(Bucket=target.bucket).get("Status") != "Enabled":
            s3.put_bucket_versioning(Bucket=target.bucket, VersioningConfiguration={"Status": "Enabled"})
            log.info("bucket %s: versioning enabled", target.bucket)
        try:
            rules = s3.get_bucket_lifecycle_configuration(Bucket=target.bucket).get("Rules", [])
        except s3.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
                raise
            rules = []
        wanted = retention_rule(target.prefix)
        if wanted not in rules:
            others = [r for r in rules if r.get("ID") != RETENTION_RULE_ID]
            s3.put_bucket_lifecycle_configuration(Bucket=target.bucket, LifecycleConfiguration={"Rules": [*others, wanted]})
            log.info("bucket %s: old object versions kept %d days", target.bucket, NONCURRENT_DAYS)
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("AccessDenied", "NotImplemented"):
            raise
        log.warning(
            "bucket %s: could not turn on versioning and the %d-day retention of old versions (%s); ask the "
            "bucket's owner to enable them (docs/runbooks/object-store.md): without them an overwritten or "
            "deleted paper or index file cannot be recovered", target.bucket, NONCURRENT_DAYS,
            exc.response.get("Error", {}).get("Code"),
        )  # fmt: skip


def transfer_config() -> Any:
    """How files are uploaded: multipart above PART_SIZE (each part retried by botocore)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4)


def b64_of_hex(hex_digest: str) -> str:
    """A hex sha256 as S3 writes checksums: base64 of the raw digest."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def composite_sha256(blocks: Iterable[bytes], part_size: int | None = None) -> tuple[str, str]:
    """(hex sha256 of the whole, base64 composite checksum) of bytes split into parts as uploaded."""
    part_size = part_size or PART_SIZE
    whole, parts, part, filled = hashlib.sha256(), [], hashlib.sha256(), 0
    for block in blocks:
        whole.update(block)
        view = memoryview(block)
        while view:
            take = min(len(view), part_size - filled)
            part.update(view[:take])
            filled += take
            view = view[take:]
            if filled == part_size:
                parts.append(part.digest())
                part, filled = hashlib.sha256(), 0
    if filled or not parts:
        parts.append(part.digest())
    return whole.hexdigest(), base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode("ascii")


def read_back_sha256(target: MigrationTarget, key: str) -> str:
    """The hex sha256 of the object's bytes as S3 serves them."""
    body = target.s3.get_object(Bucket=target.bucket, Key=target.key(key))["Body"]
    h = hashlib.sha256()
    for block in iter(lambda: body.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()
