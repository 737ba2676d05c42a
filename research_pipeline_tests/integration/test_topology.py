"""The deployed topology on loopback: gRPC code server + webserver + daemon on PostgreSQL storage.

Starts the three real processes the way docker/docker-compose.yaml does (same instance file,
docker/dagster.yaml, pointed at a fresh PostgreSQL database), checks that the webserver's
GraphQL API sees the code location and its jobs, launches a one-paper ingest run (the
`documents` step of ingest_job) through GraphQL, waits for the daemon's run queue to launch it and for it to succeed, then stops every
process it started (and their children) and checks that none is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.error

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline_tests.shared import (
    BIN,
    DEMO_PAPERS,
    LAUNCH_MUTATION,
    RELOAD_MUTATION,
    REPO,
    RUN_QUERY,
    WORKSPACE_QUERY,
    drop_pg_database,
    free_port,
    graphql,
    make_pg_database,
    port_open,
    stop_process_groups,
    wait_for,
    webserver_up,
    write_deployed_instance,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_grpc_webserver_daemon_launch_a_run_on_postgres_storage(tmp_path, pg_server):
    dagster_db = make_pg_database("rp_topology")
    procs: dict[str, subprocess.Popen] = {}
    try:
        home = tmp_path / "dagster_home"
        home.mkdir()
        write_deployed_instance(home)
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        paper = min(DEMO_PAPERS.glob("*.pdf"), key=lambda p: p.stat().st_size)
        shutil.copy(paper, inbox / paper.name)
        corpus_url = f"sqlite:///{tmp_path / 'rp' / 'rp.db'}"
        pg = sa.engine.make_url(dagster_db)
        grpc_port, web_port = free_port(), free_port()
        (tmp_path / "workspace.yaml").write_text(
            f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {grpc_port}\n"
            f"      location_name: research_pipeline\n"
        )
        env = dict(
            os.environ,
            DAGSTER_HOME=str(home),
            DAGSTER_PG_HOST=pg.host or "127.0.0.1",
            DAGSTER_PG_DB=pg.database,
            DAGSTER_PG_USERNAME=pg.username or "postgres",
            # Trust authentication on the test server ignores it; the instance file requires one.
            DAGSTER_PG_PASSWORD=pg.password or "unused",
            RP_HOME=str(tmp_path / "rp"),
            RP_INBOX=str(inbox),
            RP_DATABASE_URL=corpus_url,
            RP_OBJECT_STORE_URL=str(tmp_path / "objects"),
        )
        logs = tmp_path / "logs"
        logs.mkdir()

        def start(name: str, *args: str) -> None:
            out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            procs[name] = subprocess.Popen(
                list(args), cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

        start("grpc", str(BIN / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(grpc_port),
              "-m", "research_pipeline.definitions", "-d", str(REPO))
        wait_for(lambda: port_open(grpc_port), 90, "the gRPC code server", procs)
        start("webserver", str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port),
              "-w", str(tmp_path / "workspace.yaml"))
        start("daemon", str(BIN / "dagster-daemon"), "run", "-w", str(tmp_path / "workspace.yaml"))

        try:
            wait_for(lambda: webserver_up(web_port), 60, "the webserver", procs)

            def location_loaded():
                try:
                    data = graphql(web_port, WORKSPACE_QUERY)["workspaceOrError"]
                except urllib.error.HTTPError as exc:  # the workspace is (re)loading
                    if exc.code < 500:
                        raise
                    return None
                entry = next((e for e in data.get("locationEntries", []) if e["name"] == "research_pipeline"), None)
                loc = entry and entry["locationOrLoadError"]
                if loc and loc["__typename"] == "PythonError":
                    if "UNAVAILABLE" not in loc["message"]:
                        pytest.fail(f"code location failed to load: {loc['message']}")
                    # The server bound its port but was not serving yet: ask for a reload.
                    graphql(web_port, RELOAD_MUTATION, {"name": "research_pipeline"})
                    return None
                return loc if loc and loc["__typename"] == "RepositoryLocation" else None

            location = wait_for(location_loaded, 60, "the code location over gRPC", procs)
            repo = location["repositories"][0]
            jobs = {j["name"] for j in repo["jobs"]}
            assert {"ingest_job", "embed_job"} <= jobs
            assert "new_papers_sensor" in {s["name"] for s in repo["sensors"]}

            launched = graphql(
                web_port,
                LAUNCH_MUTATION,
                {
                    "params": {
                        "selector": {
                            "repositoryLocationName": "research_pipeline",
                            "repositoryName": repo["name"],
                            "jobName": "ingest_job",
                            # Only the ingest step: the run worker need not load the model.
                            "assetSelection": [{"path": ["documents"]}],
                        },
                        "runConfigData": {
                            "ops": {"documents": {"config": {"workers": 1}}},
                            # One step: run it in the run worker instead of a further subprocess.
                            "execution": {"config": {"in_process": {}}},
                        },
                    }
                },
            )["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            run_id = launched["run"]["runId"]
            # The instance uses the QueuedRunCoordinator: only the daemon can move the run on.
            assert launched["run"]["status"] in ("QUEUED", "NOT_STARTED", "STARTING", "STARTED")

            def finished():
                status = graphql(web_port, RUN_QUERY, {"runId": run_id})["runOrError"]["status"]
                return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

            status = wait_for(finished, 150, f"run {run_id}", procs)
            assert status == "SUCCESS", (logs / "grpc.log").read_text()[-4000:]
        finally:
            stop_process_groups(procs)

        for name, proc in procs.items():
            assert proc.poll() is not None, f"{name} still running"
            assert not _group_alive(proc.pid), f"a child of {name} is still running"

        # The run really went through PostgreSQL storage, and really ingested the paper.
        engine = sa.create_engine(dagster_db)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select count(*) from runs where run_id = :r"), {"r": run_id}).scalar() == 1
        engine.dispose()
        corpus = store.make_engine(corpus_url)
        counts = store.counts(corpus)
        assert counts["documents"] + counts["quarantined"] == 1
        corpus.dispose()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        drop_pg_database(dagster_db)
