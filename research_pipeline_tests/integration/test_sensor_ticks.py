"""The inbox sensor and the cache-warming sensor, ticked by a real `dagster-daemon`.

A store holds one real paper (ingested, chunked, embedded, indexed: generation A published,
generation B gated beside it). A `dagster-webserver` (for GraphQL) and a `dagster-daemon` run the
code location with RP_SENSOR_INTERVAL_S=5 and a run queue that launches nothing
(`max_concurrent_runs: 0`): every run a sensor requests is recorded, queued, and counted here;
what the runs do is tested elsewhere (reindex_job and warm_cache_job in process, the backfill in
test_daemon.py).

- `new_papers_sensor`, turned on over GraphQL: its first tick over the already-indexed inbox
  starts nothing, the next ones neither; a paper moved into the inbox gives exactly one
  reindex_job run, and the ticks after it none.
- `published_index_sensor` (running by default): one warm_cache_job run for the live generation
  A, none on the ticks after; publishing B gives exactly one more, for B.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.error

import dagster as dg
import pytest

from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline.lib.ingest.chunking import chunk_documents
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import sources_for
from research_pipeline.lib.release import publish
from research_pipeline_tests.shared import (
    BIN,
    WORKSPACE_QUERY,
    free_port,
    gated,
    graphql,
    small_papers,
    stop_process_groups,
    wait_for,
    webserver_up,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START_SENSOR = """
mutation Start($sel: SensorSelector!) {
  startSensor(sensorSelector: $sel) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}
"""

TICKS = """
query Ticks($sel: SensorSelector!) {
  sensorOrError(sensorSelector: $sel) {
    __typename
    ... on Sensor { sensorState { status ticks(limit: 100) { id status timestamp runIds skipReason error { message } } } }
  }
}
"""

#: A Dagster instance whose run queue launches nothing: requested runs stay queued, countable.
DAGSTER_YAML = "telemetry:\n  enabled: false\nrun_queue:\n  max_concurrent_runs: 0\n"


def test_inbox_and_cache_sensors_fire_once_per_change_through_the_daemon(tmp_path, embedder):
    first_paper, new_paper = small_papers(2)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(first_paper, inbox / first_paper.name)
    (tmp_path / "rp").mkdir()
    corpus_url = f"sqlite:///{tmp_path / 'rp' / 'rp.db'}"
    engine = store.make_engine(corpus_url)
    store.create_schema(engine)
    objects = LocalObjectStore(tmp_path / "objects")
    assert ingest(engine, sources_for(inbox), workers=1, ocr=False).documents_new == 1
    chunk_documents(engine, embedder.count_tokens)
    gen_a = gated(engine, objects, embedder, probes=1)
    publish.publish(engine, gen_a["gen_id"], store=objects)
    gen_b = gated(engine, objects, embedder, probes=1)
    assert gen_b["status"] == "candidate", gen_b["checks"]

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        # Create the instance's SQLite storages here, once: the webserver and the daemon both
        # initialising a fresh instance at the same moment race on its schema (alembic_version).
        instance.get_runs(limit=1)
        instance.all_instigator_state()
        instance.get_latest_materialization_event(dg.AssetKey("documents"))
    env = dict(
        os.environ,
        DAGSTER_HOME=str(home),
        RP_HOME=str(tmp_path / "rp"),
        RP_INBOX=str(inbox),
        RP_DATABASE_URL=corpus_url,
        RP_OBJECT_STORE_URL=str(tmp_path / "objects"),
        RP_REDIS_URL="redis://127.0.0.1:6379/0",
        RP_SENSOR_INTERVAL_S="5",
    )
    port = free_port()
    log = open(tmp_path / "processes.log", "wb")  # noqa: SIM115 - closed below
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, args in (
            ("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port)]),
            ("daemon", [str(BIN / "dagster-daemon"), "run"]),
        ):
            procs[name] = subprocess.Popen(
                [*args, "-m", "research_pipeline.definitions"], cwd=tmp_path, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for(lambda: webserver_up(port), 120, "the webserver", procs)

        def loaded():
            try:
                data = graphql(port, WORKSPACE_QUERY)["workspaceOrError"]
            except urllib.error.HTTPError:
                return None
            locs = [e["locationOrLoadError"] for e in data.get("locationEntries", [])]
            for loc in locs:
                if loc and loc["__typename"] == "PythonError":
                    pytest.fail(f"code location failed to load: {loc['message']}")
            return next((loc for loc in locs if loc and loc["__typename"] == "RepositoryLocation"), None)

        location = wait_for(loaded, 120, "the code location", procs)

        def selector(sensor: str) -> dict:
            return {"repositoryLocationName": location["name"],
                    "repositoryName": location["repositories"][0]["name"], "sensorName": sensor}

        def ticks(sensor: str) -> list[dict]:
            """The sensor's finished ticks, oldest first."""
            data = graphql(port, TICKS, {"sel": selector(sensor)})["sensorOrError"]
            state = data["sensorState"]
            done = [t for t in state["ticks"] if t["status"] != "STARTED"]
            return sorted(done, key=lambda t: t["timestamp"])

        def runs(job: str) -> list[dg.DagsterRun]:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                return instance.get_runs(dg.RunsFilter(job_name=job))

        started = graphql(port, START_SENSOR, {"sel": selector("new_papers_sensor")})["startSensor"]
        assert started["__typename"] == "Sensor", started

        wait_for(lambda: len(ticks("new_papers_sensor")) >= 2 and len(ticks("published_index_sensor")) >= 2,
                 180, "two ticks of each sensor", procs)
        inbox_ticks = ticks("new_papers_sensor")
        for tick in inbox_ticks:
            assert tick["status"] == "SKIPPED" and not tick["runIds"], (tick, inbox_ticks)
        assert "first tick: all 1 files" in inbox_ticks[0]["skipReason"], "the first tick starts from the store"
        assert "no new or changed files" in inbox_ticks[1]["skipReason"]
        cache_ticks = ticks("published_index_sensor")
        assert cache_ticks[0]["status"] == "SUCCESS" and len(cache_ticks[0]["runIds"]) == 1, cache_ticks
        for tick in cache_ticks[1:]:
            assert tick["status"] == "SKIPPED" and "already warmed" in tick["skipReason"], cache_ticks
        assert runs("reindex_job") == []
        [warm_a] = runs("warm_cache_job")
        assert warm_a.tags["research_pipeline/gen_id"] == gen_a["gen_id"]
        assert warm_a.status == dg.DagsterRunStatus.QUEUED

        # A paper arrives (moved in whole, as a finished upload is) and B goes live.
        staged = tmp_path / new_paper.name
        shutil.copy(new_paper, staged)
        os.replace(staged, inbox / new_paper.name)
        publish.publish(engine, gen_b["gen_id"], store=objects)
        seen = {"new_papers_sensor": len(inbox_ticks), "published_index_sensor": len(cache_ticks)}

        def fired_then_skipped(sensor: str) -> list[dict] | None:
            """The ticks since the change, once one requested runs and a later one did not."""
            later = ticks(sensor)[seen[sensor]:]
            firing = [i for i, t in enumerate(later) if t["runIds"]]
            return later if firing and len(later) > firing[0] + 1 else None

        inbox_later = wait_for(lambda: fired_then_skipped("new_papers_sensor"), 120, "the inbox sensor to fire", procs)
        cache_later = wait_for(lambda: fired_then_skipped("published_index_sensor"), 120,
                               "the cache sensor to fire", procs)
        for later, reason in ((inbox_later, "no new or changed files"), (cache_later, "already warmed")):
            firing = [t for t in later if t["runIds"]]
            assert len(firing) == 1 and len(firing[0]["runIds"]) == 1, later
            after = later[later.index(firing[0]) + 1:]
            assert all(t["status"] == "SKIPPED" and reason in t["skipReason"] for t in after), later
        [reindex] = runs("reindex_job")
        assert [t["runIds"] for t in inbox_later if t["runIds"]] == [[reindex.run_id]]
        assert reindex.tags["dagster/sensor_name"] == "new_papers_sensor"
        assert reindex.tags["dagster/run_key"].startswith("inbox-")
        assert reindex.tags["research_pipeline/inbox_files"] == "2"
        warmed = {r.tags["research_pipeline/gen_id"] for r in runs("warm_cache_job")}
        assert len(runs("warm_cache_job")) == 2 and warmed == {gen_a["gen_id"], gen_b["gen_id"]}
    finally:
        stop_process_groups(procs)
        log.close()
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        engine.dispose()
