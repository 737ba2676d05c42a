"""The search assets in the code location, and reindex_job end to end on real papers (ingest -> publish)."""

import os
import shutil

import dagster as dg
import pytest

from research_pipeline.config import DEFAULT_NIGHTLY_CRON, Settings
from research_pipeline.defs.embeddings.assets import ALL_SHARDS_TAGS, chunk_embeddings
from research_pipeline.defs.ingest.assets import chunks, documents
from research_pipeline.defs.resources import (
    ReleaseGatesResource,
    build_resources,
    nightly_cron,
)
from research_pipeline.defs.search.assets import (
    fts_index,
    published_index,
    record_live_generation,
    vector_index,
)
from research_pipeline.defs.search.checks import release_gates_check
from research_pipeline.defs.search.jobs import reindex_job
from research_pipeline.defs.search.schedules import build_nightly_reindex
from research_pipeline.lib.core import store
from research_pipeline.lib.release import publish, registry, searchers
from research_pipeline_tests.shared import DEMO_PAPERS, SAMPLE, SEARCH_GROUP

pytestmark = pytest.mark.xdist_group(SEARCH_GROUP)

SEARCH_KEYS = {"fts_index", "vector_index", "published_index"}
GATES = {f"vector_index_{g}" for g in ("volume", "latency", "quality", "parse_quality", "freshness")}


@pytest.fixture(scope="module")
def location():
    from research_pipeline.definitions import defs

    return defs


def test_search_assets_are_wired(location):
    graph = location.resolve_asset_graph()
    specs = {s.key.to_user_string(): s for s in location.resolve_all_asset_specs()}
    for key in SEARCH_KEYS:
        assert specs[key].group_name == "search"
        assert specs[key].kinds
        assert specs[key].description
    parents = {k: {p.to_user_string() for p in graph.get(dg.AssetKey(k)).parent_keys} for k in SEARCH_KEYS}
    assert parents == {
        "fts_index": {"chunks"},
        "vector_index": {"chunks", "chunk_embeddings"},
        "published_index": {"fts_index", "vector_index"},
    }
    checks = {k.name: k for k in graph.asset_check_keys if k.asset_key == vector_index.key}
    assert set(checks) == GATES
    blocking = {spec.name for spec in release_gates_check.check_specs if spec.blocking}
    assert blocking == {"vector_index_volume", "vector_index_latency", "vector_index_quality"}
    condition = specs["published_index"].automation_condition
    labels = str(condition)
    assert "eager" in labels and "all_deps_blocking_checks_passed" in labels


def test_reindex_job_selection_schedule_and_sensor(location, monkeypatch):
    job = location.resolve_job_def("reindex_job")
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert keys == {"documents", "chunks", "chunk_embeddings"} | SEARCH_KEYS
    assert job.partitions_def.get_partition_keys() == list(store.SHARDS)
    assert job.tags == ALL_SHARDS_TAGS, "every reindex run covers all 16 shards"
    check_names = {k.name for k in job.asset_layer.asset_graph.asset_check_keys if k.asset_key == vector_index.key}
    assert check_names == GATES
    schedule = location.resolve_schedule_def("nightly_reindex")
    assert schedule.job_name == "reindex_job"
    assert schedule.execution_timezone == "UTC"
    if not os.environ.get("RP_NIGHTLY_CRON"):
        assert schedule.cron_schedule == DEFAULT_NIGHTLY_CRON
    monkeypatch.setenv("RP_NIGHTLY_CRON", "30 3 * * 1-5")
    assert build_nightly_reindex(nightly_cron()).cron_schedule == "30 3 * * 1-5"
    with pytest.raises(ValueError, match="RP_NIGHTLY_CRON"):
        build_nightly_reindex("every night")
    automation = location.resolve_sensor_def("publish_automation_sensor")
    assert automation.default_status == dg.DefaultSensorStatus.RUNNING, "gated publishes work out of the box"
    assert automation.asset_selection.resolve(location.resolve_asset_graph()) == {published_index.key}
    sensor = location.resolve_sensor_def("published_index_sensor")
    assert sensor.job_name == "warm_cache_job"
    assert location.resolve_job_def("warm_cache_job")


def test_reindex_job_end_to_end(tmp_path, monkeypatch):
    """reindex_job on four real papers embeds all 16 shards and publishes; an unchanged re-run builds nothing
    and publishes no new generation; a rollback recorded from outside a run names the live generation."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in SAMPLE:
        shutil.copy(DEMO_PAPERS / name, inbox / name)
    settings = Settings(
        home=tmp_path,
        inbox=inbox,
        database_url=f"sqlite:///{tmp_path / 'rp.db'}",
        object_store_url=str(tmp_path / "objects"),
    )
    resources = build_resources(settings)
    resources["release_gates"] = ReleaseGatesResource(latency_p95_ms=600_000.0, keep_generations=2)
    defs = dg.Definitions(
        assets=[documents, chunks, chunk_embeddings, fts_index, vector_index, published_index],
        asset_checks=[release_gates_check],
        jobs=[reindex_job],
        resources=resources,
    )
    job = defs.resolve_job_def("reindex_job")
    run_config = {
        "ops": {
            "documents": {"config": {"workers": 1, "ocr": False}},
            "release_gates_check": {"config": {"max_probe_queries": 2}},
        }
    }
    engine = resources["database"].get_engine()
    with dg.instance_for_test() as instance:
        first = job.execute_in_process(run_config=run_config, instance=instance)
        assert first.success
        meta = {
            e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in first.get_asset_materialization_events()
        }
        assert set(meta) == {"documents", "chunks", "chunk_embeddings"} | SEARCH_KEYS
        assert instance.get_materialized_partitions(chunk_embeddings.key) == set(store.SHARDS)
        gen_id = meta["vector_index"]["gen_id"].value
        assert meta["fts_index"]["gen_id"].value == meta["published_index"]["gen_id"].value == gen_id
        assert meta["published_index"]["live_gen_id"].value == gen_id
        assert instance.get_run_by_id(first.run_id).tags["research_pipeline/gen_id"] == gen_id
        n_chunks = store.counts(engine)["chunks"]
        assert meta["fts_index"]["fts_rows"].value == meta["vector_index"]["vectors"].value == n_chunks > 0
        assert meta["vector_index"]["documents"].value == len(SAMPLE)
        assert {e.check_name for e in first.get_asset_check_evaluations() if e.passed} == GATES
        live = store.live_generation(engine)
        assert live["gen_id"] == gen_id and live["n_chunks"] == n_chunks
        n_generations = len(registry.list_generations(engine))

        second = job.execute_in_process(run_config=run_config, instance=instance)
        assert second.success
        built = {e.asset_key.to_user_string() for e in second.get_asset_materialization_events()}
        assert built == {"documents", "chunks", "chunk_embeddings"}, "an unchanged corpus builds no index"
        emb = second.asset_materializations_for_node("chunk_embeddings")[0].metadata
        assert emb["embedded"].value == 0
        assert not second.get_asset_check_evaluations()
        assert len(registry.list_generations(engine)) == n_generations
        assert store.live_generation(engine)["gen_id"] == gen_id

        forced_config = {"ops": {**run_config["ops"], "fts_index": {"config": {"force": True}},
                                 "vector_index": {"config": {"force": True}}}}
        forced = job.execute_in_process(run_config=forced_config, instance=instance)
        assert forced.success
        pub = forced.asset_materializations_for_node("published_index")[0].metadata
        assert pub["previous_gen_id"].value == gen_id
        new_gen = pub["gen_id"].value
        assert new_gen != gen_id

        assert publish.rollback(engine) == gen_id
        assert record_live_generation(instance, engine, "rollback") == gen_id
        observation = instance.fetch_observations(published_index.key, limit=1).records[0].asset_observation
        assert observation.metadata["live_gen_id"].value == gen_id
        assert observation.metadata["action"].value == "rollback"
    searcher = searchers.open_searcher(
        engine, resources["object_store"].get_store(), resources["embedder"].get_embedder()
    )
    hits = searcher.search("repeated games tutorial in Python", k=2)
    assert hits and searcher.gen_id == gen_id
    engine.dispose()


def test_vector_index_embeds_nothing_and_names_what_to_materialize(tmp_path, tmp_path_factory):
    """chunk_embeddings is the only producer of vectors: vector_index fails on a chunk without one."""
    import sqlalchemy as sa

    from research_pipeline_tests.shared import load_corpus_rows, sample_corpus

    settings = Settings(home=tmp_path, inbox=tmp_path / "inbox", database_url=f"sqlite:///{tmp_path / 'rp.db'}",
                        object_store_url=str(tmp_path / "objects"))
    resources = build_resources(settings)
    engine = resources["database"].get_engine()
    rows = sample_corpus(tmp_path_factory)
    load_corpus_rows(engine, rows)
    victim = rows["chunks"][0]
    e = store.embeddings
    with engine.begin() as conn:
        conn.execute(sa.delete(e).where(e.c.content_hash == victim["content_hash"]))
    result = dg.materialize([vector_index], resources=resources, raise_on_error=False)
    assert not result.success
    description = result.failure_data_for_node("vector_index").user_failure_data.description
    assert f"shards {victim['shard']} (1)" in description and "chunk_embeddings" in description
    assert not result.get_asset_materialization_events()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(e).where(
            e.c.content_hash == victim["content_hash"])).scalar_one() == 0, "vector_index embedded nothing"
    assert registry.list_generations(engine) == [], "no generation was started"
    engine.dispose()
