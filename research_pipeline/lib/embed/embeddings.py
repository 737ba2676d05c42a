"""Batch embeddings of chunks, cached by (content_hash, model_id).

The embeddings table is a cache keyed by what was embedded (the chunk text's sha256) and by
what embedded it (`Embedder.model_id`): an unchanged chunk is never embedded twice, the same
text in two documents is embedded once, and a new model gets its own key space. Work is
committed batch by batch, so a crash loses at most the batch in flight and a re-run resumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util

log = logging.getLogger(__name__)

#: Embeddings are stored as little-endian float32 so bytes are portable across machines.
_DTYPE = np.dtype("<f4")


def vector_to_bytes(v: np.ndarray) -> bytes:
    """The stored form of one vector: little-endian float32 bytes."""
    return np.ascontiguousarray(v, dtype=_DTYPE).tobytes()


def bytes_to_vector(b: bytes, dim: int) -> np.ndarray:
    """A float32 vector of length `dim` from its stored bytes (ValueError if the size differs)."""
    if len(b) != dim * _DTYPE.itemsize:
        raise ValueError(
            f"stored embedding has {len(b)} bytes, expected {dim * _DTYPE.itemsize} for dim={dim}; "
            "the row was written by another model: re-run embed_missing for this model_id"
        )
    return np.frombuffer(b, dtype=_DTYPE, count=dim).astype(np.float32)


def _no_vector(model_id: str) -> sa.ColumnElement[bool]:
    c, e = store.chunks, store.embeddings
    return ~sa.exists().where(e.c.content_hash == c.c.content_hash, e.c.model_id == model_id)


def _missing(engine: Engine, model_id: str, shard: str | None) -> list[tuple[str, int]]:
    """(content_hash, text length) of every distinct chunk text with no embedding for model_id."""
    c = store.chunks
    query = (
        sa.select(c.c.content_hash, sa.func.max(sa.func.length(c.c.text)))
        .where(_no_vector(model_id))
        .group_by(c.c.content_hash)
    )
    if shard is not None:
        query = query.where(c.c.shard == shard)
    with engine.connect() as conn:
        return [(h, int(n)) for h, n in conn.execute(query)]


def backlog(engine: Engine, model_id: str | None) -> dict[str, int]:
    """Distinct chunk texts not yet embedded for `model_id`, per document shard ('0'..'f', all 16).

    The backfill's progress metric: the sum is what a full backfill still has to embed, and a
    shard at 0 is done. A text that occurs in two shards counts in both (each shard's run would
    find it missing until one of them embeds it). `model_id=None` (no run has recorded which id
    the configured model embeds under) counts every distinct text.
    """
    c = store.chunks
    query = sa.select(c.c.shard, sa.func.count(sa.distinct(c.c.content_hash))).group_by(c.c.shard)
    if model_id is not None:
        query = query.where(_no_vector(model_id))
    out = dict.fromkeys(store.SHARDS, 0)
    with engine.connect() as conn:
        out.update({shard: int(n) for shard, n in conn.execute(query)})
    return out


def embed_missing(
    engine: Engine,
    embedder: Any,
    shard: str | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Embed every chunk text that has no vector for `embedder.model_id`; returns stats.

    `shard` restricts the work to chunks whose document shard (chunks.shard) equals it. The
    work list is sorted by text length across all of it, so each model batch holds texts of
    similar length (little padding); each batch is committed on its own with insert-or-ignore,
    so concurrent runs on overlapping shards and re-runs after a crash are safe.
    Stats: embedded (vectors written now), cached (chunk texts of the scope that already had a
    vector), backlog (texts of the scope still without a vector when the run ended: 0 unless
    chunks arrived meanwhile), seconds, chunks_per_s, model_id, and numeric_path (which forward
    pass ran, e.g. ``cpu/bf16-autocast``; ``unknown`` for an embedder that does not say).
    Progress goes to this module's logger at INFO, once at the start and once per committed
    batch, each record with structured fields (`extra`: model_id, shard, done, total, and
    chunks_per_s per batch) for handlers that want numbers rather than the message.

    Scaling out: each process embeds the shards it is given, so a backfill of the 16 shards
    spreads over as many processes (pods) as the run queue allows; inside a process the model
    uses every core the process may run on (`Embedder(threads=None)`).
    """
    if shard is not None and shard not in store.SHARDS:
        raise ValueError(f"shard must be one of {''.join(store.SHARDS)} (a hex digit), got {shard!r}")
    started = time.perf_counter()
    c = store.chunks
    model_id = embedder.model_id
    scope = sa.select(sa.func.count(sa.distinct(c.c.content_hash)))
    if shard is not None:
        scope = scope.where(c.c.shard == shard)
    with engine.connect() as conn:
        in_scope = int(conn.execute(scope).scalar_one())
    todo = _missing(engine, model_id, shard)
    # Longest first: the costliest batch runs (and fails on memory, if it must) right away.
    todo.sort(key=lambda t: (-t[1], t[0]))
    total = len(todo)
    path = getattr(embedder, "numeric_path", "unknown")
    fields = {"model_id": model_id, "shard": shard, "numeric_path": path, "total": total}
    log.info(
        "embedding %d chunk texts with %s on %s (%d cached)", total, model_id, path, in_scope - total,
        extra={**fields, "done": 0, "cached": in_scope - total},
    )
    done = 0
    for i in range(0, total, batch_size):
        hashes = [h for h, _ in todo[i : i + batch_size]]
        with engine.connect() as conn:
            texts = dict(conn.execute(sa.select(c.c.content_hash, c.c.text).where(c.c.content_hash.in_(hashes))).all())
        batch = [h for h in hashes if h in texts]  # a chunk deleted meanwhile is simply skipped
        vectors = embedder.encode([texts[h] for h in batch], batch_size=batch_size)
        now = util.utcnow()
        rows = [
            {
                "content_hash": h,
                "model_id": model_id,
                "shard": store.shard_of(h),
                "dim": int(v.shape[0]),
                "vector": vector_to_bytes(v),
                "created_at": now,
            }
            for h, v in zip(batch, vectors, strict=True)
        ]
        with engine.begin() as conn:
            store.upsert(conn, store.embeddings, rows, ["content_hash", "model_id"], update=())
        done += len(batch)
        elapsed = time.perf_counter() - started
        rate = done / max(elapsed, 1e-9)
        log.info(
            "embedded %d/%d chunk texts, %.1f chunks/s", done, total, rate,
            extra={**fields, "done": done, "chunks_per_s": round(rate, 2)},
        )
    seconds = time.perf_counter() - started
    remaining = len(_missing(engine, model_id, shard))
    return {
        "embedded": done,
        "cached": in_scope - total,
        "backlog": remaining,
        "seconds": round(seconds, 3),
        "chunks_per_s": round(done / seconds, 2) if done and seconds > 0 else 0.0,
        "model_id": model_id,
        "numeric_path": path,
    }


def load_embeddings(engine: Engine, model_id: str, content_hashes: Sequence[str]) -> np.ndarray:
    """The stored vectors of `content_hashes` for `model_id`, one row each, in the given order.

    Raises KeyError naming the first hash that has no vector for this model.
    """
    e = store.embeddings
    hashes = list(content_hashes)
    found: dict[str, tuple[bytes, int]] = {}
    unique = list(dict.fromkeys(hashes))
    step = 5000  # bounded IN lists keep every backend's parameter limit happy
    with engine.connect() as conn:
        for i in range(0, len(unique), step):
            part = unique[i : i + step]
            for h, vec, dim in conn.execute(
                sa.select(e.c.content_hash, e.c.vector, e.c.dim).where(
                    e.c.model_id == model_id, e.c.content_hash.in_(part)
                )
            ):
                found[h] = (bytes(vec), int(dim))
    if not hashes:
        return np.zeros((0, 0), dtype=np.float32)
    for h in hashes:
        if h not in found:
            raise KeyError(f"no embedding for content_hash {h} with model {model_id!r}; run embed_missing first")
    dim = found[hashes[0]][1]
    out = np.empty((len(hashes), dim), dtype=np.float32)
    for row, h in enumerate(hashes):
        out[row] = bytes_to_vector(found[h][0], dim)
    return out
