"""The rows of one shard copied to PostgreSQL and read back equal.

Each (table, shard) is copied in ONE target transaction (COPY into the table, or into a staging
table merged with INSERT ... ON CONFLICT when the shard already has rows), together with its
`migration_state` row; PostgreSQL then digests what it stored, and the count and checksum must
equal those of the rows read from the source before the shard is marked `verified`. A killed
copy leaves nothing behind; a re-run skips verified shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.migration.codec import (
    RowCodec,
    checksum_in_database,
    checksum_of,
    digests_of,
)
from research_pipeline.lib.migration.endpoints import (
    MigrationSource,
    MigrationTarget,
    prepare_target,
)
from research_pipeline.lib.migration.errors import MigrationError
from research_pipeline.lib.migration.report import Difference, DifferenceKind, diff_rows
from research_pipeline.lib.migration.state import (
    ShardState,
    State,
    is_verified,
    migration_states,
    relaxed_commit,
    set_states,
)
from research_pipeline.lib.migration.tables import (
    TABLE_SPECS,
    TableSpec,
    check_shard,
    partition_rows,
)

log = logging.getLogger(__name__)


@dataclass
class BatchInfo:
    """Progress of a running shard copy, handed to the `on_batch` callback between batches."""

    table: str
    shard: str
    rows_sent: int
    backend_pid: int


@dataclass(frozen=True)
class RowsResult:
    """What `migrate_rows` did for one shard: rows and bytes copied, rows per table, seconds."""

    rows: int
    bytes: int
    tables_skipped: int
    tables: dict[str, int]
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _merge_staged(tconn: sa.Connection, spec: TableSpec, shard: str, stage: str, cols: str) -> None:
    """Make the target shard equal the staged rows: upsert what changed, delete what the source lacks."""
    key_cols = ", ".join(f'"{c}"' for c in spec.key)
    non_key = [c.name for c in spec.table.columns if c.name not in spec.key]
    if non_key:
        sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in non_key)
        changed = " OR ".join(f't."{c}" IS DISTINCT FROM EXCLUDED."{c}"' for c in non_key)
        conflict = f"DO UPDATE SET {sets} WHERE {changed}"
    else:
        conflict = "DO NOTHING"
    tconn.exec_driver_sql(
        f'INSERT INTO "{spec.name}" AS t ({cols}) SELECT {cols} FROM "{stage}" ON CONFLICT ({key_cols}) {conflict}'
    )
    pred = spec.predicate(shard, "postgresql")
    pred_sql = str(pred.compile(dialect=tconn.dialect, compile_kwargs={"literal_binds": True}))
    match = " AND ".join(f's."{c}" = "{spec.name}"."{c}"' for c in spec.key)
    tconn.exec_driver_sql(
        f'DELETE FROM "{spec.name}" WHERE {pred_sql} AND NOT EXISTS (SELECT 1 FROM "{stage}" s WHERE {match})'
    )


def _copy_table_shard(
    source: MigrationSource,
    target: MigrationTarget,
    spec: TableSpec,
    shard: str,
    batch_rows: int,
    on_batch: Callable[[BatchInfo], None] | None,
) -> tuple[dict[tuple, int], int]:
    """Copy one shard of one table in one target transaction; returns (source digests, bytes).

    The shard's rows and its `copied` state commit together, so a killed copy leaves nothing.
    """
    codec = RowCodec(spec)
    cols = ", ".join(f'"{c}"' for c in codec.columns)
    source_digests: dict[tuple, int] = {}
    nbytes = 0
    with target.engine.begin() as tconn, source.engine.connect() as sconn:
        # One copier per shard at a time, even when Dagster retries a step that is still running.
        tconn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"migrate:{spec.name}:{shard}"})
        relaxed_commit(tconn)
        pred_t = spec.predicate(shard, "postgresql")
        has_rows = tconn.execute(sa.select(sa.literal(1)).select_from(spec.table).where(pred_t).limit(1)).first()
        dest = spec.name
        if has_rows:
            dest = f"_stage_{spec.name}"
            tconn.exec_driver_sql(f'CREATE TEMP TABLE "{dest}" (LIKE "{spec.name}" INCLUDING DEFAULTS) ON COMMIT DROP')
        raw = tconn.connection.driver_connection
        sent = 0
        with raw.cursor() as cur, cur.copy(f'COPY "{dest}" ({cols}) FROM STDIN') as copy:
            for part in partition_rows(sconn, spec, shard, batch_rows):
                for row in part:
                    row = codec.clean(row)
                    source_digests[codec.key(row)] = codec.digest(row)
                    values = codec.to_pg(row)
                    copy.write_row(values)
                    nbytes += codec.size(values)
                sent += len(part)
                if on_batch is not None:
                    on_batch(BatchInfo(spec.name, shard, sent, raw.info.backend_pid))
        if has_rows:
            _merge_staged(tconn, spec, shard, dest, cols)
        if spec.table is store.query_log:
            # Ids were copied explicitly; move the sequence past them so new log rows don't collide.
            tconn.exec_driver_sql(
                "SELECT setval(pg_get_serial_sequence('query_log', 'id'), "
                "COALESCE((SELECT max(id) FROM query_log), 0) + 1, false)"
            )
        state = ShardState(spec.name, shard, State.COPIED, len(source_digests), checksum_of(source_digests.values()))
        set_states(tconn, [state])
    return source_digests, nbytes


def migrate_rows(
    source: MigrationSource,
    target: MigrationTarget,
    shard: str,
    force: bool = False,
    batch_rows: int = 5000,
    on_batch: Callable[[BatchInfo], None] | None = None,
) -> RowsResult:
    """Copy and verify every table's rows of one shard.

    Tables already verified in this shard are skipped unless `force`. Each table's shard is
    copied in its own transaction (`pending` -> `copied`), then read back: PostgreSQL digests
    its rows, which must equal the digests of the rows read from the source (-> `verified`).
    Raises MigrationError naming the rows that differ.
    """
    check_shard(shard)
    engine = target.engine
    prepare_target(engine)
    t0 = time.perf_counter()
    states = migration_states(engine)
    specs = [spec for spec in TABLE_SPECS if shard in spec.shards]
    todo = [s for s in specs if force or not is_verified(states, s.name, shard)]
    n_rows = n_bytes = 0
    per_table: dict[str, int] = {}
    if todo:
        with engine.begin() as conn:
            set_states(conn, [ShardState(spec.name, shard, State.PENDING) for spec in todo])
    verified: list[ShardState] = []
    diffs: list[Difference] = []
    for spec in todo:
        source_digests, nbytes = _copy_table_shard(source, target, spec, shard, batch_rows, on_batch)
        expected = (len(source_digests), checksum_of(source_digests.values()))
        # Count and checksum computed by PostgreSQL decide; only when they differ are the
        # rows' digests read back to name the rows that differ.
        found = []
        if checksum_in_database(engine, spec, shard) != expected:
            found = diff_rows(spec.name, shard, source_digests, digests_of(engine, spec, shard, batch_rows)) or [
                Difference(DifferenceKind.ROW, spec.name, shard, f"shard {shard}", "checksum differs from source")
            ]
        diffs += found
        if not found:
            verified.append(ShardState(spec.name, shard, State.VERIFIED, *expected))
        n_rows += len(source_digests)
        n_bytes += nbytes
        per_table[spec.name] = len(source_digests)
    if verified:
        with engine.begin() as conn:
            set_states(conn, verified)
    if diffs:
        raise MigrationError(
            f"shard {shard} read back different from the source: " + "; ".join(str(d) for d in diffs[:10])
        )
    out = RowsResult(n_rows, n_bytes, len(specs) - len(todo), per_table, time.perf_counter() - t0)
    log.info("rows[%s]: %d copied and verified, %d tables skipped, %.2fs", shard, out.rows, out.tables_skipped,
             out.seconds)
    return out
