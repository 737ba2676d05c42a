"""A release gate re-run on its own through the webserver's GraphQL API lets the publish proceed.

A candidate generation is built on a sample corpus (fts_index, vector_index and the gates, in
process) under a latency SLA nothing meets, so the latency gate rejects it. A real
`dagster-webserver` (with a `dagster-daemon` that launches the queued run and evaluates the
automation sensor) then gets `launchRun` with only the `vector_index_latency` check selected,
under the real SLA. The run executes that one check against the candidate and materializes
nothing; the passing result makes the candidate publishable again, and the daemon's
`publish_automation_sensor` publishes it (`published_index` in a run of its own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.error

import dagster as dg
import pytest

from research_pipeline.config import Settings
from research_pipeline.defs.resources import ReleaseGatesResource, build_resources
from research_pipeline.defs.search.assets import fts_index, published_index, vector_index
from research_pipeline.defs.search.checks import release_gates_check
from research_pipeline.lib.core import store
from research_pipeline.lib.release import registry
from research_pipeline_tests.shared import (
    BIN,
    LAUNCH_MUTATION,
    RUN_QUERY,
    WORKSPACE_QUERY,
    free_port,
    graphql,
    load_corpus_rows,
    sample_corpus,
    stop_process_groups,
    wait_for,
    webserver_up,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHECK_RUNS_QUERY = """
query Runs($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status assetSelection { path } assetCheckSelection { name } } }
}
"""


def test_a_gate_is_rerun_alone_over_graphql(tmp_path, tmp_path_factory):
    corpus_url = f"sqlite:///{tmp_path / 'rp.db'}"
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    settings = Settings(home=tmp_path, inbox=tmp_path / "inbox", database_url=corpus_url,
                        object_store_url=str(tmp_path / "objects"))
    resources = build_resources(settings)
    engine = resources["database"].get_engine()
    load_corpus_rows(engine, sample_corpus(tmp_path_factory))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # A transient latency failure: an SLA of 0 ms that no search meets.
        built = dg.materialize(
            [fts_index, vector_index, published_index, release_gates_check],
            resources={**resources, "release_gates": ReleaseGatesResource(latency_p95_ms=0.0)},
            instance=instance,
            selection=dg.AssetSelection.assets(fts_index, vector_index),
            run_config={"ops": {"release_gates_check": {"config": {"max_probe_queries": 2}}}},
            raise_on_error=False,
        )
        assert not built.success, "the latency gate failed the run"
        gen_id = built.asset_materializations_for_node("vector_index")[0].metadata["gen_id"].value
    gen = registry.get_generation(engine, gen_id)
    assert gen["status"] == "rejected" and gen["checks"]["latency"]["passed"] is False
    assert gen["checks"]["volume"]["passed"] and gen["checks"]["quality"]["passed"]

    port = free_port()
    env = dict(os.environ, DAGSTER_HOME=str(home), RP_HOME=str(tmp_path), RP_DATABASE_URL=corpus_url,
               RP_OBJECT_STORE_URL=str(tmp_path / "objects"), RP_INBOX=str(tmp_path / "inbox"),
               RP_GATE_LATENCY_P95_MS="600000", RP_SENSOR_INTERVAL_S="5")
    log = open(tmp_path / "webserver.log", "wb")  # noqa: SIM115 - closed below
    procs = {"webserver": subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-m", "research_pipeline.definitions"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )}
    # The instance queues runs (Dagster's default run coordinator): the daemon launches them.
    procs["daemon"] = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-m", "research_pipeline.definitions"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: webserver_up(port), 120, "the webserver", procs)

        def loaded():
            try:
                data = graphql(port, WORKSPACE_QUERY)["workspaceOrError"]
            except urllib.error.HTTPError:
                return None
            locs = [e["locationOrLoadError"] for e in data.get("locationEntries", [])]
            return next((loc for loc in locs if loc and loc["__typename"] == "RepositoryLocation"), None)

        location = wait_for(loaded, 120, "the code location", procs)
        launched = graphql(port, LAUNCH_MUTATION, {"params": {
            "selector": {
                "repositoryLocationName": location["name"],
                "repositoryName": location["repositories"][0]["name"],
                "jobName": "__ASSET_JOB",
                "assetSelection": [],
                "assetCheckSelection": [{"assetKey": {"path": ["vector_index"]}, "name": "vector_index_latency"}],
            },
            "runConfigData": {"ops": {"release_gates_check": {"config": {"max_probe_queries": 2}}}},
        }})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        def finished():
            status = graphql(port, RUN_QUERY, {"runId": run_id})["runOrError"]["status"]
            return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

        assert wait_for(finished, 300, f"run {run_id}", procs) == "SUCCESS", (tmp_path / "webserver.log").read_text()[-4000:]
        run = graphql(port, CHECK_RUNS_QUERY, {"runId": run_id})["runOrError"]
        assert [c["name"] for c in run["assetCheckSelection"]] == ["vector_index_latency"]
        # Re-admitted (the daemon's automation sensor may already have published it meanwhile).
        assert registry.get_generation(engine, gen_id)["status"] in ("candidate", "published")

        # The daemon's automation sensor (every 5 s here) sees the blocking gates pass and publishes.
        # Done when the pointer has moved *and* the publishing run has recorded its
        # materialization (it does so after the pointer flips; stopping in between loses it).
        with dg.DagsterInstance.from_config(str(home)) as watcher:
            def published():
                live = store.live_generation(engine)
                if live is None or live["gen_id"] != gen_id:
                    return False
                event = watcher.get_latest_materialization_event(published_index.key)
                live_meta = event.asset_materialization.metadata.get("live_gen_id") if event else None
                return live_meta is not None and live_meta.value == gen_id

            wait_for(published, 240, f"publish_automation_sensor to publish {gen_id}", procs)
    finally:
        stop_process_groups(procs)
        log.close()
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    checks = registry.get_generation(engine, gen_id)["checks"]
    assert checks["latency"]["passed"] is True, "the re-run judged the candidate"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(vector_index.key, "vector_index_latency")]
        )[dg.AssetCheckKey(vector_index.key, "vector_index_latency")]
        assert record.run_id == run_id
        assert instance.get_latest_materialization_event(vector_index.key).run_id == built.run_id
        publish_event = instance.get_latest_materialization_event(published_index.key)
        assert publish_event.run_id not in (built.run_id, run_id), "published by a run of its own"
        assert publish_event.asset_materialization.metadata["live_gen_id"].value == gen_id
    engine.dispose()

