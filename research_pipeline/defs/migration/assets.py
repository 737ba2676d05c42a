"""The migration assets: shards of rows and files copied to PostgreSQL + S3, the republished
target, and the cutover record."""

from dataclasses import asdict
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from research_pipeline.defs.embeddings.assets import shard_partitions
from research_pipeline.defs.migration.resources import (
    MigrationTargetResource,
    migration_endpoints,
)
from research_pipeline.defs.resources import (
    DatabaseResource,
    InboxResource,
    ObjectStoreResource,
)
from research_pipeline.lib.migration.cutover import cutover, republish
from research_pipeline.lib.migration.objects import migrate_objects
from research_pipeline.lib.migration.plan import dry_run
from research_pipeline.lib.migration.report import MigrationNotVerified
from research_pipeline.lib.migration.rows import migrate_rows
from research_pipeline.lib.migration.state import is_verified, migration_states
from research_pipeline.lib.migration.tables import expected_states

#: Transient failures (a dropped connection, S3 throttling beyond botocore's own retries) are
#: retried with growing pauses; each retry resumes from what is already verified.
MIGRATION_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


#: Who answers for the migration assets (shown in the catalog).
OWNERS = ["team:search"]


def require_target(migration_target: MigrationTargetResource, bucket: bool = False) -> None:
    """Fail at once, without retries, naming the variable, when no migration target is configured
    (e.g. "Materialize all" in the UI on a deployment that is not migrating)."""
    missing = [] if migration_target.database_url else ["RP_TARGET_DATABASE_URL (the PostgreSQL database)"]
    if bucket and not migration_target.bucket:
        missing.append("RP_S3_BUCKET (the S3 bucket)")
    if missing:
        raise dg.Failure(
            description=(
                f"no migration target is configured: set {' and '.join(missing)} to migrate; the migration "
                "assets do nothing on a deployment that is not migrating (a dry run needs no target)"
            ),
            allow_retries=False,
        )


class MigrationConfig(dg.Config):
    """Run options of a migration shard."""

    dry_run: bool = False  # report what would move (rows, bytes, estimated seconds); change nothing
    force: bool = False  # copy again even where the target already verified the shard
    workers: int = 8  # concurrent S3 uploads
    batch_rows: int = 5000  # rows per COPY batch / read batch


def as_metadata(values: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    """Plain result values as metadata the UI can plot (numbers) or show (text, tables); a value
    that does not exist (None) is left out rather than shown as an empty text."""
    out: dict[str, dg.MetadataValue] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, (bool, str)):
            out[name] = dg.MetadataValue.text(str(value))
        elif isinstance(value, int):
            out[name] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            out[name] = dg.MetadataValue.float(value)
        else:
            out[name] = dg.MetadataValue.json(value)
    return out


def _dry_run(context: dg.AssetExecutionContext, database: DatabaseResource, object_store: ObjectStoreResource,
             inbox: InboxResource, migration_target: MigrationTargetResource) -> dg.AssetObservation:
    with migration_endpoints(database, object_store, inbox, migration_target, require_target=False) as (src, tgt):
        plan = dry_run(src, [context.partition_key], tgt)
    values = {**asdict(plan), "estimated_seconds": plan.estimated_seconds}
    context.log.info(f"dry run of shard {context.partition_key}: {values}")
    values["row_bytes"] = values.pop("bytes")
    return dg.AssetObservation(asset_key=context.asset_key, partition=context.partition_key,
                               metadata={"dry_run": True, **as_metadata(values)})


@dg.asset(
    group_name="migration",
    kinds={"postgres", "sqlite"},
    owners=OWNERS,
    code_version="migrate-rows-v1",
    partitions_def=shard_partitions,
    retry_policy=MIGRATION_RETRY,
    output_required=False,
)
def migrated_rows(
    context: dg.AssetExecutionContext,
    config: MigrationConfig,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    inbox: InboxResource,
    migration_target: MigrationTargetResource,
):
    """The rows of one shard of every table, copied from the source database to the PostgreSQL
    target and verified there (count and checksum per table).

    Shards are the first hex digit of doc_id (documents, sources, chunks), content_hash
    (embeddings) or sha256(uri) (quarantine); the small bookkeeping tables go whole to shard 0.
    A shard already verified on the target is skipped, so a re-run or a retry copies only what
    is missing. With `dry_run` it only reports what would move.
    """
    if config.dry_run:
        yield _dry_run(context, database, object_store, inbox, migration_target)
        return
    require_target(migration_target)
    with migration_endpoints(database, object_store, inbox, migration_target) as (source, target):
        result = migrate_rows(source, target, context.partition_key, force=config.force, batch_rows=config.batch_rows)
    # A rate only when rows were copied: a shard already verified would plot as a 0 rows/s slowdown.
    rate = {"rows_per_s": result.rows_per_s} if result.rows and result.seconds > 0 else {}
    yield dg.MaterializeResult(metadata=as_metadata({**asdict(result), **rate}))


@dg.asset(
    group_name="migration",
    kinds={"s3"},
    owners=OWNERS,
    code_version="migrate-objects-v1",
    partitions_def=shard_partitions,
    deps=[migrated_rows],
    retry_policy=MIGRATION_RETRY,
    output_required=False,
)
def migrated_objects(
    context: dg.AssetExecutionContext,
    config: MigrationConfig,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    inbox: InboxResource,
    migration_target: MigrationTargetResource,
    migration_s3: S3Resource,
):
    """The files of one shard in the target S3 bucket, each checked by size and S3's own SHA256
    checksum of what it stored: the original PDFs (`papers/<doc_id>.pdf`) and the index files
    (`indexes/...`, same keys as in the local object store, so index manifests resolve unchanged)."""
    if config.dry_run:
        yield _dry_run(context, database, object_store, inbox, migration_target)
        return
    require_target(migration_target, bucket=True)
    with migration_endpoints(database, object_store, inbox, migration_target, migration_s3) as (source, target):
        result = migrate_objects(source, target, context.partition_key, force=config.force, workers=config.workers)
    rate = {"mb_per_s": result.mb_per_s} if result.bytes and result.seconds > 0 else {}
    yield dg.MaterializeResult(metadata=as_metadata({**asdict(result), **rate}))


@dg.asset(
    group_name="migration",
    kinds={"postgres", "s3"},
    owners=OWNERS,
    code_version="republish-v1",
    deps=[migrated_rows, migrated_objects],
    retry_policy=MIGRATION_RETRY,
)
def migration(
    database: DatabaseResource,
    migration_target: MigrationTargetResource,
    migration_s3: S3Resource,
) -> dg.MaterializeResult:
    """The migrated deployment: all 16 shards of rows and files on PostgreSQL + S3, with the
    live index generation republished there (vector manifest loaded from S3, full-text table
    rebuilt on PostgreSQL)."""
    require_target(migration_target, bucket=True)
    target = migration_target.get_target(database.url, migration_s3)
    states = migration_states(target.engine)
    missing = sorted({shard for name, shard in expected_states() if not is_verified(states, name, shard)})
    if missing:
        raise dg.Failure(
            description=(
                f"shards {', '.join(missing)} are not migrated and verified yet: backfill migration_job "
                "for them, then materialize migration again"
            ),
            allow_retries=False,
        )
    result = republish(target)
    return dg.MaterializeResult(metadata=as_metadata({**asdict(result), "object_store": target.object_store_url}))


@dg.asset(group_name="migration", kinds={"s3"}, deps=[migration], owners=OWNERS, code_version="cutover-v1")
def migration_cutover(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    inbox: InboxResource,
    migration_target: MigrationTargetResource,
    migration_s3: S3Resource,
) -> dg.MaterializeResult:
    """The cutover record (`migration/cutover.json` in the bucket): written only after a full
    verification finds the target equal to the source, and refused, naming what differs, when
    anything does. After it, point RP_DATABASE_URL and RP_OBJECT_STORE_URL at the target."""
    require_target(migration_target, bucket=True)
    with migration_endpoints(database, object_store, inbox, migration_target, migration_s3) as (source, target):
        try:
            record = cutover(source, target)
        except MigrationNotVerified as exc:
            raise dg.Failure(description=f"cutover refused: {exc}", allow_retries=False) from exc
    context.log.info(
        "cutover verified: set RP_DATABASE_URL=<the target URL> and "
        f"RP_OBJECT_STORE_URL={record.object_store} for the code location"
    )
    values = asdict(record)
    values["verify_seconds"] = values.pop("seconds")
    return dg.MaterializeResult(metadata=as_metadata(values))
