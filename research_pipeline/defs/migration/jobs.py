"""The migration jobs: copy shards (backfillable), then republish, verify and cut over."""

from __future__ import annotations

import dagster as dg

from research_pipeline.defs.embeddings.assets import shard_partitions
from research_pipeline.defs.migration.assets import (
    migrated_objects,
    migrated_rows,
    migration,
    migration_cutover,
)

migration_job = dg.define_asset_job(
    name="migration_job",
    selection=dg.AssetSelection.assets(migrated_rows, migrated_objects),
    partitions_def=shard_partitions,
    # deploy/dagster.prod.yaml caps concurrent runs with this tag.
    tags={"research_pipeline/migration": "shard"},
    description=(
        "Copy one shard of rows to PostgreSQL and its files to S3, verified; backfill all 16 shards "
        "to migrate everything. Config dry_run: true reports what would move and changes nothing."
    ),
)

cutover_job = dg.define_asset_job(
    name="cutover_job",
    selection=dg.AssetSelection.assets(migration, migration_cutover),
    description=(
        "After migration_job verified every shard: republish the live index on the target, run the "
        "blocking migration_verified check, and record the cutover only if it passes."
    ),
)
