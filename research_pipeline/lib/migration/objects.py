"""The files of a shard in the target bucket: original papers and index files, uploaded and checked.

Original papers (`papers/<doc_id>.pdf`) go by doc_id, index files (`indexes/...`, the same keys
as in the local object store, so index manifests resolve unchanged) by `sha256(key)[0]`.
Every object is uploaded with S3 checksums on and then checked against what S3 reports it
stored (see `s3`); an object S3 already holds equal is not sent again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.migration import errors, s3, state
from research_pipeline.lib.migration.codec import checksum_of
from research_pipeline.lib.migration.endpoints import (
    MigrationSource,
    MigrationTarget,
    prepare_target,
)
from research_pipeline.lib.migration.tables import check_shard

log = logging.getLogger(__name__)

#: Key prefixes in the object store (local and S3).
PAPERS_PREFIX = "papers/"
INDEXES_PREFIX = "indexes/"


@dataclass(frozen=True)
class ObjectPlan:
    """One object to have in S3: its key, expected bytes and sha256, and where it comes from."""

    key: str
    size: int | None
    sha256: str
    path: Path | None = None  # a local file to upload
    store_key: str | None = None  # or a key in the source object store
    problem: str | None = None  # why it cannot be uploaded (the source file is gone, changed...)


@dataclass(frozen=True)
class ObjectsResult:
    """What `migrate_objects` did for one shard."""

    objects: int
    bytes: int
    objects_skipped: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _local_path(uri: str, base: Path | None) -> Path | None:
    """The local file a source URI names (relative ones under `base`), or None for remote URIs."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if "://" in uri:
        return None
    path = Path(uri)
    return path if path.is_absolute() else (base or Path.cwd()) / path


def _plan_papers(source: MigrationSource, shard: str) -> list[ObjectPlan]:
    """The original PDFs of a shard: one object per document, `papers/<doc_id>.pdf`.

    Documents whose every source is remote (already in S3) have nothing to upload.
    """
    d, s = store.documents, store.document_sources
    with source.engine.connect() as conn:
        rows = conn.execute(
            sa.select(s.c.doc_id, s.c.uri, s.c.size)
            .join(d, d.c.doc_id == s.c.doc_id)
            .where(d.c.source_kind == "pdf", sa.func.substr(s.c.doc_id, 1, 1) == shard)
            .order_by(s.c.doc_id, s.c.uri)
        ).all()
    by_doc: dict[str, list[tuple[Path, int | None]]] = {}
    for doc_id, uri, size in rows:
        path = _local_path(uri, source.inbox)
        if path is not None:
            by_doc.setdefault(doc_id, []).append((path, size))
    plans = []
    for doc_id, candidates in by_doc.items():
        key = f"{PAPERS_PREFIX}{doc_id}.pdf"
        present = [p for p, _ in candidates if p.is_file()]
        if present:
            plans.append(ObjectPlan(key, present[0].stat().st_size, doc_id, path=present[0]))
        else:
            gone, size = candidates[0]
            problem = f"source file {gone} is gone: restore it or re-ingest the paper"
            plans.append(ObjectPlan(key, size, doc_id, problem=problem))
    return plans


def _plan_indexes(source: MigrationSource, shard: str) -> list[ObjectPlan]:
    """The index files (vector indexes and manifests) whose key hashes to the shard."""
    if source.store is None:
        return []
    plans = []
    root = getattr(source.store, "root", None)
    # Listed whole and filtered: S3ObjectStore.list refuses a prefix ending in "/".
    for key in source.store.list():
        if not key.startswith(INDEXES_PREFIX) or util.sha256_hex(key)[0] != shard:
            continue
        if root is not None:
            path = Path(root) / key
            plans.append(ObjectPlan(key, path.stat().st_size, util.sha256_file(path), path=path))
        else:
            data = source.store.get_bytes(key)
            plans.append(ObjectPlan(key, len(data), util.sha256_hex(data), store_key=key))
    return plans


def plan_objects(source: MigrationSource, shard: str) -> dict[str, list[ObjectPlan]]:
    """{object family: plans} of one shard."""
    check_shard(shard)
    return {"s3:papers": _plan_papers(source, shard), "s3:indexes": _plan_indexes(source, shard)}


def _source_blocks(source: MigrationSource, plan: ObjectPlan) -> Iterator[bytes] | None:
    """The source bytes of a plan in blocks (None when the source has none)."""
    if plan.path is not None and plan.path.is_file():
        def blocks() -> Iterator[bytes]:
            with open(plan.path, "rb") as fh:
                while block := fh.read(1 << 20):
                    yield block
        return blocks()
    if plan.store_key is not None:
        return iter([source.store.get_bytes(plan.store_key)])
    return None


def object_problem(source: MigrationSource, target: MigrationTarget, plan: ObjectPlan, deep: bool = False) -> str | None:
    """Why the target object is not the source's (None when S3 stored exactly the source bytes).

    Decided by S3's own SHA256 checksum of what it stored; by the bytes read back where S3 kept
    no checksum, or when `deep`.
    """
    head = s3.head(target, plan.key)
    if head is None:
        return "missing on target" + (f" ({plan.problem})" if plan.problem else "")
    if plan.size is not None and int(head["ContentLength"]) != plan.size:
        return f"size {head['ContentLength']} on target, {plan.size} in source"
    stored = head.get("ChecksumSHA256")
    if stored is None or deep:
        if s3.read_back_sha256(target, plan.key) != plan.sha256:
            return "content on target differs from source (sha256 of the bytes read back)"
        if stored is None:
            return None
    value = stored.split("-", 1)[0]
    if value == s3.b64_of_hex(plan.sha256):
        return None
    if int(head["ContentLength"]) >= s3.PART_SIZE:
        blocks = _source_blocks(source, plan)
        if blocks is not None:
            whole, composite = s3.composite_sha256(blocks)
            if whole == plan.sha256 and value == composite:
                return None
    return (
        f"S3's SHA256 checksum of the stored object ({stored}) is not the source's sha256 "
        f"({plan.sha256[:12]}...): the object was changed after the upload"
    )


def _upload(source: MigrationSource, target: MigrationTarget, plan: ObjectPlan) -> tuple[int, str | None]:
    """Upload one object unless the target already has it; returns (bytes sent, problem)."""
    if object_problem(source, target, plan) is None:
        return 0, None
    if plan.problem:
        return 0, plan.problem
    # S3 computes the SHA256 of what it receives and keeps it; the tag is for people.
    extra = {"Metadata": {"sha256": plan.sha256}, "ChecksumAlgorithm": "SHA256"}
    key = target.key(plan.key)
    if plan.path is not None:
        actual = util.sha256_file(plan.path)
        if actual != plan.sha256:
            return 0, f"{plan.path} changed since it was ingested (sha256 {actual[:12]}...): re-ingest it"
        target.s3.upload_file(str(plan.path), target.bucket, key, ExtraArgs=extra, Config=s3.transfer_config())
    else:
        data = source.store.get_bytes(plan.store_key)
        target.s3.put_object(Bucket=target.bucket, Key=key, Body=data, **extra)
    problem = object_problem(source, target, plan)
    return (plan.size or 0), (f"after upload: {problem}" if problem else None)


def migrate_objects(
    source: MigrationSource, target: MigrationTarget, shard: str, force: bool = False, workers: int = 8
) -> ObjectsResult:
    """Upload and verify the papers and index files of one shard (skipping what S3 already has).

    Raises MigrationError naming every object that could not be uploaded or stored equal.
    """
    if target.s3 is None:
        raise errors.MigrationError("no S3 client on the migration target: objects need a bucket to go to")
    prepare_target(target.engine)
    s3.ensure_bucket(target)
    t0 = time.perf_counter()
    states = state.migration_states(target.engine)
    n_objects = n_bytes = skipped = 0
    problems: list[str] = []
    for family, plans in plan_objects(source, shard).items():
        if state.is_verified(states, family, shard) and not force:
            skipped += len(plans)
            continue
        with target.engine.begin() as conn:
            state.set_states(conn, [state.ShardState(family, shard, state.State.PENDING)])
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(lambda p: s3.with_s3_retries(_upload, source, target, p), plans))
        family_problems = [f"{p.key}: {why}" for p, (_, why) in zip(plans, results) if why]
        n_objects += len(plans)
        n_bytes += sum(sent for sent, _ in results)
        if family_problems:
            problems += family_problems
            continue
        checksum = checksum_of(int(p.sha256, 16) for p in plans)
        with target.engine.begin() as conn:
            state.set_states(conn, [state.ShardState(family, shard, state.State.VERIFIED, len(plans), checksum)])
    result = ObjectsResult(n_objects, n_bytes, skipped, time.perf_counter() - t0)
    if problems:
        raise errors.MigrationError(f"shard {shard}: {len(problems)} objects not migrated: " + "; ".join(problems[:20]))
    log.info("objects[%s]: %d checked, %d bytes sent in %.2fs", shard, result.objects, result.bytes, result.seconds)
    return result
