"""Index generations: build a candidate search index beside the live one, gate it, publish it.

A generation is a full-text table `fts_<gen_id>` plus a FAISS index under the object-store
prefix `indexes/<gen_id>/`, built from the chunks and embeddings current at build time and
recorded in `index_generations`. The `live` row of `index_pointer` names the generation that
searches use; `publish` flips it in one transaction (only for a candidate whose blocking
release gates passed) and `rollback` flips it back. Generations are immutable once built, so
a Searcher opened on one keeps working while another is published: retention never drops the
live generation or the one it replaced, and keeps the newest `keep` (at least 2) published.

Status of a generation: building -> candidate -> published (-> retired, its files dropped),
or candidate -> rejected when a blocking gate fails.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store as db
from research_pipeline.lib.core import util
from research_pipeline.lib.core.progress import emit

G = db.index_generations
P = db.index_pointer
LIVE = "live"

#: The blocking gates a candidate must have passed before `publish` accepts it.
REQUIRED_GATES: tuple[str, ...] = ("volume", "latency", "quality")

#: Fewer than this many retained generations would let retention drop the generation that an
#: in-flight search (opened just before a publish) is still reading.
MIN_KEEP = 2

Log = Callable[[str], Any] | None


class GenerationError(ValueError):
    """A generation operation that cannot proceed; the message says what to do instead."""


def new_generation_id(when: datetime | None = None, salt: str | None = None) -> str:
    """A sortable generation id `YYYYmmddTHHMMSS-xxxxxx` (UTC time; suffix from `salt` or random).

    Pass the run's start time and run id as `salt` to give every step of one run the same id.
    """
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    suffix = util.sha256_hex(salt)[:6] if salt else secrets.token_hex(3)
    return f"{when:%Y%m%dT%H%M%S}-{suffix}"


def fts_table_name(gen_id: str) -> str:
    return "fts_" + gen_id.lower().replace("-", "_")


def vector_prefix(gen_id: str) -> str:
    return f"indexes/{gen_id}"


def _row(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    for key in ("manifest", "checks"):
        if out.get(key):
            out[key] = json.loads(out[key])
    return out


def get_generation(engine: Engine, gen_id: str) -> dict[str, Any]:
    """The `index_generations` row of `gen_id` (manifest and checks parsed); KeyError if unknown."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(G).where(G.c.gen_id == gen_id)).first()
    if row is None:
        raise KeyError(f"unknown index generation {gen_id!r}: see `research-pipeline index list`")
    return _row(row)


def _pointer(conn: sa.Connection, lock: bool = False) -> Any:
    stmt = sa.select(P).where(P.c.name == LIVE)
    if lock and conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def live_generation(engine: Engine) -> dict[str, Any] | None:
    """The generation searches use now (with `previous_gen_id`), or None before the first publish."""
    with engine.connect() as conn:
        ptr = _pointer(conn)
        if ptr is None:
            return None
        row = conn.execute(sa.select(G).where(G.c.gen_id == ptr.gen_id)).first()
    if row is None:
        return None
    out = _row(row)
    out["previous_gen_id"] = ptr.previous_gen_id
    out["live_since"] = ptr.updated_at
    return out


def list_generations(engine: Engine) -> list[dict[str, Any]]:
    """Every recorded generation, newest first, with a `live` flag."""
    with engine.connect() as conn:
        ptr = _pointer(conn)
        rows = conn.execute(sa.select(G).order_by(G.c.created_at.desc(), G.c.gen_id.desc())).all()
    live = ptr.gen_id if ptr is not None else None
    out = []
    for r in rows:
        d = _row(r)
        d["live"] = d["gen_id"] == live
        out.append(d)
    return out


def start_generation(engine: Engine, gen_id: str, model_id: str | None) -> dict[str, Any]:
    """Record `gen_id` as building (no-op if it exists); refuses a generation that is already final.

    `model_id` None (the full-text half, which needs no model) leaves it to the vector half.
    """
    with engine.begin() as conn:
        db.upsert(
            conn,
            G,
            [
                {
                    "gen_id": gen_id,
                    "status": "building",
                    "model_id": model_id or "",
                    "fts_table": "",
                    "vector_key": "",
                    "created_at": util.utcnow(),
                }
            ],
            ["gen_id"],
            update=(),
        )
    gen = get_generation(engine, gen_id)
    if gen["status"] not in ("building", "candidate"):
        raise GenerationError(
            f"index generation {gen_id} is already {gen['status']}; it is immutable. "
            "Start a new reindex run to build a new generation."
        )
    if model_id and gen["model_id"] and gen["model_id"] != model_id:
        raise GenerationError(
            f"index generation {gen_id} was started with model {gen['model_id']}, not {model_id}; "
            "start a new reindex run"
        )
    return gen


def _finish_part(conn: sa.Connection, gen_id: str, values: Mapping[str, Any]) -> None:
    conn.execute(
        sa.update(G)
        .where(G.c.gen_id == gen_id, G.c.status.in_(("building", "candidate")))
        .values(status="building", checks=None, **values)
    )


def _promote_if_complete(engine: Engine, gen_id: str) -> str:
    # One conditional UPDATE: the fts and vector parts may finish in parallel (two steps of one
    # run); whichever commits last sees both parts done and makes the generation a candidate.
    with engine.begin() as conn:
        conn.execute(
            sa.update(G)
            .where(G.c.gen_id == gen_id, G.c.status == "building", G.c.fts_table != "", G.c.vector_key != "")
            .values(status="candidate")
        )
    return get_generation(engine, gen_id)["status"]


def build_fts_part(engine: Engine, gen_id: str, model_id: str | None = None, log: Log = None) -> dict[str, Any]:
    """Build the full-text table of generation `gen_id` from the current chunks."""
    from research_pipeline.lib.search import fts

    start_generation(engine, gen_id, model_id)
    table = fts_table_name(gen_id)
    started = time.perf_counter()
    n_rows = fts.build_fts(engine, table)
    seconds = time.perf_counter() - started
    emit(log, f"generation {gen_id}: full-text table {table} has {n_rows} rows ({seconds:.1f}s)")
    with engine.begin() as conn:
        _finish_part(conn, gen_id, {"fts_table": table, "n_fts_rows": int(n_rows)})
    status = _promote_if_complete(engine, gen_id)
    return {"gen_id": gen_id, "fts_table": table, "n_fts_rows": int(n_rows), "seconds": seconds, "status": status}


def _current_chunks(engine: Engine) -> tuple[list[str], list[str], int]:
    c = db.chunks
    with engine.connect() as conn:
        rows = conn.execute(sa.select(c.c.chunk_id, c.c.content_hash, c.c.doc_id).order_by(c.c.chunk_id)).all()
    return [r.chunk_id for r in rows], [r.content_hash for r in rows], len({r.doc_id for r in rows})


def build_vector_part(
    engine: Engine,
    object_store: Any,
    embedder: Any,
    gen_id: str,
    batch_size: int = 64,
    log: Log = None,
) -> dict[str, Any]:
    """Embed any chunk without a vector, then build and write the FAISS index of generation `gen_id`."""
    from research_pipeline.lib.embed import embeddings, vectors

    start_generation(engine, gen_id, embedder.model_id)
    started = time.perf_counter()
    embed_stats = embeddings.embed_missing(engine, embedder, batch_size=batch_size, log=log)
    chunk_ids, hashes, n_documents = _current_chunks(engine)
    # Chunks that share a text share one vector; the index still holds one row per chunk so a
    # hit maps straight back to its paper.
    unique = list(dict.fromkeys(hashes))
    if unique:
        table = embeddings.load_embeddings(engine, embedder.model_id, unique)
        row_of = {h: i for i, h in enumerate(unique)}
        matrix = table[[row_of[h] for h in hashes]]
    else:
        import numpy as np

        matrix = np.zeros((0, embedder.dim), dtype="float32")
    index, params = vectors.build_vector_index(matrix)
    key = vectors.write_vector_index(
        object_store,
        vector_prefix(gen_id),
        index,
        chunk_ids,
        {"gen_id": gen_id, "model": embedder.model_id, "n_documents": n_documents, "build_params": params},
    )
    seconds = time.perf_counter() - started
    manifest = {"build_params": params, "embedded": int(embed_stats.get("embedded", 0)), "seconds": round(seconds, 3)}
    emit(log, f"generation {gen_id}: {len(chunk_ids)} vectors of {n_documents} documents -> {key} ({seconds:.1f}s)")
    with engine.begin() as conn:
        _finish_part(
            conn,
            gen_id,
            {
                "vector_key": key,
                "model_id": embedder.model_id,
                "n_vectors": int(index.ntotal),
                "n_chunks": len(chunk_ids),
                "n_documents": n_documents,
                "manifest": db.dumps(manifest),
            },
        )
    status = _promote_if_complete(engine, gen_id)
    return {
        "gen_id": gen_id,
        "vector_key": key,
        "n_vectors": int(index.ntotal),
        "n_chunks": len(chunk_ids),
        "n_documents": n_documents,
        "embedded": int(embed_stats.get("embedded", 0)),
        "cached": int(embed_stats.get("cached", 0)),
        "build_params": params,
        "seconds": seconds,
        "status": status,
    }


def build_generation(
    engine: Engine, object_store: Any, embedder: Any, gen_id: str | None = None, log: Log = None
) -> dict[str, Any]:
    """Build a complete candidate generation (full-text table + vector index); returns its row."""
    gen_id = gen_id or new_generation_id()
    build_fts_part(engine, gen_id, embedder.model_id, log=log)
    build_vector_part(engine, object_store, embedder, gen_id, log=log)
    return get_generation(engine, gen_id)


def record_gates(engine: Engine, gen_id: str, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Store gate results on the generation (merged with earlier ones) and reject it if a blocking gate failed.

    `results` maps gate name -> {"passed": bool, "blocking": bool, "metadata": {...}, "description": str}.
    Returns the updated generation row.
    """
    with engine.begin() as conn:
        stmt = sa.select(G.c.status, G.c.checks).where(G.c.gen_id == gen_id)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).first()
        if row is None:
            raise KeyError(f"unknown index generation {gen_id!r}")
        checks = json.loads(row.checks) if row.checks else {}
        for name, res in results.items():
            checks[name] = {
                "passed": bool(res["passed"]),
                "blocking": bool(res.get("blocking", True)),
                "metadata": dict(res.get("metadata") or {}),
                "description": str(res.get("description") or ""),
                "at": util.utcnow().isoformat(),
            }
        failed = any(c["blocking"] and not c["passed"] for c in checks.values())
        values: dict[str, Any] = {"checks": db.dumps(checks)}
        if failed and row.status == "candidate":
            values["status"] = "rejected"
        conn.execute(sa.update(G).where(G.c.gen_id == gen_id).values(**values))
    return get_generation(engine, gen_id)


def gate_status(gen: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(missing, failed) required/blocking gate names of a generation row."""
    checks = gen.get("checks") or {}
    missing = [g for g in REQUIRED_GATES if g not in checks]
    failed = sorted(n for n, c in checks.items() if c.get("blocking", True) and not c.get("passed"))
    return missing, failed


def publish(engine: Engine, gen_id: str, keep: int = 3, store: Any = None) -> dict[str, Any]:
    """Make candidate `gen_id` live in one transaction, then retire generations beyond `keep`.

    Refuses a generation that is not a candidate, has not passed every blocking gate, or is
    older than the live one. Publishing the live generation again is a no-op. `store` (the
    object store) is needed to delete the index files of retired generations.
    """
    object_store = store
    with engine.begin() as conn:
        ptr = _pointer(conn, lock=True)
        if ptr is not None and ptr.gen_id == gen_id:
            return {"gen_id": gen_id, "previous_gen_id": ptr.previous_gen_id, "retired": [], "changed": False}
        row = conn.execute(sa.select(G).where(G.c.gen_id == gen_id)).first()
        if row is None:
            raise GenerationError(f"cannot publish unknown index generation {gen_id!r}")
        gen = _row(row)
        if gen["status"] == "rejected":
            _, failed = gate_status(gen)
            reasons = "; ".join(f"{n}: {gen['checks'][n]['description']}" for n in failed) or "see its checks"
            raise GenerationError(
                f"cannot publish index generation {gen_id}: it was rejected by its release gates ({reasons}); "
                "the live generation is unchanged. Fix the cause and run reindex_job"
            )
        if gen["status"] == "retired" and gen["published_at"] is None:
            raise GenerationError(
                f"cannot publish index generation {gen_id}: it is older than the live generation, which "
                "superseded it (its files are gone); run reindex_job for a fresh candidate"
            )
        if gen["status"] != "candidate":
            hint = (
                "use `research-pipeline index rollback " + gen_id + "` to make a retained generation live again"
                if gen["status"] == "published"
                else "run reindex_job to build a new candidate"
            )
            raise GenerationError(f"cannot publish index generation {gen_id}: it is {gen['status']}, not a candidate; {hint}")
        missing, failed = gate_status(gen)
        if missing or failed:
            parts = []
            if missing:
                parts.append("missing gates: " + ", ".join(missing))
            for name in failed:
                parts.append(f"{name} failed: {gen['checks'][name]['description']}")
            why = "; ".join(parts)
            raise GenerationError(
                f"index generation {gen_id} has not passed its release gates ({why}); "
                "the live generation is unchanged. Fix the cause and run reindex_job, see docs/RELEASE_GATES.md"
            )
        if ptr is not None:
            live = conn.execute(sa.select(G.c.gen_id, G.c.created_at).where(G.c.gen_id == ptr.gen_id)).first()
            if live is not None and (live.created_at, live.gen_id) > (row.created_at, row.gen_id):
                raise GenerationError(
                    f"index generation {gen_id} is older than the live generation {live.gen_id}; "
                    "publishing it would serve staler data. Run reindex_job for a fresh candidate, "
                    "or roll back explicitly with `research-pipeline index rollback`"
                )
        now = util.utcnow()
        previous = ptr.gen_id if ptr is not None else None
        db.upsert(
            conn,
            P,
            [{"name": LIVE, "gen_id": gen_id, "previous_gen_id": previous, "updated_at": now}],
            ["name"],
        )
        conn.execute(sa.update(G).where(G.c.gen_id == gen_id).values(status="published", published_at=now))
    retired = apply_retention(engine, object_store, keep=keep)
    return {"gen_id": gen_id, "previous_gen_id": previous, "retired": retired, "changed": True}


def rollback(engine: Engine, gen_id: str | None = None) -> str:
    """Point `live` at a retained earlier generation (the previous live one by default); returns its id."""
    with engine.begin() as conn:
        ptr = _pointer(conn, lock=True)
        if ptr is None:
            raise GenerationError("nothing to roll back: no generation has been published yet")
        retained = conn.execute(
            sa.select(G.c.gen_id, G.c.status)
            .where(G.c.status == "published", G.c.gen_id != ptr.gen_id)
            .order_by(G.c.published_at.desc(), G.c.gen_id.desc())
        ).all()
        retained_ids = [r.gen_id for r in retained]
        if gen_id is None:
            if ptr.previous_gen_id in retained_ids:
                target = ptr.previous_gen_id
            elif retained_ids:
                target = retained_ids[0]
            else:
                raise GenerationError(
                    f"no earlier generation is retained to roll back to (live is {ptr.gen_id}); "
                    "raise RP_KEEP_GENERATIONS to keep more"
                )
        else:
            if gen_id == ptr.gen_id:
                return gen_id
            if gen_id not in retained_ids:
                row = conn.execute(sa.select(G.c.status).where(G.c.gen_id == gen_id)).first()
                state = "unknown" if row is None else row.status
                raise GenerationError(
                    f"cannot roll back to index generation {gen_id}: it is {state}; "
                    f"retained published generations: {', '.join(retained_ids) or 'none'}"
                )
            target = gen_id
        db.upsert(
            conn,
            P,
            [{"name": LIVE, "gen_id": target, "previous_gen_id": ptr.gen_id, "updated_at": util.utcnow()}],
            ["name"],
        )
    return target


def drop_generation_files(engine: Engine, object_store: Any, gen: Mapping[str, Any]) -> None:
    """Drop the full-text table and delete the vector files of one generation (idempotent)."""
    from research_pipeline.lib.search import fts

    table = gen.get("fts_table") or fts_table_name(gen["gen_id"])
    fts.drop_fts(engine, table)
    if object_store is not None:
        for key in list(object_store.list(vector_prefix(gen["gen_id"]) + "/")):
            object_store.delete(key)
    _forget_vectors(gen.get("vector_key"))


def apply_retention(engine: Engine, object_store: Any, keep: int = 3) -> list[str]:
    """Retire published generations beyond the newest `keep` (never live or previous); returns retired ids.

    Rejected and superseded candidates older than the live generation lose their files too
    (their rows and gate results stay for the record).
    """
    keep = max(MIN_KEEP, int(keep))
    with engine.connect() as conn:
        ptr = _pointer(conn)
        if ptr is None:
            return []
        live_created = conn.execute(sa.select(G.c.created_at).where(G.c.gen_id == ptr.gen_id)).scalar()
        published = conn.execute(
            sa.select(G).where(G.c.status == "published").order_by(G.c.published_at.desc(), G.c.gen_id.desc())
        ).all()
        stale = conn.execute(
            sa.select(G).where(
                G.c.status.in_(("rejected", "candidate")), G.c.created_at < live_created, G.c.fts_table != ""
            )
        ).all()
    protected = {ptr.gen_id, ptr.previous_gen_id}
    kept = [r.gen_id for r in published if r.gen_id in protected]
    for r in published:
        if len(kept) >= keep:
            break
        if r.gen_id not in kept:
            kept.append(r.gen_id)
    retired: list[str] = []
    for r in published:
        if r.gen_id in kept:
            continue
        # Mark first: a retired generation is never opened again, so its files can go.
        with engine.begin() as conn:
            conn.execute(
                sa.update(G).where(G.c.gen_id == r.gen_id, G.c.status == "published").values(status="retired")
            )
        drop_generation_files(engine, object_store, _row(r))
        retired.append(r.gen_id)
    for r in stale:
        with engine.begin() as conn:
            conn.execute(
                sa.update(G)
                .where(G.c.gen_id == r.gen_id)
                .values(status="retired" if r.status == "candidate" else r.status, fts_table="")
            )
        drop_generation_files(engine, object_store, _row(r))
    return retired


# Loaded vector indexes by (store url, manifest key): a generation's files never change, so a
# process loads each one once however many Searchers it opens.
_VECTORS: OrderedDict[tuple[str, str], Any] = OrderedDict()
_VECTORS_LOCK = threading.Lock()
_VECTORS_MAX = 4


def _forget_vectors(key: str | None) -> None:
    with _VECTORS_LOCK:
        for k in [k for k in _VECTORS if k[1] == key]:
            del _VECTORS[k]


def load_vectors(object_store: Any, key: str) -> Any:
    """The loaded VectorIndex of a manifest key (cached per process)."""
    from research_pipeline.lib.embed import vectors

    ident = (getattr(object_store, "url", str(id(object_store))), key)
    with _VECTORS_LOCK:
        if ident in _VECTORS:
            _VECTORS.move_to_end(ident)
            return _VECTORS[ident]
    index = vectors.load_vector_index(object_store, key)
    with _VECTORS_LOCK:
        _VECTORS[ident] = index
        while len(_VECTORS) > _VECTORS_MAX:
            _VECTORS.popitem(last=False)
    return index


def open_searcher(engine: Engine, object_store: Any, embedder: Any, gen_id: str | None = None, **tuning: Any) -> Any:
    """A Searcher over generation `gen_id` (the live one by default); it has `.gen_id` and `.generation`.

    The Searcher holds its generation's table name and loaded vectors, so a search that
    started on it finishes on it even if another generation is published meanwhile.
    """
    from research_pipeline.lib.search.searcher import Searcher

    if gen_id is None:
        gen = live_generation(engine)
        if gen is None:
            raise GenerationError(
                "no index generation is live yet: run reindex_job (or `research-pipeline demo`) to build and publish one"
            )
    else:
        gen = get_generation(engine, gen_id)
    if gen["status"] not in ("published", "candidate") or not gen["fts_table"] or not gen["vector_key"]:
        raise GenerationError(
            f"index generation {gen['gen_id']} is {gen['status']} and cannot be searched; "
            "use a published or candidate generation (`research-pipeline index list`)"
        )
    if gen["model_id"] != embedder.model_id:
        raise GenerationError(
            f"index generation {gen['gen_id']} was built with {gen['model_id']} but the embedder is "
            f"{embedder.model_id}; set RP_MODEL to match or run reindex_job"
        )
    searcher = Searcher(engine, gen["fts_table"], load_vectors(object_store, gen["vector_key"]), embedder, **tuning)
    searcher.gen_id = gen["gen_id"]
    searcher.generation = gen
    return searcher
