"""The search jobs: `reindex_job` (ingest -> chunks -> candidate -> gates -> publish) and
`warm_cache_job` (replays the most frequent logged queries against a newly live generation)."""

import dagster as dg

from research_pipeline.defs.embeddings.assets import ALL_SHARDS_TAGS, chunk_embeddings
from research_pipeline.defs.resources import (
    DatabaseResource,
    EmbedderResource,
    ObjectStoreResource,
    QueryCacheResource,
)
from research_pipeline.defs.search.assets import (
    fts_index,
    published_index,
    vector_index,
)
from research_pipeline.lib.release import searchers
from research_pipeline.lib.search.cache import QueryCache, cached_search
from research_pipeline.lib.search.querylog import top_queries

reindex_job = dg.define_asset_job(
    name="reindex_job",
    # `documents` and `chunks` are the ingest assets (defs/ingest); the selection includes the
    # release-gate checks on vector_index, which block published_index when they fail.
    selection=dg.AssetSelection.assets(
        "documents", "chunks", chunk_embeddings, fts_index, vector_index, published_index
    ),
    # Every run covers all 16 shards of chunk_embeddings in one step (a partition range), so a
    # reindex leaves every shard materialized in the catalog and vector_index finds every vector.
    tags=ALL_SHARDS_TAGS,
    description=(
        "Ingest new papers, chunk them, embed the new chunks (all 16 shards), build a candidate index "
        "generation beside the live one unless the corpus is unchanged, run the release gates and "
        "publish the candidate only if the blocking gates pass."
    ),
)


class WarmCacheConfig(dg.Config):
    """Which generation to warm (empty: the live one) and how many logged queries to replay."""

    gen_id: str = ""
    top_n: int = 100
    k: int = 10
    mode: str = "hybrid"


def make_query_cache(query_cache: QueryCacheResource) -> QueryCache:
    """The QueryCache the resource describes (Redis when redis_url is set, else in-process LRU)."""
    return QueryCache(redis_url=query_cache.redis_url, max_entries=query_cache.max_entries, ttl_s=query_cache.ttl_s)


@dg.op(out=dg.Out(dg.Nothing))
def warm_query_cache(
    context: dg.OpExecutionContext,
    config: WarmCacheConfig,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    embedder: EmbedderResource,
    query_cache: QueryCacheResource,
) -> None:
    """Runs the most frequent logged queries against the generation so their results are cached."""
    from research_pipeline.lib.search.searcher import SearchFilters

    engine = database.get_engine()
    searcher = searchers.open_searcher(
        engine, object_store.get_store(), embedder.get_embedder(), gen_id=config.gen_id or None
    )
    cache = make_query_cache(query_cache)
    queries = top_queries(engine, config.top_n)
    failed = 0
    try:
        for item in queries:
            try:
                filters = SearchFilters(**item["filters"]) if item["filters"] else None
                cached_search(searcher, item["query"], k=config.k, filters=filters, mode=config.mode, cache=cache)
            except (TypeError, ValueError) as exc:
                # A logged query from an older release can carry filters this one does not know.
                failed += 1
                context.log.warning(f"skipping logged query {item['query']!r}: {exc}")
        stats = cache.stats()
    finally:
        cache.close()
    context.log.info(
        f"warmed the {stats['backend']} cache for generation {searcher.gen_id}: {len(queries)} queries, "
        f"{stats['hits']} already cached, {stats['misses']} computed, {failed} skipped"
    )
    context.log_event(
        dg.AssetObservation(
            asset_key=published_index.key,
            metadata={
                "warmed_gen_id": dg.MetadataValue.text(searcher.gen_id),
                "warmed_queries": dg.MetadataValue.int(len(queries)),
                "warm_already_cached": dg.MetadataValue.int(int(stats["hits"])),
                "warm_computed": dg.MetadataValue.int(int(stats["misses"])),
                "warm_skipped": dg.MetadataValue.int(failed),
            },
        )
    )


@dg.job(description="Replay the most frequent logged queries against an index generation to fill the query cache.")
def warm_cache_job() -> None:
    warm_query_cache()
