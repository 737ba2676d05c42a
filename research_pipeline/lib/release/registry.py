"""The registry of index generations: their ids, statuses and records in `index_generations`.

A generation is a full-text table `fts_<gen_id>` plus a FAISS index under the object-store
prefix `indexes/<gen_id>/`, recorded in `index_generations`; the `live` row of `index_pointer`
names the generation that searches use (`store.live_generation`). Its status moves
building -> candidate -> published (-> retired, its files dropped), or candidate -> rejected
when a blocking release gate fails, and rejected -> candidate again when a re-run of the gates
(e.g. a transient latency failure re-run from the UI) finds every blocking gate passing while
its files still exist. This module owns those moves; `build`, `publish` and the gates call it.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store as db
from research_pipeline.lib.core import util

G = db.index_generations
P = db.index_pointer
LIVE = "live"

#: The blocking gates a candidate must have passed before `publish` accepts it.
REQUIRED_GATES: tuple[str, ...] = ("volume", "latency", "quality")


class GenerationStatus(enum.StrEnum):
    """Where a generation is in its life; the value is what `index_generations.status` holds."""

    BUILDING = "building"
    CANDIDATE = "candidate"
    PUBLISHED = "published"
    REJECTED = "rejected"
    RETIRED = "retired"


S = GenerationStatus
#: A generation in these states may still be built into (a re-executed run finishes it).
OPEN = (S.BUILDING, S.CANDIDATE)
#: A generation in these states may be judged by the release gates (again): a rejected one is
#: re-admitted as a candidate when a re-run finds every blocking gate passing.
JUDGEABLE = (S.CANDIDATE, S.REJECTED)


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
    """The full-text table of generation `gen_id`."""
    return "fts_" + gen_id.lower().replace("-", "_")


def vector_prefix(gen_id: str) -> str:
    """The object-store prefix of generation `gen_id`'s vector index files."""
    return f"indexes/{gen_id}"


def record(row: Any) -> dict[str, Any]:
    """A generation record from a result row or mapping: manifest and checks parsed, status an enum."""
    out = dict(getattr(row, "_mapping", row))
    for key in ("manifest", "checks"):
        if out.get(key) and isinstance(out[key], str):
            out[key] = json.loads(out[key])
    if out.get("status"):
        out["status"] = GenerationStatus(out["status"])
    return out


def get_generation(engine: Engine, gen_id: str) -> dict[str, Any]:
    """The `index_generations` row of `gen_id` (manifest and checks parsed); KeyError if unknown."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(G).where(G.c.gen_id == gen_id)).first()
    if row is None:
        raise KeyError(f"unknown index generation {gen_id!r}: see `research-pipeline index list`")
    return record(row)


def pointer(conn: sa.Connection, lock: bool = False) -> Any:
    """The `live` row of `index_pointer` (None before the first publish), locked on PostgreSQL if asked."""
    stmt = sa.select(P).where(P.c.name == LIVE)
    if lock and conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def list_generations(engine: Engine) -> list[dict[str, Any]]:
    """Every recorded generation, newest first, with a `live` flag."""
    with engine.connect() as conn:
        ptr = pointer(conn)
        rows = conn.execute(sa.select(G).order_by(G.c.created_at.desc(), G.c.gen_id.desc())).all()
    live = ptr.gen_id if ptr is not None else None
    out = []
    for r in rows:
        d = record(r)
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
                    "status": S.BUILDING.value,
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
    if gen["status"] not in OPEN:
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


def finish_part(engine: Engine, gen_id: str, values: Mapping[str, Any]) -> GenerationStatus:
    """Record one built half (full-text or vectors) of `gen_id`; returns its status after.

    Recording a half clears earlier gate results (they judged other files). Whichever half
    commits last sees both done and makes the generation a candidate.
    """
    with engine.begin() as conn:
        conn.execute(
            sa.update(G)
            .where(G.c.gen_id == gen_id, G.c.status.in_([s.value for s in OPEN]))
            .values(status=S.BUILDING.value, checks=None, **values)
        )
    # One conditional UPDATE: the fts and vector parts may finish in parallel (two steps of one
    # run); whichever commits last sees both parts done and makes the generation a candidate.
    with engine.begin() as conn:
        conn.execute(
            sa.update(G)
            .where(G.c.gen_id == gen_id, G.c.status == S.BUILDING.value, G.c.fts_table != "", G.c.vector_key != "")
            .values(status=S.CANDIDATE.value)
        )
    return get_generation(engine, gen_id)["status"]


def record_gates(engine: Engine, gen_id: str, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Store gate results on the generation (merged with earlier ones) and decide its status.

    `results` maps gate name -> {"passed": bool, "blocking": bool, "metadata": {...}, "description": str}.
    A candidate with a failing blocking gate becomes rejected. A rejected generation whose
    blocking gates all pass after the merge (every required one recorded, e.g. a latency gate
    re-run after a transient failure) is a candidate again, if its files are still there
    (retention drops a rejected generation's files once a newer one is live). Returns the
    updated generation row.
    """
    with engine.begin() as conn:
        stmt = sa.select(G.c.status, G.c.checks, G.c.fts_table, G.c.vector_key).where(G.c.gen_id == gen_id)
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
        values: dict[str, Any] = {"checks": db.dumps(checks)}
        missing, failed = gate_status({"checks": checks})
        if failed and row.status == S.CANDIDATE:
            values["status"] = S.REJECTED.value
        elif not failed and not missing and row.status == S.REJECTED and row.fts_table and row.vector_key:
            values["status"] = S.CANDIDATE.value
        conn.execute(sa.update(G).where(G.c.gen_id == gen_id).values(**values))
    return get_generation(engine, gen_id)


def gate_status(gen: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(missing, failed) required/blocking gate names of a generation row."""
    checks = gen.get("checks") or {}
    missing = [g for g in REQUIRED_GATES if g not in checks]
    failed = sorted(n for n, c in checks.items() if c.get("blocking", True) and not c.get("passed"))
    return missing, failed
