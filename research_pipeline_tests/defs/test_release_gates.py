"""Release gates in Dagster: a failing blocking check keeps the live generation and stops published_index,
in the same run and (through its automation condition) across runs; a passing run publishes."""

import dagster as dg
import pytest

from research_pipeline.config import Settings
from research_pipeline.defs.resources import ReleaseGatesResource, build_resources
from research_pipeline.defs.search.assets import (
    fts_index,
    published_index,
    vector_index,
)
from research_pipeline.defs.search.checks import release_gates_check
from research_pipeline.lib.core import store
from research_pipeline.lib.release import registry, searchers
from research_pipeline_tests.shared import (
    SAMPLE,
    SEARCH_GROUP,
    load_corpus_rows,
    sample_corpus,
)

SEARCH_DEFS = [fts_index, vector_index, published_index, release_gates_check]
#: Two probe queries keep each gate step short; latency has its own failing case below. `force`
#: builds a new candidate although the corpus is the live generation's (the runs here re-gate it).
FAST_GATES = dg.RunConfig(
    ops={
        "release_gates_check": {"config": {"max_probe_queries": 2}},
        "fts_index": {"config": {"force": True}},
        "vector_index": {"config": {"force": True}},
    }
)
GATES_ONLY = dg.RunConfig(ops={"release_gates_check": {"config": {"max_probe_queries": 2}}})
RELAXED = {"latency_p95_ms": 600_000.0}

pytestmark = pytest.mark.xdist_group(SEARCH_GROUP)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return sample_corpus(tmp_path_factory)


@pytest.fixture
def deployment(tmp_path, corpus):
    """Resources over a fresh SQLite database holding the sample corpus (no generation yet)."""
    settings = Settings(
        home=tmp_path,
        inbox=tmp_path / "inbox",
        database_url=f"sqlite:///{tmp_path / 'rp.db'}",
        object_store_url=str(tmp_path / "objects"),
    )
    resources = build_resources(settings)
    engine = resources["database"].get_engine()
    load_corpus_rows(engine, corpus)
    yield resources
    engine.dispose()


def with_gates(resources: dict, **thresholds) -> dict:
    return {**resources, "release_gates": ReleaseGatesResource(**{**RELAXED, **thresholds})}


def materialize(resources, instance=None, selection=None, run_config=FAST_GATES, **gate_thresholds):
    return dg.materialize(
        SEARCH_DEFS,
        resources=with_gates(resources, **gate_thresholds),
        run_config=run_config,
        instance=instance,
        selection=selection,
        raise_on_error=False,
    )


def materialized_keys(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def check_evaluations(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def run_gen_id(result) -> str:
    mats = {
        e.asset_key.to_user_string(): e.step_materialization_data.materialization
        for e in result.get_asset_materialization_events()
    }
    ids = {mats[k].metadata["gen_id"].value for k in ("fts_index", "vector_index")}
    assert len(ids) == 1, f"fts_index and vector_index of one run built different generations: {ids}"
    return ids.pop()


def test_passing_run_publishes(deployment):
    result = materialize(deployment)
    assert result.success
    assert materialized_keys(result) == {"fts_index", "vector_index", "published_index"}
    gen_id = run_gen_id(result)
    evals = check_evaluations(result)
    assert set(evals) == {f"vector_index_{g}" for g in ("volume", "latency", "quality", "parse_quality", "freshness")}
    assert all(e.passed for e in evals.values())
    assert evals["vector_index_quality"].metadata["ndcg_at_10"].value >= 0.3
    engine = deployment["database"].get_engine()
    assert store.live_generation(engine)["gen_id"] == gen_id
    pub = result.asset_materializations_for_node("published_index")[0]
    assert pub.metadata["gen_id"].value == gen_id
    assert pub.metadata["documents"].value == len(SAMPLE)
    assert pub.metadata["dagster/row_count"].value == 1, "index_pointer holds the live row"
    fts = result.asset_materializations_for_node("fts_index")[0].metadata
    columns = [c.name for c in fts["dagster/column_schema"].value.columns]
    assert "chunk_id" in columns or {"title", "abstract", "body"} <= set(columns), columns
    assert fts["dagster/row_count"].value == fts["fts_rows"].value > 0


@pytest.mark.parametrize(
    "gate, thresholds, expected",
    [
        ("latency", {"latency_p95_ms": 0.0}, "exceeds the SLA"),
        ("volume", {"min_documents": 1_000_000}, "minimum is 1000000"),
        ("quality", {"ndcg_floor": 1.01}, "below the floor"),
    ],
)
def test_failing_gate_keeps_the_live_generation(deployment, embedder, gate, thresholds, expected):
    first = materialize(deployment)
    assert first.success
    live_id = run_gen_id(first)

    result = materialize(deployment, **thresholds)
    assert not result.success
    assert "published_index" not in materialized_keys(result)
    failing = check_evaluations(result)[f"vector_index_{gate}"]
    assert not failing.passed
    assert failing.severity == dg.AssetCheckSeverity.ERROR
    assert expected in failing.description
    assert failing.metadata["gen_id"].value == run_gen_id(result)
    assert failing.metadata["live_gen_id"].value == live_id
    engine = deployment["database"].get_engine()
    candidate = registry.get_generation(engine, run_gen_id(result))
    assert candidate["status"] == "rejected"
    assert candidate["checks"][gate]["passed"] is False
    live = store.live_generation(engine)
    assert live["gen_id"] == live_id
    searcher = searchers.open_searcher(engine, deployment["object_store"].get_store(), embedder)
    assert searcher.search("multi-class confusion matrix in Python", k=3)


def test_gates_hold_across_runs_for_automation(deployment):
    """published_index, launched by automation in its own run, is not requested while a blocking check fails."""
    defs = dg.Definitions(
        assets=[fts_index, vector_index, published_index],
        asset_checks=[release_gates_check],
        resources=with_gates(deployment),
    )
    selection = dg.AssetSelection.assets(published_index)
    engine = deployment["database"].get_engine()
    with dg.instance_for_test() as instance:
        build = dg.AssetSelection.assets(fts_index, vector_index)
        failed = materialize(deployment, instance=instance, selection=build, ndcg_floor=1.01)
        assert not failed.success
        assert materialized_keys(failed) == {"fts_index", "vector_index"}
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
        assert tick.get_num_requested(published_index.key) == 0

        # Launched anyway (e.g. by hand), the publish step refuses the rejected candidate.
        forced = materialize(deployment, instance=instance, selection=selection, run_config=None)
        assert not forced.success
        failure = forced.failure_data_for_node("published_index")
        assert "rejected by its release gates" in str(failure.user_failure_data.description)
        assert store.live_generation(engine) is None

        passed = materialize(deployment, instance=instance, selection=build)
        assert passed.success
        tick = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, asset_selection=selection, cursor=tick.cursor
        )
        assert tick.get_num_requested(published_index.key) == 1
        published = materialize(deployment, instance=instance, selection=selection, run_config=None)
        assert published.success
        assert store.live_generation(engine)["gen_id"] == run_gen_id(passed)
        assert store.counts(engine)["live_generation"] == run_gen_id(passed)


def test_gates_rerun_on_their_own_let_the_publish_proceed(deployment):
    """A candidate built without its gates is not published; the gates, re-run alone (one, then the
    blocking three), judge that candidate, and once they passed the publish goes ahead."""
    build = dg.AssetSelection.assets(fts_index, vector_index).without_checks()
    defs = dg.Definitions(
        assets=[fts_index, vector_index, published_index],
        asset_checks=[release_gates_check],
        resources=with_gates(deployment),
    )
    engine = deployment["database"].get_engine()
    with dg.instance_for_test() as instance:
        built = materialize(deployment, instance=instance, selection=build, run_config=None)
        assert built.success and not check_evaluations(built)
        gen_id = run_gen_id(built)
        refused = materialize(deployment, instance=instance, selection=[published_index.key], run_config=None)
        assert not refused.success
        assert "missing gates" in str(refused.failure_data_for_node("published_index").user_failure_data.description)

        selection = dg.AssetSelection.assets(published_index)
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
        assert tick.get_num_requested(published_index.key) == 0, "no gate has passed yet"

        latency = dg.AssetCheckKey(vector_index.key, "vector_index_latency")
        one = materialize(deployment, instance=instance, selection=dg.AssetSelection.checks(latency), run_config=GATES_ONLY)
        assert one.success
        assert set(check_evaluations(one)) == {"vector_index_latency"}
        assert not materialized_keys(one), "re-running a gate materializes nothing"
        assert check_evaluations(one)["vector_index_latency"].metadata["gen_id"].value == gen_id

        blocking = dg.AssetSelection.checks(
            *(dg.AssetCheckKey(vector_index.key, f"vector_index_{g}") for g in ("volume", "latency", "quality"))
        )
        rerun = materialize(deployment, instance=instance, selection=blocking, run_config=GATES_ONLY)
        assert rerun.success
        assert set(check_evaluations(rerun)) == {"vector_index_volume", "vector_index_latency", "vector_index_quality"}
        assert all(e.passed for e in check_evaluations(rerun).values())
        tick = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, asset_selection=selection, cursor=tick.cursor
        )
        assert tick.get_num_requested(published_index.key) == 1, "the passing re-run lets automation publish"
        published = materialize(deployment, instance=instance, selection=[published_index.key], run_config=None)
        assert published.success
        assert store.live_generation(engine)["gen_id"] == gen_id


def test_a_rejected_candidate_publishes_after_a_passing_gate_rerun(deployment):
    """A transient latency failure rejects the candidate; re-running that gate alone, passing, lets
    automation publish it without rebuilding vector_index."""
    defs = dg.Definitions(
        assets=[fts_index, vector_index, published_index],
        asset_checks=[release_gates_check],
        resources=with_gates(deployment),
    )
    selection = dg.AssetSelection.assets(published_index)
    engine = deployment["database"].get_engine()
    with dg.instance_for_test() as instance:
        build = dg.AssetSelection.assets(fts_index, vector_index)
        failed = materialize(deployment, instance=instance, selection=build, latency_p95_ms=0.0)
        gen_id = run_gen_id(failed)
        latency = check_evaluations(failed)["vector_index_latency"]
        assert not latency.passed
        assert "live_gen_id" not in latency.metadata, "no generation is live: none is named"
        assert registry.get_generation(engine, gen_id)["status"] == "rejected"
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
        assert tick.get_num_requested(published_index.key) == 0

        key = dg.AssetCheckKey(vector_index.key, "vector_index_latency")
        rerun = materialize(deployment, instance=instance, selection=dg.AssetSelection.checks(key), run_config=GATES_ONLY)
        assert rerun.success and check_evaluations(rerun)["vector_index_latency"].passed
        assert not materialized_keys(rerun)
        assert registry.get_generation(engine, gen_id)["status"] == "candidate"
        tick = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, asset_selection=selection, cursor=tick.cursor
        )
        assert tick.get_num_requested(published_index.key) == 1, "the passing re-run lets automation publish"
        published = materialize(deployment, instance=instance, selection=[published_index.key], run_config=None)
        assert published.success
        assert store.live_generation(engine)["gen_id"] == gen_id
