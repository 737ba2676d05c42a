"""Publishing a gated candidate generation, rolling back, and retiring old generations.

`publish` flips the `live` pointer in one transaction (only for a candidate whose blocking
release gates passed) and `rollback` flips it back. Generations are immutable once built, so a
Searcher opened on one keeps working while another is published: retention never drops the
live generation or the one it replaced, and keeps the newest `keep` (at least `MIN_KEEP`)
published.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store as db
from research_pipeline.lib.core import util
from research_pipeline.lib.release import registry, searchers
from research_pipeline.lib.release.registry import G, LIVE, P, GenerationError
from research_pipeline.lib.release.registry import GenerationStatus as S

logger = logging.getLogger(__name__)

#: Fewer than this many retained generations would let retention drop the generation that an
#: in-flight search (opened just before a publish) is still reading.
MIN_KEEP = 2


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: the generation now live, the one it replaced, and what retention retired."""

    gen_id: str
    previous_gen_id: str | None
    retired: list[str] = field(default_factory=list)
    changed: bool = True


def _refuse_unpublishable(gen: Mapping[str, Any]) -> None:
    """Raise GenerationError unless `gen` is a candidate that passed every required and blocking gate."""
    gen_id = gen["gen_id"]
    if gen["status"] == S.REJECTED:
        _, failed = registry.gate_status(gen)
        reasons = "; ".join(f"{n}: {gen['checks'][n]['description']}" for n in failed) or "see its checks"
        raise GenerationError(
            f"cannot publish index generation {gen_id}: it was rejected by its release gates ({reasons}); "
            "the live generation is unchanged. Fix the cause, then re-run the failed gates (vector_index -> "
            "Checks in the UI) or run reindex_job"
        )
    if gen["status"] == S.RETIRED and gen["published_at"] is None:
        raise GenerationError(
            f"cannot publish index generation {gen_id}: it is older than the live generation, which "
            "superseded it (its files are gone); run reindex_job for a fresh candidate"
        )
    if gen["status"] != S.CANDIDATE:
        hint = (
            "use `research-pipeline index rollback " + gen_id + "` to make a retained generation live again"
            if gen["status"] == S.PUBLISHED
            else "run reindex_job to build a new candidate"
        )
        raise GenerationError(f"cannot publish index generation {gen_id}: it is {gen['status']}, not a candidate; {hint}")
    missing, failed = registry.gate_status(gen)
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


def publish(engine: Engine, gen_id: str, keep: int = 3, store: Any = None) -> PublishResult:
    """Make candidate `gen_id` live in one transaction, then retire generations beyond `keep`.

    Refuses a generation that is not a candidate, has not passed every blocking gate, or is
    older than the live one. Publishing the live generation again is a no-op. `store` (the
    object store) is needed to delete the index files of retired generations.
    """
    with engine.begin() as conn:
        ptr = registry.pointer(conn, lock=True)
        if ptr is not None and ptr.gen_id == gen_id:
            return PublishResult(gen_id=gen_id, previous_gen_id=ptr.previous_gen_id, retired=[], changed=False)
        row = conn.execute(sa.select(G).where(G.c.gen_id == gen_id)).first()
        if row is None:
            raise GenerationError(f"cannot publish unknown index generation {gen_id!r}")
        _refuse_unpublishable(registry.record(row))
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
        conn.execute(sa.update(G).where(G.c.gen_id == gen_id).values(status=S.PUBLISHED.value, published_at=now))
    logger.info("published index generation %s (previous %s)", gen_id, previous)
    retired = apply_retention(engine, store, keep=keep)
    return PublishResult(gen_id=gen_id, previous_gen_id=previous, retired=retired, changed=True)


def rollback(engine: Engine, gen_id: str | None = None) -> str:
    """Point `live` at a retained earlier generation (the previous live one by default); returns its id."""
    with engine.begin() as conn:
        ptr = registry.pointer(conn, lock=True)
        if ptr is None:
            raise GenerationError("nothing to roll back: no generation has been published yet")
        retained = conn.execute(
            sa.select(G.c.gen_id, G.c.status)
            .where(G.c.status == S.PUBLISHED.value, G.c.gen_id != ptr.gen_id)
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
    logger.info("rolled back the live index generation from %s to %s", ptr.gen_id, target)
    return target


def drop_generation_files(engine: Engine, object_store: Any, gen: Mapping[str, Any]) -> None:
    """Drop the full-text table and delete the vector files of one generation (idempotent)."""
    from research_pipeline.lib.search import fts

    table = gen.get("fts_table") or registry.fts_table_name(gen["gen_id"])
    fts.drop_fts(engine, table)
    if object_store is not None:
        for key in list(object_store.list(registry.vector_prefix(gen["gen_id"]) + "/")):
            object_store.delete(key)
    searchers.forget_vectors(gen.get("vector_key"))


def apply_retention(engine: Engine, object_store: Any, keep: int = 3) -> list[str]:
    """Retire published generations beyond the newest `keep` (never live or previous); returns retired ids.

    Rejected and superseded candidates older than the live generation lose their files too
    (their rows and gate results stay for the record).
    """
    keep = max(MIN_KEEP, int(keep))
    with engine.connect() as conn:
        ptr = registry.pointer(conn)
        if ptr is None:
            return []
        live_created = conn.execute(sa.select(G.c.created_at).where(G.c.gen_id == ptr.gen_id)).scalar()
        published = conn.execute(
            sa.select(G).where(G.c.status == S.PUBLISHED.value).order_by(G.c.published_at.desc(), G.c.gen_id.desc())
        ).all()
        stale = conn.execute(
            sa.select(G).where(
                G.c.status.in_((S.REJECTED.value, S.CANDIDATE.value)), G.c.created_at < live_created, G.c.fts_table != ""
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
                sa.update(G).where(G.c.gen_id == r.gen_id, G.c.status == S.PUBLISHED.value).values(status=S.RETIRED.value)
            )
        drop_generation_files(engine, object_store, registry.record(r))
        retired.append(r.gen_id)
    for r in stale:
        with engine.begin() as conn:
            conn.execute(
                sa.update(G)
                .where(G.c.gen_id == r.gen_id)
                .values(status=S.RETIRED.value if r.status == S.CANDIDATE else r.status, fts_table="")
            )
        drop_generation_files(engine, object_store, registry.record(r))
    if retired:
        logger.info("retired index generations %s (files dropped)", ", ".join(retired))
    return retired
