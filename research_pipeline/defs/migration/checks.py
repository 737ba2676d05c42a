"""The blocking gate of the cutover: the whole target compared with the source."""


import dagster as dg
from dagster_aws.s3 import S3Resource

from research_pipeline.defs.migration.assets import migration
from research_pipeline.defs.migration.resources import MigrationTargetResource
from research_pipeline.defs.resources import (
    DatabaseResource,
    InboxResource,
    ObjectStoreResource,
)
from research_pipeline.lib.migration import migrate


@dg.asset_check(asset=migration, blocking=True, name="migration_verified")
def migration_verified(
    context: dg.AssetCheckExecutionContext,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    inbox: InboxResource,
    migration_target: MigrationTargetResource,
    migration_s3: S3Resource,
) -> dg.AssetCheckResult:
    """Every row (by key and checksum) and every file (by size and sha256) on the target equals
    the source, and every shard is verified in migration_state; the cutover waits for it."""
    report = migrate.verify(
        migrate.open_source_engine(database.url),
        migration_target.get_engine(database.url),
        object_store.get_store(),
        migration_s3.get_client(),
        migration_target.get_bucket(),
        migration_target.prefix,
        log=context.log.info,
        inbox=inbox.get_path(),
    )
    return dg.AssetCheckResult(
        passed=report.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        description=report.summary(),
        metadata={
            "rows": dg.MetadataValue.int(report.rows),
            "objects": dg.MetadataValue.int(report.objects),
            "differences": dg.MetadataValue.int(len(report.differences)),
            "seconds": dg.MetadataValue.float(report.seconds),
            "first_differences": dg.MetadataValue.md(
                "\n".join(f"- {d}" for d in report.differences[:50]) or "none"
            ),
        },
    )
