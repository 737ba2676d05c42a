"""The blocking gate of the cutover: the whole target compared with the source."""


import dagster as dg
from dagster_aws.s3 import S3Resource

from research_pipeline.defs.migration.assets import migration
from research_pipeline.defs.migration.resources import (
    MigrationTargetResource,
    migration_endpoints,
)
from research_pipeline.defs.resources import (
    DatabaseResource,
    InboxResource,
    ObjectStoreResource,
)
from research_pipeline.lib.migration.verify import verify


@dg.asset_check(asset=migration, blocking=True, name="migration_verified")
def migration_verified(
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    inbox: InboxResource,
    migration_target: MigrationTargetResource,
    migration_s3: S3Resource,
) -> dg.AssetCheckResult:
    """Every row (by key and checksum) and every file (by size and the SHA256 checksum S3 reports
    for what it stored) on the target equals the source, and every shard is verified in
    migration_state; the cutover waits for it."""
    with migration_endpoints(database, object_store, inbox, migration_target, migration_s3) as (source, target):
        report = verify(source, target)
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

