"""The embedding asset: one vector per distinct chunk text and model, partitioned by document shard."""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from research_pipeline.defs.ingest.assets import chunks, table_metadata
from research_pipeline.defs.resources import DatabaseResource, EmbedderResource
from research_pipeline.lib.core import store

#: The static shards of the document-hash space ('0'..'f'), shared with the migration.
shard_partitions = dg.StaticPartitionsDefinition(list(store.SHARDS))

#: Run tags of a run that covers every shard in one step (the partition range '0'..'f').
ALL_SHARDS_TAGS = {
    ASSET_PARTITION_RANGE_START_TAG: store.SHARDS[0],
    ASSET_PARTITION_RANGE_END_TAG: store.SHARDS[-1],
}

#: Retries of a failed embedding step (a killed worker, a database that restarted). Each retry
#: embeds only what the failed attempt had not committed, so retrying is cheap.
EMBED_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)


def _config_key(embedder: EmbedderResource) -> str:
    return f"{embedder.model}@{embedder.device}"


def recorded_model_id(instance: dg.DagsterInstance, embedder: EmbedderResource | str) -> str | None:
    """The model id the latest materialization embedded with, if it used this embedder configuration
    (a resource, or its key "model@device" as the exporter passes it)."""
    key = embedder if isinstance(embedder, str) else _config_key(embedder)
    event = instance.get_latest_materialization_event(dg.AssetKey("chunk_embeddings"))
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    if "embedder_config" not in metadata or metadata["embedder_config"].value != key:
        return None
    return str(metadata["model_id"].value)


def distinct_texts(engine, shards: list[str]) -> int:  # noqa: ANN001
    """Distinct chunk texts of the shards (what is cached when nothing is missing)."""
    import sqlalchemy as sa

    c = store.chunks
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count(sa.distinct(c.c.content_hash))).where(c.c.shard.in_(shards))).scalar_one()
        )


@dg.asset(
    group_name="embeddings",
    kinds={"pytorch", "sql"},
    deps=[chunks],
    partitions_def=shard_partitions,
    # A backfill of all 16 shards becomes 8 runs of 2 shards each: the run queue runs them in
    # parallel up to its concurrency limit, and a failed run retries only its own shards.
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=2),
    retry_policy=EMBED_RETRY,
    owners=["team:search"],
    code_version="embed-v1",
    tags={"research_pipeline/area": "embeddings"},
    metadata=table_metadata(store.embeddings),
)
def chunk_embeddings(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """The dense vectors of the chunks whose document falls in a shard, for the configured model.

    A vector is keyed by (chunk content hash, model id), so identical passages are embedded
    once and a re-run embeds only what is missing. The partitions are the 16 static shards of
    the document-hash space (the first hex digit of doc_id) rather than dates, because papers
    have no natural time axis and the shard of a document never changes. One run may cover a
    range of shards (a backfill run of 2, or reindex_job's run of all 16); the metadata is the
    total over the run's shards. This is the only producer of vectors: `vector_index` reads
    them. When every chunk text of the shards already has a vector for the model id the last
    run used with the same model setting, the model is not even loaded. Batches are committed as they finish, so a run that crashes (or is cancelled)
    resumes where it stopped when it is retried or materialized again.
    """
    from research_pipeline.lib.embed.embeddings import backlog, embed_missing

    shards = list(context.partition_keys)
    engine = database.get_engine()
    known_id = recorded_model_id(context.instance, embedder)
    if known_id is not None and not any(n for s, n in backlog(engine, known_id).items() if s in shards):
        # Nothing to embed: the model (seconds of CPU to load) is not loaded at all.
        context.log.info(f"shards {','.join(shards)}: every chunk text already has a {known_id} vector")
        cached = distinct_texts(engine, shards)
        return dg.MaterializeResult(
            metadata={
                "shards": dg.MetadataValue.text(",".join(shards)),
                "embedded": dg.MetadataValue.int(0),
                "cached": dg.MetadataValue.int(cached),
                "backlog": dg.MetadataValue.int(0),
                "dagster/row_count": dg.MetadataValue.int(cached),
                "model_id": dg.MetadataValue.text(known_id),
                "embedder_config": dg.MetadataValue.text(_config_key(embedder)),
            }
        )
    model = embedder.get_embedder()
    context.log.info(f"embedding shards {','.join(shards)} with {model.model_id} (batch size {embedder.batch_size})")
    embedded = cached = left = 0
    seconds = 0.0
    for shard in shards:
        stats = embed_missing(engine, model, shard=shard, batch_size=embedder.batch_size)
        embedded += int(stats["embedded"])
        cached += int(stats["cached"])
        left += int(stats["backlog"])
        seconds += float(stats["seconds"])
        if stats["embedded"]:
            context.log.info(f"shard {shard}: {stats['embedded']} embedded, {stats['cached']} already cached")
    metadata: dict[str, dg.MetadataValue] = {
        "shards": dg.MetadataValue.text(",".join(shards)),
        "embedded": dg.MetadataValue.int(embedded),
        "cached": dg.MetadataValue.int(cached),
        # Chunk texts of these shards still without a vector when the run ended (chunks that
        # arrived meanwhile); the live figure is the exporter's rp_embedding_backlog_chunks.
        "backlog": dg.MetadataValue.int(left),
        "dagster/row_count": dg.MetadataValue.int(embedded + cached),
        "seconds": dg.MetadataValue.float(round(seconds, 3)),
        "model_id": dg.MetadataValue.text(model.model_id),
        "numeric_path": dg.MetadataValue.text(model.numeric_path),
        "embedder_config": dg.MetadataValue.text(_config_key(embedder)),
    }
    # A rate only when something was embedded: 0 chunks/s would plot as a (false) slowdown.
    if embedded and seconds > 0:
        metadata["chunks_per_s"] = dg.MetadataValue.float(round(embedded / seconds, 2))
    context.log.info(f"shards {','.join(shards)}: {embedded} embedded, {cached} already cached")
    return dg.MaterializeResult(metadata=metadata)
