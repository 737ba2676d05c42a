"""Building a candidate index generation beside the live one: its full-text table and vector index.

The two halves are built by separate steps (they may run in parallel) from the chunks current
at build time; `registry.finish_part` makes the generation a candidate once both are recorded.
The vector half embeds nothing: it reads the vectors that `lib/embed/embeddings.embed_missing`
stored (in Dagster: the `chunk_embeddings` asset, the only producer of vectors) and refuses to
build, naming the shards, while a chunk has none. Progress goes to this module's logger.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import diskspace
from research_pipeline.lib.core import store as db
from research_pipeline.lib.release import registry
from research_pipeline.lib.release.registry import GenerationError, GenerationStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FtsPart:
    """The full-text half of a generation, as built."""

    gen_id: str
    fts_table: str
    n_fts_rows: int
    seconds: float
    status: GenerationStatus


class MissingVectorsError(GenerationError):
    """Chunks of the generation-to-be have no stored vector for the model: embed them first."""

    def __init__(self, model_id: str, missing: dict[str, int]):
        self.model_id = model_id
        self.missing = missing
        shards = ", ".join(f"{s} ({n})" for s, n in sorted(missing.items()))
        super().__init__(
            f"{sum(missing.values())} chunk texts have no {model_id} vector, in shards {shards}: materialize "
            "those chunk_embeddings partitions first (reindex_job covers all 16 shards in one run; without "
            "Dagster: research_pipeline.lib.embed.embeddings.embed_missing)"
        )


class OutOfSpaceError(GenerationError):
    """A disk filled while a generation was built: its partial files were removed, the live
    generation is untouched; the message names the volumes and their free space."""


def _local_folders(engine: Engine, object_store: Any) -> list[tuple[str, Any]]:
    """The folders a build writes to on this machine: object store, scratch, SQLite database."""
    db_folder = None
    if engine.url.get_backend_name() == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        db_folder = Path(engine.url.database).parent
    return [("object store", getattr(object_store, "root", None)), ("scratch (TMPDIR)", tempfile.gettempdir()),
            ("database", db_folder)]  # fmt: skip


@contextlib.contextmanager
def out_of_space_guard(engine: Engine, object_store: Any, gen_id: str, half: str, cleanup: Callable[[], None]) -> Iterator[None]:
    """Turn a full disk inside the block into OutOfSpaceError, after `cleanup` removed what the
    block had written (so the space is given back and nothing partial stays behind)."""
    try:
        yield
    except Exception as exc:
        if not diskspace.is_out_of_space(exc):
            raise
        try:
            cleanup()
        except Exception:  # noqa: BLE001 - the disk may still be full; the message below says what to do
            logger.exception("generation %s: could not remove the partial %s", gen_id, half)
        live = (db.live_generation(engine) or {}).get("gen_id")
        raise OutOfSpaceError(
            f"out of disk space while building the {half} of index generation {gen_id} ({str(exc).splitlines()[0]}). "
            f"{diskspace.describe_free(_local_folders(engine, object_store))}. The partial files of {gen_id} "
            f"were removed; the live generation {live or '(none yet)'} is untouched and still serves searches. "
            "Free space on the full volume (or move RP_HOME, RP_OBJECT_STORE_URL or TMPDIR to a larger one), "
            "then re-run reindex_job (or re-execute this run from failure)"
        ) from exc


def _delete_prefix(object_store: Any, key_prefix: str, keep: Callable[[str], bool] = lambda key: False) -> None:
    if object_store is not None:
        for key in list(object_store.list(key_prefix.rstrip("/") + "/")):
            if not keep(key):
                object_store.delete(key)


@dataclass(frozen=True)
class VectorPart:
    """The vector half of a generation, as built."""

    gen_id: str
    vector_key: str
    n_vectors: int
    n_chunks: int
    n_documents: int
    build_params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    status: GenerationStatus = GenerationStatus.BUILDING


def build_fts_part(engine: Engine, gen_id: str, model_id: str | None = None, object_store: Any = None) -> FtsPart:
    """Build the full-text table of generation `gen_id` from the current chunks; with
    `object_store`, its Tantivy index in the same pass, published beside the vector files
    (release/fulltext.py: what replicas search)."""
    from research_pipeline.lib.release import fulltext
    from research_pipeline.lib.search import fts

    registry.start_generation(engine, gen_id, model_id)
    table = registry.fts_table_name(gen_id)
    started = time.perf_counter()

    def cleanup() -> None:
        _delete_prefix(object_store, fulltext.prefix(gen_id))
        fts.drop_fts(engine, table)

    with out_of_space_guard(engine, object_store, gen_id, "full-text index", cleanup):
        if object_store is None:
            n_rows = int(fts.build_fts(engine, table))
        else:
            n_rows, _ = fulltext.build_fts_and_publish(engine, object_store, gen_id, table)
    seconds = time.perf_counter() - started
    logger.info("generation %s: full-text table %s has %d rows (%.1fs)", gen_id, table, n_rows, seconds)
    status = registry.finish_part(engine, gen_id, {"fts_table": table, "n_fts_rows": n_rows})
    return FtsPart(gen_id=gen_id, fts_table=table, n_fts_rows=n_rows, seconds=seconds, status=status)


def generation_chunks(engine: Engine) -> tuple[list[str], list[str], int]:
    """The chunks a new generation's vector index holds: (chunk ids, their content hashes, number of documents).

    Every chunk of a live document (not retired: see lib/ingest/lifecycle), in chunk_id order
    (the rows the full-text build numbers, in the same order).
    """
    c, d = db.chunks, db.documents
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(c.c.chunk_id, c.c.content_hash, c.c.doc_id)
            .join(d, d.c.doc_id == c.c.doc_id)
            .where(d.c.retired_at.is_(None))
            .order_by(c.c.chunk_id)
        ).all()
    return [r.chunk_id for r in rows], [r.content_hash for r in rows], len({r.doc_id for r in rows})


def missing_vectors(engine: Engine, model_id: str) -> dict[str, int]:
    """Distinct chunk texts a new generation would hold (see `generation_chunks`) without a stored
    `model_id` vector, by document shard; empty when every one has its vector."""
    c, d, e = db.chunks, db.documents, db.embeddings
    no_vector = ~sa.exists().where(e.c.content_hash == c.c.content_hash, e.c.model_id == model_id)
    query = (
        sa.select(c.c.shard, sa.func.count(sa.distinct(c.c.content_hash)))
        .join(d, d.c.doc_id == c.c.doc_id)
        .where(d.c.retired_at.is_(None), no_vector)
        .group_by(c.c.shard)
    )
    with engine.connect() as conn:
        return {shard: int(n) for shard, n in conn.execute(query) if n}


def build_vector_part(engine: Engine, object_store: Any, embedder: Any, gen_id: str) -> VectorPart:
    """Build and write the FAISS index of generation `gen_id` from the stored vectors of its chunks.

    Embeds nothing: raises MissingVectorsError (before recording anything) if a chunk of a live
    document has no vector for `embedder.model_id`. The embedder is only asked for its model id
    and dimension.
    """
    import numpy as np

    from research_pipeline.lib.embed import embeddings, vectors

    missing = missing_vectors(engine, embedder.model_id)
    if missing:
        raise MissingVectorsError(embedder.model_id, missing)
    registry.start_generation(engine, gen_id, embedder.model_id)
    started = time.perf_counter()
    chunk_ids, hashes, n_documents = generation_chunks(engine)
    # Chunks that share a text share one vector; the index still holds one row per chunk so a
    # hit maps straight back to its paper.
    unique = list(dict.fromkeys(hashes))
    if unique:
        table = embeddings.load_embeddings(engine, embedder.model_id, unique)
        row_of = {h: i for i, h in enumerate(unique)}
        matrix = table[[row_of[h] for h in hashes]]
    else:
        matrix = np.zeros((0, embedder.dim), dtype="float32")
    index, params = vectors.build_vector_index(matrix)
    prefix = registry.vector_prefix(gen_id)

    def cleanup() -> None:  # the vector files only: the full-text half may be built beside them
        _delete_prefix(object_store, prefix, keep=lambda key: key.startswith(f"{prefix}/fulltext/"))

    with out_of_space_guard(engine, object_store, gen_id, "vector index", cleanup):
        key = vectors.write_vector_index(
            object_store,
            prefix,
            index,
            chunk_ids,
            {"gen_id": gen_id, "model": embedder.model_id, "n_documents": n_documents, "build_params": params},
        )
    seconds = time.perf_counter() - started
    manifest = {"build_params": params, "seconds": round(seconds, 3)}
    logger.info(
        "generation %s: %d vectors of %d documents -> %s (%.1fs)", gen_id, len(chunk_ids), n_documents, key, seconds
    )
    values = {
        "vector_key": key,
        "model_id": embedder.model_id,
        "n_vectors": int(index.ntotal),
        "n_chunks": len(chunk_ids),
        "n_documents": n_documents,
        "manifest": db.dumps(manifest),
    }
    status = registry.finish_part(engine, gen_id, values)
    return VectorPart(
        gen_id=gen_id,
        vector_key=key,
        n_vectors=int(index.ntotal),
        n_chunks=len(chunk_ids),
        n_documents=n_documents,
        build_params=params,
        seconds=seconds,
        status=status,
    )


def build_generation(engine: Engine, object_store: Any, embedder: Any, gen_id: str | None = None) -> dict[str, Any]:
    """Embed what has no vector, then build a complete candidate generation (full-text table +
    vector index); returns its record.

    The whole reindex without Dagster (tests, benchmarks): the embedding is the same call the
    `chunk_embeddings` asset makes per shard, made here over every shard before the build.
    """
    from research_pipeline.lib.embed import embeddings

    embeddings.embed_missing(engine, embedder)
    gen_id = gen_id or registry.new_generation_id()
    build_fts_part(engine, gen_id, embedder.model_id, object_store)
    build_vector_part(engine, object_store, embedder, gen_id)
    return registry.get_generation(engine, gen_id)
