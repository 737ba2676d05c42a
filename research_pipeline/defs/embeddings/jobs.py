"""The job that embeds chunks shard by shard."""

from __future__ import annotations

import dagster as dg

from research_pipeline.defs.embeddings.assets import chunk_embeddings, shard_partitions

embed_job = dg.define_asset_job(
    name="embed_job",
    selection=dg.AssetSelection.assets(chunk_embeddings),
    partitions_def=shard_partitions,
    description="Embed the chunks of one document shard (backfill all 16 shards to re-embed everything).",
)
