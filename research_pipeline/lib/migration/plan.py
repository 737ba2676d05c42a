"""The dry run: what a migration of some shards would move, and how long it would take; changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.migration.endpoints import MigrationSource, MigrationTarget
from research_pipeline.lib.migration.objects import plan_objects
from research_pipeline.lib.migration.state import is_verified, migration_states
from research_pipeline.lib.migration.tables import (
    TABLE_SPECS,
    TableSpec,
    partition_rows,
)

#: Throughputs used for the estimate (measured by bench/bench_migrate.py on 2 cores).
EST_ROWS_PER_S = 7_000.0
EST_BYTES_PER_S = 12e6


@dataclass
class DryRunPlan:
    """Rows per table, bytes and objects a migration would move, and its estimated seconds."""

    tables: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    bytes: int = 0
    objects: int = 0
    object_bytes: int = 0

    @property
    def estimated_seconds(self) -> float:
        return round(self.rows / EST_ROWS_PER_S + (self.bytes + self.object_bytes) / EST_BYTES_PER_S, 2)


def _table_bytes(conn: sa.Connection, spec: TableSpec) -> int:
    sized = [c for c in spec.table.columns if isinstance(c.type, (sa.String, sa.LargeBinary))]
    if not sized:
        return 0
    total = sum(sa.func.coalesce(sa.func.sum(sa.func.length(c)), 0) for c in sized)
    return int(conn.execute(sa.select(total).select_from(spec.table)).scalar_one() or 0)


def dry_run(
    source: MigrationSource, shards: Sequence[str] = store.SHARDS, target: MigrationTarget | None = None
) -> DryRunPlan:
    """What a migration of `shards` would move; only reads.

    With a `target` that already has migration state, verified shards are left out of the
    estimate, as a real run would skip them.
    """
    states = migration_states(target.engine) if target is not None else {}
    out = DryRunPlan()
    with source.engine.connect() as conn:
        for spec in TABLE_SPECS:
            todo = [s for s in shards if not is_verified(states, spec.name, s)]
            if not todo:
                out.tables[spec.name] = 0
                continue
            total = conn.execute(sa.select(sa.func.count()).select_from(spec.table)).scalar_one()
            nbytes = _table_bytes(conn, spec)
            if len(todo) == len(store.SHARDS):
                rows = total
            else:
                rows = sum(len(part) for s in todo for part in partition_rows(conn, spec, s, 5000))
                nbytes = int(nbytes * rows / total) if total else 0
            out.tables[spec.name] = rows
            out.rows += rows
            out.bytes += nbytes
    for shard in shards:
        for family, plans in plan_objects(source, shard).items():
            if is_verified(states, family, shard):
                continue
            out.objects += len(plans)
            out.object_bytes += sum(p.size or 0 for p in plans)
    return out
