"""The migration's own bookkeeping on the target: one migration_state row per (table, shard)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util
from research_pipeline.lib.migration.endpoints import is_prepared


class State(enum.StrEnum):
    """Where a (table or object family, shard) stands: pending -> copied -> verified."""

    PENDING = "pending"
    COPIED = "copied"
    VERIFIED = "verified"


@dataclass(frozen=True)
class ShardState:
    """One migration_state row: a table's (or object family's) shard, its state, rows and checksum."""

    table_name: str
    shard: str
    state: State
    rows: int = 0
    checksum: str | None = None
    updated_at: datetime | None = None


def relaxed_commit(conn: sa.Connection) -> None:
    """Commit this transaction without waiting for its WAL flush.

    Safe here: a shard's rows and its state commit together, so a server crash can only lose
    whole recent shards, which the re-run copies again; it saves one fsync per (table, shard).
    """
    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")


def set_states(conn: sa.Connection, states: Sequence[ShardState]) -> None:
    """Upsert migration_state rows."""
    relaxed_commit(conn)
    now = util.utcnow()
    store.upsert(
        conn,
        store.migration_state,
        [
            {"table_name": s.table_name, "partition": s.shard, "state": s.state.value, "rows": s.rows,
             "checksum": s.checksum, "updated_at": now}
            for s in states
        ],
        ["table_name", "partition"],
    )


def migration_states(target: Engine) -> dict[tuple[str, str], ShardState]:
    """{(table_name, shard): its state} on the target (empty if it has no schema yet)."""
    if not is_prepared(target) and not sa.inspect(target).has_table(store.migration_state.name):
        return {}
    with target.connect() as conn:
        rows = conn.execute(sa.select(store.migration_state)).mappings().all()
    return {
        (r["table_name"], r["partition"]): ShardState(
            r["table_name"], r["partition"], State(r["state"]), r["rows"], r["checksum"], r["updated_at"]
        )
        for r in rows
    }


def is_verified(states: dict[tuple[str, str], ShardState], name: str, shard: str) -> bool:
    """Whether (name, shard) is verified in `states`."""
    st = states.get((name, shard))
    return st is not None and st.state is State.VERIFIED


def describe(states: dict[tuple[str, str], ShardState], name: str, shard: str) -> str:
    """Why (name, shard) is not verified, in words."""
    st = states.get((name, shard))
    return f"not migrated ({st.state.value if st else 'never run'})"
