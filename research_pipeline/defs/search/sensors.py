"""`published_index_sensor`: warms the query cache each time a new generation goes live."""

import dagster as dg

from research_pipeline.defs.resources import (
    DatabaseResource,
    QueryCacheResource,
    sensor_interval,
)
from research_pipeline.defs.search.jobs import warm_cache_job
from research_pipeline.lib.core import store, util


@dg.sensor(
    job=warm_cache_job,
    minimum_interval_seconds=sensor_interval(30),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches warm_cache_job once per newly live index generation (publish or rollback).",
)
def published_index_sensor(
    context: dg.SensorEvaluationContext,
    database: DatabaseResource,
    query_cache: QueryCacheResource,
):
    """Watches the live pointer; requests one warm_cache_job run each time a generation goes live.

    The cursor is the live generation id and when the pointer last moved, so a publish and a
    later rollback to a generation are each warmed once; the run key is derived from the same
    pair, so a daemon restart never warms twice. It reads the pointer rather than asset events
    so that a rollback from the CLI is warmed too. With no Redis (in-process LRU) there is no
    shared cache to warm, so it only moves the cursor.
    """
    live = store.live_generation(database.get_engine())
    if live is None:
        return dg.SkipReason("no index generation is live yet")
    gen_id = live["gen_id"]
    since = live["live_since"]
    state = f"{gen_id}@{since.isoformat() if since is not None else ''}"
    if context.cursor == state:
        return dg.SkipReason(f"generation {gen_id} is still live and already warmed")
    context.update_cursor(state)
    if not query_cache.redis_url:
        return dg.SkipReason(
            f"generation {gen_id} is live, but the query cache is in-process (RP_REDIS_URL unset): nothing to warm"
        )
    return dg.RunRequest(
        run_key=f"warm-{util.sha256_hex(state)[:16]}",
        run_config=dg.RunConfig(ops={"warm_query_cache": {"config": {"gen_id": gen_id}}}),
        tags={"research_pipeline/gen_id": gen_id},
    )


#: Evaluates published_index's automation condition (publish once the gates passed, e.g. after a
#: gate re-run from the UI). Running by default: Dagster's own automation sensor starts stopped,
#: so without this the condition would never be evaluated.
publish_automation_sensor = dg.AutomationConditionSensorDefinition(
    name="publish_automation_sensor",
    target=dg.AssetSelection.assets("published_index"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=sensor_interval(30),
    description="Evaluates published_index's automation condition: publishes a candidate whose blocking gates passed.",
)
