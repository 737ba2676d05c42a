"""The embedding asset: one vector per distinct chunk text and model, partitioned by document shard."""

import dagster as dg

from research_pipeline.defs.ingest.assets import chunks
from research_pipeline.defs.resources import DatabaseResource, EmbedderResource
from research_pipeline.lib.core import store

#: The static shards of the document-hash space ('0'..'f'), shared with the migration.
shard_partitions = dg.StaticPartitionsDefinition(list(store.SHARDS))


@dg.asset(
    group_name="embeddings",
    kinds={"pytorch", "sql"},
    deps=[chunks],
    partitions_def=shard_partitions,
    # A backfill of all 16 shards becomes 8 runs of 2 shards each: the run queue runs them in
    # parallel up to its concurrency limit, and a failed run retries only its own shards.
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=2),
)
def chunk_embeddings(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """The dense vectors of the chunks whose document falls in this shard, for the configured model.

    A vector is keyed by (chunk content hash, model id), so identical passages are embedded
    once and a re-run embeds only what is missing. The partitions are the 16 static shards of
    the document-hash space (the first hex digit of doc_id) rather than dates, because papers
    have no natural time axis and the shard of a document never changes: a model change or a
    full re-embed is a backfill of all 16 partitions from the UI, which the daemon runs in
    parallel. Batches are committed as they finish, so a run that crashes (or is cancelled)
    resumes where it stopped when the partition is materialized again.
    """
    from research_pipeline.lib.embed.embeddings import embed_missing

    model = embedder.get_embedder()
    shard = context.partition_key
    context.log.info(f"embedding shard {shard} with {model.model_id} (batch size {embedder.batch_size})")
    stats = embed_missing(
        database.get_engine(),
        model,
        shard=shard,
        batch_size=embedder.batch_size,
        log=context.log.info,
    )
    context.log.info(
        f"shard {shard}: {stats['embedded']} embedded, {stats['cached']} already cached, "
        f"{float(stats['chunks_per_s']):.1f} chunks/s"
    )
    return dg.MaterializeResult(
        metadata={
            "embedded": dg.MetadataValue.int(int(stats["embedded"])),
            "cached": dg.MetadataValue.int(int(stats["cached"])),
            "chunks_per_s": dg.MetadataValue.float(float(stats["chunks_per_s"])),
            "seconds": dg.MetadataValue.float(float(stats["seconds"])),
            "model_id": dg.MetadataValue.text(model.model_id),
        }
    )
