"""A generation's full-text index (`search.fts_tantivy`) in the object store and on replicas.

Build: `build_fts_and_publish` (the generation's full-text step) feeds the analyzed chunks to the
SQL full-text table and the index in one pass, in a temporary folder, and uploads the index files under ``<vector prefix>/fulltext/``, beside the FAISS files of the same
generation, then a manifest naming every file with its size and sha256 (written last, so a
manifest never names a missing file). Retention deletes the whole prefix.

Replicas: `fetch` downloads the files once into a local cache folder, checks every sha256 and
renames the folder into place, so a cached folder is always complete; Tantivy memory-maps it,
and every process on the machine shares the page cache. `prune_cache` removes old folders.
A generation without a manifest (built before this existed) is searched through its SQL table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from research_pipeline.lib.core.util import sha256_file
from research_pipeline.lib.release import registry
from research_pipeline.lib.search import fts_tantivy

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = 1
#: Local cache folders kept besides the ones this process has open.
CACHE_KEEP = 3


class FulltextArtifactError(RuntimeError):
    """A published full-text index is missing, partial or does not match its manifest."""


def prefix(gen_id: str) -> str:
    """Object-store prefix of generation `gen_id`'s full-text index."""
    return f"{registry.vector_prefix(gen_id)}/fulltext"


def manifest_key(gen_id: str) -> str:
    """Key of the manifest of generation `gen_id`'s full-text index."""
    return f"{prefix(gen_id)}/{MANIFEST_NAME}"


def publish(object_store: Any, key_prefix: str, folder: Path, info: dict[str, Any]) -> str:
    """Upload the index `folder` under `key_prefix` and write its manifest last; returns the manifest key."""
    key_prefix = key_prefix.strip("/")
    files = {}
    # Dot files are Tantivy's lock and bookkeeping files: a reader needs neither.
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        key = f"{key_prefix}/{path.name}"
        size = path.stat().st_size
        object_store.put_file(key, path)
        if object_store.size(key) != size:
            raise FulltextArtifactError(f"{key} has {object_store.size(key)} bytes in {object_store.url}, wrote {size}")
        files[path.name] = {"key": key, "sha256": sha256_file(path), "bytes": size}
    manifest = {"format": FORMAT, "engine": fts_tantivy.ENGINE, "files": files, "info": info}
    key = f"{key_prefix}/{MANIFEST_NAME}"
    object_store.put_bytes(key, json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8"))
    return key


def publish_generation(engine: Engine, object_store: Any, gen_id: str) -> str:
    """Build the full-text index of the current chunks and publish it for generation `gen_id`."""
    with tempfile.TemporaryDirectory(prefix="rp-fulltext-build-") as tmp:
        folder = Path(tmp) / "index"
        info = fts_tantivy.build_index(engine, folder)
        key = publish(object_store, prefix(gen_id), folder, info)
    logger.info("generation %s: full-text index of %d rows -> %s", gen_id, info["rows"], key)
    return key


def build_fts_and_publish(engine: Engine, object_store: Any, gen_id: str, table: str) -> tuple[int, str]:
    """Build generation `gen_id`'s SQL full-text table `table` and its Tantivy index in one pass
    over the analyzed chunks (the same rows and terms in both), then publish the index.

    Returns (rows, manifest key). The SQL table keeps the row counts the gates read and answers
    where no index is published (older generations, query-time field weights).
    """
    from research_pipeline.lib.search import fts

    with tempfile.TemporaryDirectory(prefix="rp-fulltext-build-") as tmp:
        folder = Path(tmp) / "index"
        builder = fts_tantivy.IndexBuilder(folder)
        try:
            n_rows = int(fts.build_fts(engine, table, sink=builder.add))
        except BaseException:
            builder.abort()
            raise
        info = builder.finish()
        if info["rows"] != n_rows:
            raise FulltextArtifactError(f"the full-text table {table} has {n_rows} rows, its Tantivy index {info['rows']}")
        key = publish(object_store, prefix(gen_id), folder, info)
    logger.info("generation %s: full-text index of %d rows -> %s", gen_id, n_rows, key)
    return n_rows, key


def read_manifest(object_store: Any, key: str) -> tuple[dict[str, Any], bytes]:
    """The manifest at `key` and its bytes; FulltextArtifactError when it is missing."""
    try:
        data = object_store.get_bytes(key)
    except KeyError:
        raise FulltextArtifactError(f"full-text manifest {key!r} not found in {object_store.url}") from None
    return json.loads(data), data


def cache_name(object_store: Any, key: str, manifest_bytes: bytes) -> str:
    """The local folder name of one published index: changes whenever its manifest does."""
    digest = hashlib.sha256(f"{object_store.url}\n{key}\n".encode() + manifest_bytes).hexdigest()
    return digest[:32]


def fetch(object_store: Any, key: str, cache_dir: Path | str) -> Path:
    """A complete local copy of the index whose manifest is `key` (downloaded once, verified)."""
    cache_dir = Path(cache_dir)
    manifest, raw = read_manifest(object_store, key)
    dest = cache_dir / cache_name(object_store, key, raw)
    if dest.is_dir():
        os.utime(dest)  # most recently used: pruned last
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=cache_dir))
    try:
        for name, entry in manifest["files"].items():
            target = tmp / name
            try:
                object_store.get_file(entry["key"], target)
            except KeyError:
                raise FulltextArtifactError(
                    f"{entry['key']} named by {key} is missing from {object_store.url}: rebuild the generation"
                ) from None
            if sha256_file(target) != entry["sha256"]:
                raise FulltextArtifactError(
                    f"{entry['key']} does not match the sha256 in {key} (corrupt or partial upload): "
                    "rebuild the generation or roll back"
                )
        try:
            os.rename(tmp, dest)
        except OSError:  # another process put the same folder in place first
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("full-text index %s fetched into %s (%.1fs)", key, dest, time.perf_counter() - started)
    return dest


def prune_cache(cache_dir: Path | str, in_use: set[Path], keep: int = CACHE_KEEP) -> list[Path]:
    """Delete cached index folders beyond the newest `keep`, except those `in_use`; returns them.

    A process that still has a deleted folder's files mapped keeps reading them (POSIX unlink).
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    folders = sorted(
        (p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    removed = []
    for path in folders[keep:]:
        if path.resolve() not in {p.resolve() for p in in_use}:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
