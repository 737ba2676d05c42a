"""The migration assets: shards of rows and files copied to PostgreSQL + S3, the republished
target, and the cutover record."""


from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from research_pipeline.defs.embeddings.assets import shard_partitions
from research_pipeline.defs.migration.resources import MigrationTargetResource
from research_pipeline.defs.resources import (
    DatabaseResource,
    InboxResource,
    ObjectStoreResource,
)
from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import S3ObjectStore
from research_pipeline.lib.migration import migrate

#: Transient failures (a dropped connection, S3 throttling beyond botocore's own retries) are
#: retried with growing pauses; each retry resumes from what is already verified.
MIGRATION_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


class MigrationConfig(dg.Config):
    """Run options of a migration shard."""

    dry_run: bool = False  # report what would move (rows, bytes, estimated seconds); change nothing
    force: bool = False  # copy again even where the target already verified the shard
    workers: int = 8  # concurrent S3 uploads
    batch_rows: int = 5000  # rows per COPY batch / read batch


def _source(database: DatabaseResource):
    # Read-only engine on the original path (never DatabaseResource.get_engine, which writes).
    return migrate.open_source_engine(database.url)


def _plan_metadata(plan: dict[str, Any]) -> dict[str, Any]:
    return {
        "rows": dg.MetadataValue.int(int(plan["rows"])),
        "row_bytes": dg.MetadataValue.int(int(plan["bytes"])),
        "objects": dg.MetadataValue.int(int(plan["objects"])),
        "object_bytes": dg.MetadataValue.int(int(plan["object_bytes"])),
        "estimated_seconds": dg.MetadataValue.float(float(plan["estimated_seconds"])),
        "tables": dg.MetadataValue.json(plan["tables"]),
    }


def _dry_run(context: dg.AssetExecutionContext, database: DatabaseResource, object_store: ObjectStoreResource,
             inbox: InboxResource, migration_target: MigrationTargetResource) -> dg.AssetObservation:
    source = _source(database)
    target = migration_target.get_engine(database.url) if migration_target.database_url else None
    plan = migrate.dry_run(source, object_store.get_store(), [context.partition_key], target, inbox.get_path())
    context.log.info(f"dry run of shard {context.partition_key}: {store.dumps(plan)}")
    return dg.AssetObservation(asset_key=context.asset_key, partition=context.partition_key,
                               metadata={"dry_run": True, **_plan_metadata(plan)})


@dg.asset(
    group_name="migration",
    kinds={"postgres", "sqlite"},
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
    stats = migrate.migrate_rows(
        _source(database),
        migration_target.get_engine(database.url),
        context.partition_key,
        force=config.force,
        batch_rows=config.batch_rows,
        log=context.log.info,
    )
    yield dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(int(stats["rows"])),
            "bytes": dg.MetadataValue.int(int(stats["bytes"])),
            "tables_skipped": dg.MetadataValue.int(int(stats["tables_skipped"])),
            "rows_per_s": dg.MetadataValue.float(float(stats["rows_per_s"])),
            "seconds": dg.MetadataValue.float(float(stats["seconds"])),
            "tables": dg.MetadataValue.json(stats["tables"]),
        }
    )


@dg.asset(
    group_name="migration",
    kinds={"s3"},
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
    """The files of one shard in the target S3 bucket, verified by size and sha256: the
    original PDFs (`papers/<doc_id>.pdf`) and the index files (`indexes/...`, same keys as in
    the local object store, so index manifests resolve unchanged)."""
    if config.dry_run:
        yield _dry_run(context, database, object_store, inbox, migration_target)
        return
    stats = migrate.migrate_objects(
        _source(database),
        object_store.get_store(),
        migration_s3.get_client(),
        migration_target.get_bucket(),
        migration_target.prefix,
        migration_target.get_engine(database.url),
        context.partition_key,
        force=config.force,
        workers=config.workers,
        log=context.log.info,
        inbox=inbox.get_path(),
    )
    yield dg.MaterializeResult(
        metadata={
            "objects": dg.MetadataValue.int(int(stats["objects"])),
            "objects_skipped": dg.MetadataValue.int(int(stats["objects_skipped"])),
            "bytes": dg.MetadataValue.int(int(stats["bytes"])),
            "mb_per_s": dg.MetadataValue.float(float(stats["mb_per_s"])),
            "seconds": dg.MetadataValue.float(float(stats["seconds"])),
        }
    )


@dg.asset(
    group_name="migration",
    kinds={"postgres", "s3"},
    deps=[migrated_rows, migrated_objects],
    retry_policy=MIGRATION_RETRY,
)
def migration(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    migration_target: MigrationTargetResource,
    migration_s3: S3Resource,
) -> dg.MaterializeResult:
    """The migrated deployment: all 16 shards of rows and files on PostgreSQL + S3, with the
    live index generation republished there (vector manifest loaded from S3, full-text table
    rebuilt on PostgreSQL)."""
    target = migration_target.get_engine(database.url)
    states = migrate.migration_states(target)
    missing = sorted(
        {shard for name, shard in migrate.expected_states() if states.get((name, shard), {}).get("state") != "verified"}
    )
    if missing:
        raise dg.Failure(
            description=(
                f"shards {', '.join(missing)} are not migrated and verified yet: backfill migration_job "
                "for them, then materialize migration again"
            ),
            allow_retries=False,
        )
    target_store = S3ObjectStore(migration_target.get_bucket(), migration_target.prefix, client=migration_s3.get_client())
    result = migrate.republish(target, target_store, log=context.log.info)
    return dg.MaterializeResult(
        metadata={
            "live_generation": dg.MetadataValue.text(result["live_generation"] or ""),
            "fts_rows": dg.MetadataValue.int(int(result["fts_rows"])),
            "vectors": dg.MetadataValue.int(int(result["vectors"])),
            "object_store": dg.MetadataValue.text(migration_target.object_store_url()),
        }
    )


@dg.asset(group_name="migration", kinds={"s3"}, deps=[migration])
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
    try:
        record = migrate.cutover(
            _source(database),
            migration_target.get_engine(database.url),
            object_store.get_store(),
            migration_s3.get_client(),
            migration_target.get_bucket(),
            migration_target.prefix,
            log=context.log.info,
            inbox=inbox.get_path(),
        )
    except migrate.MigrationNotVerified as exc:
        raise dg.Failure(description=f"cutover refused: {exc}", allow_retries=False) from exc
    context.log.info(
        "cutover verified: set RP_DATABASE_URL=<the target URL> and "
        f"RP_OBJECT_STORE_URL={record['object_store']} for the code location"
    )
    return dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(int(record["rows"])),
            "objects": dg.MetadataValue.int(int(record["objects"])),
            "verify_seconds": dg.MetadataValue.float(float(record["seconds"])),
            "target_database": dg.MetadataValue.text(record["target_database"]),
            "object_store": dg.MetadataValue.text(record["object_store"]),
        }
    )
