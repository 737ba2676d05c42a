"""Fault drills of `make drill` on Dagster's deployed trio: the daemon killed during a 16-shard
backfill, and the code server killed while the backfill's runs execute.

The topology is the rehearsal's (bench/topology/dagster.py: gRPC code server, webserver and daemon
on a private PostgreSQL with deploy/dagster.prod.yaml, queued run coordinator, run retries and
run monitoring on; here at most 2 runs at once, so the 8 runs of a backfill queue up, and run
monitoring polls every 5 s instead of 60). The corpus is SciFact abstracts in PostgreSQL, chunked
and not yet embedded; each drill backfills `chunk_embeddings` over its 16 shards over GraphQL.

- `daemon_killed_backfill`: once a run of the backfill has succeeded and others are still to
  come, the daemon is SIGKILLed, left down `daemon_down_s`, and started again. Passed: the
  backfill completes with 16 of 16 partitions and every chunk text has its vector.
- `code_server_restart`: new abstracts are added and backfilled; while a run is executing, the
  code server process is SIGKILLed and a new one started. Its run workers are separate processes
  and go on, as the deployed launchers' run containers (DockerRunLauncher) and Jobs
  (K8sRunLauncher) do; runs the daemon launches while the server is down fail to launch, and run
  retries launch them again on the new server. Passed: the backfill completes, 16 of 16, every
  text has its vector, and the runs that were executing at the kill succeeded.
  (With the single-host DefaultRunLauncher, a crash that also kills the run workers leaves their
  runs STARTED: that launcher has no worker health check for run monitoring; docs/runbooks/run-failed.md.)
recovery_s: from the kill until the backfill completed; client_errors: runs that failed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import sqlalchemy as sa
import yaml

from bench import faults
from bench.topology.dagster import FINISHED, Dagster
from bench.topology.pg import PgCluster
from bench.topology.proc import Proc, Stack, poll
from research_pipeline.lib.core import store

SHARDS = list(store.SHARDS)


def _env(work: Path, corpus_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RP_", "DAGSTER_"))}
    inbox = work / "empty-inbox"  # no papers: the inbox sensor launches nothing
    inbox.mkdir(exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RP_HOME=str(work / "rp"), RP_LOG_FORMAT="json",
               RP_DATABASE_URL=corpus_url, RP_OBJECT_STORE_URL=str(work / "objects"), RP_INBOX=str(inbox))  # fmt: skip
    return env


def _monitor_quickly(dagster: Dagster, poll_s: int = 5) -> None:
    path = dagster.home / "dagster.yaml"
    config = yaml.safe_load(path.read_text())
    config["run_monitoring"]["poll_interval_seconds"] = poll_s
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _all_embedded(engine: sa.Engine) -> tuple[int, int]:
    """(chunk texts, of them with a vector of the one model the embeddings hold)."""
    c, e = store.chunks, store.embeddings
    with engine.connect() as conn:
        models = list(conn.execute(sa.select(e.c.model_id).distinct()).scalars())
        texts = set(conn.execute(sa.select(c.c.content_hash)).scalars())
        vectors = set(conn.execute(sa.select(e.c.content_hash)).scalars())
    return len(texts), len(texts & vectors) if len(models) == 1 else 0


def _retried_runs(cluster: PgCluster, backfill_id: str) -> int:
    """Runs of the backfill that are run retries (Dagster tags them with their retry number)."""
    engine = cluster.engine("dagster")
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "select count(*) from run_tags r join run_tags b on b.run_id = r.run_id "
                "where r.key = 'dagster/retry_number' and b.key = 'dagster/backfill' and b.value = :id"
            ), {"id": backfill_id}).scalar_one())  # fmt: skip
    finally:
        engine.dispose()


def _backfill_runs(dagster: Dagster, backfill_id: str) -> list[dict]:
    return dagster.runs({"dagster/backfill": backfill_id})


def _record(name: str, dagster: Dagster, backfill_id: str, killed_at: float, engine: sa.Engine, extra: dict) -> dict:
    backfill = dagster.wait_backfill(backfill_id, 900)
    recovery = time.monotonic() - killed_at
    stats = dagster.partition_stats("chunk_embeddings")
    runs = _backfill_runs(dagster, backfill_id)
    by_status: dict[str, int] = {}
    for run in runs:
        by_status[run["status"]] = by_status.get(run["status"], 0) + 1
    texts, embedded = _all_embedded(engine)
    passed = (backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS") and stats["numMaterialized"] == 16
              and stats["numFailed"] == 0 and texts == embedded > 0)  # fmt: skip
    return {
        "name": name, "passed": passed, "lost_rows": texts - embedded, "recovery_s": round(recovery, 3),
        "client_errors": by_status.get("FAILURE", 0), "backfill_status": backfill["status"],
        "partitions_materialized": stats["numMaterialized"], "runs_by_status": by_status,
        "chunk_texts": texts, "embedded": embedded, **extra,
        "detail": f"backfill {backfill['status']} {recovery:.1f} s after the kill, {stats['numMaterialized']}/16 "
                  f"partitions, {embedded}/{texts} texts embedded, runs {by_status}",
    }  # fmt: skip


def run(work: Path, n_records: int = 1600, daemon_down_s: float = 10.0) -> list[dict]:
    """Both drills on one topology; their records for the summary."""
    work = Path(work)
    logs = work / "dagster-drill-logs"
    stack = Stack()
    cluster = PgCluster(work / "dagster-drill-pg")
    engine = None
    try:
        cluster.init().start()
        stack.callback(cluster.stop)
        with cluster.engine(isolation_level="AUTOCOMMIT").connect() as conn:
            for db in ("rp", "dagster"):
                conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
        engine = store.make_engine(cluster.url("rp"))
        store.create_schema(engine)
        records = faults.scifact_records(n_records + n_records // 2)
        faults.load_records(engine, records[:n_records])
        env = _env(work, cluster.url("rp"))
        dagster = Dagster(work / "dagster", logs, env, "127.0.0.1", cluster.port, "dagster", max_runs=2,
                          migration_limit=1)  # fmt: skip
        _monitor_quickly(dagster)
        for proc in dagster.processes({}):
            stack.start(proc)
        dagster.grpc.wait_ready()
        dagster.webserver.wait_ready()
        dagster.wait_location()
        drills = []

        # daemon_killed_backfill
        backfill_id = dagster.backfill("chunk_embeddings", SHARDS)

        def one_done_more_to_come():
            runs = _backfill_runs(dagster, backfill_id)
            done = [r for r in runs if r["status"] in FINISHED]
            return any(r["status"] == "SUCCESS" for r in done) and len(done) < 8

        poll(one_done_more_to_come, 600, "a first backfill run to succeed", dagster.alive())
        before = {r["runId"] for r in _backfill_runs(dagster, backfill_id) if r["status"] in FINISHED}
        killed_at = time.monotonic()
        os.killpg(dagster.daemon.pid, signal.SIGKILL)
        dagster.daemon.proc.wait(30)
        time.sleep(daemon_down_s)  # the outage itself: the daemon stays down this long
        dagster.daemon = stack.start(Proc("dagster_daemon_2", dagster.daemon.argv, logs, env=dagster.env,
                                          cwd=dagster.workdir))  # fmt: skip
        drills.append(_record("daemon_killed_backfill", dagster, backfill_id, killed_at, engine,
                              {"runs_finished_before_kill": len(before), "daemon_down_s": daemon_down_s}))  # fmt: skip

        # code_server_restart
        faults.load_records(engine, records[n_records:])
        backfill_id = dagster.backfill("chunk_embeddings", SHARDS)

        def a_run_executing():
            return any(r["status"] == "STARTED" for r in _backfill_runs(dagster, backfill_id))

        poll(a_run_executing, 600, "a run of the second backfill to start", dagster.alive())
        executing = [r["runId"] for r in _backfill_runs(dagster, backfill_id) if r["status"] == "STARTED"]
        killed_at = time.monotonic()
        # The server process only: its run workers are separate processes that go on, as the
        # deployed launchers' run containers (Docker) and Jobs (Kubernetes) do.
        os.kill(dagster.grpc.pid, signal.SIGKILL)
        dagster.grpc.proc.wait(30)
        orphans = dagster.grpc  # its process group: the surviving run workers, stopped at the end
        stack.add(orphans)
        dagster._restarts += 1
        dagster.grpc = stack.start(dagster.code_server({}))
        dagster.grpc.wait_ready()
        dagster.wait_location()
        record = _record("code_server_restart", dagster, backfill_id, killed_at, engine,
                         {"runs_executing_at_kill": len(executing)})  # fmt: skip
        statuses = {r["runId"]: r["status"] for r in _backfill_runs(dagster, backfill_id)}
        record["executing_at_kill_finished"] = {run_id: statuses.get(run_id) for run_id in executing}
        record["retried_runs"] = _retried_runs(cluster, backfill_id)
        record["passed"] = record["passed"] and all(v == "SUCCESS" for v in record["executing_at_kill_finished"].values())
        drills.append(record)
        return drills
    finally:
        if engine is not None:
            engine.dispose()
        stack.stop_all()
