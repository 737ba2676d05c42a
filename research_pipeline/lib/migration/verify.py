"""The whole target compared with the source: every row by key and digest, every object by what S3 stored."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.migration import s3
from research_pipeline.lib.migration.codec import digests_of
from research_pipeline.lib.migration.endpoints import MigrationSource, MigrationTarget
from research_pipeline.lib.migration.objects import object_problem, plan_objects
from research_pipeline.lib.migration.report import (
    Difference,
    DifferenceKind,
    VerifyReport,
    diff_rows,
)
from research_pipeline.lib.migration.state import (
    ShardState,
    describe,
    is_verified,
    migration_states,
)
from research_pipeline.lib.migration.tables import TABLE_SPECS, TableSpec

log = logging.getLogger(__name__)


def _state_difference(states: dict[tuple[str, str], ShardState], name: str, shard: str) -> list[Difference]:
    if is_verified(states, name, shard):
        return []
    return [Difference(DifferenceKind.STATE, name, shard, f"shard {shard}", describe(states, name, shard))]


def _table_count_difference(source: MigrationSource, target: MigrationTarget, spec: TableSpec) -> list[Difference]:
    """Whole-table counts (rows outside the hex shards included)."""
    count = sa.select(sa.func.count()).select_from(spec.table)
    with source.engine.connect() as sc, target.engine.connect() as tc:
        n_src, n_tgt = sc.execute(count).scalar_one(), tc.execute(count).scalar_one()
    if n_src == n_tgt:
        return []
    return [Difference(DifferenceKind.TABLE, spec.name, "*", "row count", f"{n_tgt} rows on target, {n_src} in source")]


def verify(
    source: MigrationSource, target: MigrationTarget, shards: Sequence[str] = store.SHARDS, deep: bool = False
) -> VerifyReport:
    """Compare source and target row by row and object by object; name every difference.

    Rows are compared by primary key and canonical digest; objects by size and S3's own SHA256
    checksum of what it stored (the bytes read back where S3 kept none, or when `deep`). Every
    (table, shard) must also be `verified` in migration_state, and whole-table counts must
    match. With `target.s3=None` only the rows are compared.
    """
    t0 = time.perf_counter()
    report = VerifyReport()
    states = migration_states(target.engine)
    has_schema = bool(states) or sa.inspect(target.engine).has_table(store.migration_state.name)
    for spec in TABLE_SPECS:
        for shard in (s for s in shards if s in spec.shards):
            report.partitions += 1
            report.differences += _state_difference(states, spec.name, shard)
            if not has_schema:
                continue
            src = digests_of(source.engine, spec, shard)
            tgt = digests_of(target.engine, spec, shard)
            report.rows += len(src)
            report.differences += diff_rows(spec.name, shard, src, tgt)
        if has_schema and list(shards) == list(store.SHARDS):
            report.differences += _table_count_difference(source, target, spec)
    for shard in shards if target.s3 is not None else ():
        for family, plans in plan_objects(source, shard).items():
            report.differences += _state_difference(states, family, shard)
            with ThreadPoolExecutor(max_workers=8) as pool:
                found = list(pool.map(lambda p: s3.with_s3_retries(object_problem, source, target, p, deep), plans))
            report.objects += len(plans)
            report.differences += [
                Difference(DifferenceKind.OBJECT, family, shard, p.key, why) for p, why in zip(plans, found) if why
            ]
    report.seconds = time.perf_counter() - t0
    log.info(report.summary())
    return report
