"""published_index_sensor fires once per newly live generation; warm_cache_job fills the real Redis cache."""

import dagster as dg
import pytest

from research_pipeline.config import Settings
from research_pipeline.defs.resources import QueryCacheResource, build_resources
from research_pipeline.defs.search.jobs import warm_cache_job
from research_pipeline.defs.search.sensors import published_index_sensor
from research_pipeline.lib.core import store
from research_pipeline.lib.release import build, gates, publish, searchers
from research_pipeline.lib.search.cache import QueryCache, cache_key, cached_search
from research_pipeline.lib.search.querylog import QueryLog, top_queries
from research_pipeline_tests.shared import (
    SEARCH_GROUP,
    load_corpus_rows,
    sample_corpus,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
RELAXED = gates.GateThresholds(latency_p95_ms=600_000.0)
QUERIES = ["multi-class confusion matrix in Python", "AutoML pipelines", "repeated games tutorial"]

pytestmark = pytest.mark.xdist_group(SEARCH_GROUP)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return sample_corpus(tmp_path_factory)


@pytest.fixture
def deployment(tmp_path, corpus):
    settings = Settings(
        home=tmp_path,
        inbox=tmp_path / "inbox",
        database_url=f"sqlite:///{tmp_path / 'rp.db'}",
        object_store_url=str(tmp_path / "objects"),
        redis_url=REDIS_URL,
    )
    resources = build_resources(settings)
    engine = resources["database"].get_engine()
    load_corpus_rows(engine, corpus)
    yield resources
    engine.dispose()


@pytest.fixture
def redis_keys():
    """Cache keys a test wrote to the shared Redis under the default prefix; deleted afterwards."""
    keys: list[str] = []
    yield keys
    cache = QueryCache(redis_url=REDIS_URL)
    if keys:
        cache._redis.delete(*[cache.prefix + k for k in keys])
    cache.close()


def publish_new(resources, embedder) -> str:
    engine, obj = resources["database"].get_engine(), resources["object_store"].get_store()
    gen = build.build_generation(engine, obj, embedder)
    gates.evaluate_generation(engine, obj, embedder, gen["gen_id"], thresholds=RELAXED, max_probe_queries=1)
    publish.publish(engine, gen["gen_id"], store=obj)
    return gen["gen_id"]


def tick(instance, resources, cursor):
    with dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"database": resources["database"], "query_cache": resources["query_cache"]},
    ) as ctx:
        return published_index_sensor(ctx), ctx.cursor


def test_sensor_fires_once_per_live_generation_and_warms_redis(deployment, embedder, redis_keys):
    engine = deployment["database"].get_engine()
    with dg.instance_for_test() as instance:
        result, cursor = tick(instance, deployment, None)
        assert isinstance(result, dg.SkipReason) and "no index generation" in result.skip_message

        first = publish_new(deployment, embedder)
        request, cursor = tick(instance, deployment, cursor)
        assert isinstance(request, dg.RunRequest)
        assert request.tags["research_pipeline/gen_id"] == first
        again, same_cursor = tick(instance, deployment, cursor)
        assert isinstance(again, dg.SkipReason) and same_cursor == cursor

        # Searches against the live generation are logged; the warm job replays the top ones.
        searcher = searchers.open_searcher(engine, deployment["object_store"].get_store(), embedder)
        with QueryLog(engine) as qlog:
            for i, query in enumerate(QUERIES):
                for _ in range(len(QUERIES) - i):
                    cached_search(searcher, query, query_log=qlog)
        assert [t["query"] for t in top_queries(engine, 10)] == QUERIES
        redis_keys.extend(cache_key(q, None, 10, "hybrid", first) for q in QUERIES)

        run = warm_cache_job.execute_in_process(
            run_config=request.run_config, instance=instance, resources=deployment
        )
        assert run.success
        observed = [
            e.event_specific_data.asset_observation.metadata
            for e in run.all_events
            if e.event_type_value == "ASSET_OBSERVATION"
        ]
        assert observed and observed[0]["warmed_queries"].value == len(QUERIES)
        assert observed[0]["warm_computed"].value == len(QUERIES)
        cache = QueryCache(redis_url=REDIS_URL)
        try:
            for query in QUERIES:
                hits = cache.get(cache_key(query, None, 10, "hybrid", first))
                assert hits and hits == [h.as_dict() for h in searcher.search(query, k=10)]
            # The next generation is a different key space: a miss until it is warmed.
            second = publish_new(deployment, embedder)
            assert cache.get(cache_key(QUERIES[0], None, 10, "hybrid", second)) is None
        finally:
            cache.close()
        redis_keys.extend(cache_key(q, None, 10, "hybrid", second) for q in QUERIES)

        request2, cursor = tick(instance, deployment, cursor)
        assert isinstance(request2, dg.RunRequest) and request2.tags["research_pipeline/gen_id"] == second
        assert request2.run_key != request.run_key
        assert isinstance(tick(instance, deployment, cursor)[0], dg.SkipReason)

        # A rollback makes the first generation live again: warmed again, under a new run key.
        assert publish.rollback(engine) == first
        request3, cursor = tick(instance, deployment, cursor)
        assert isinstance(request3, dg.RunRequest) and request3.tags["research_pipeline/gen_id"] == first
        assert request3.run_key not in (request.run_key, request2.run_key)


def test_sensor_without_redis_only_moves_the_cursor(deployment, embedder):
    publish_new(deployment, embedder)
    local = {"database": deployment["database"], "query_cache": QueryCacheResource()}
    with dg.instance_for_test() as instance:
        result, cursor = tick(instance, local, None)
        assert isinstance(result, dg.SkipReason) and "RP_REDIS_URL" in result.skip_message
        assert cursor and cursor.startswith(store.live_generation(deployment["database"].get_engine())["gen_id"])
        again, _ = tick(instance, local, cursor)
        assert isinstance(again, dg.SkipReason) and "already warmed" in again.skip_message
