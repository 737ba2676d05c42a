"""The fault drills of `make drill`, small scale: S3 answering 20% of requests 503 during a
publish and a backup (real HTTP through the TLS front, pgBackRest and the pipeline's own S3
client), a disk that fills while a generation is built (a real tmpfs of fixed size), and
PostgreSQL restarted in the middle of reindex_job (a private cluster)."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from bench import faults
from bench.topology.pg import PgBackRestArchive, PgCluster, make_workdir, remove_workdir
from bench.topology.pgbackrest import DEPLOY_CONF, STANZA, PgBackRestRepo, TlsMoto
from research_pipeline.lib.core import store

pytestmark = pytest.mark.integration


def test_s3_503s_during_publish_and_backup_are_retried_and_nothing_is_half_written(embedder):
    work = make_workdir("rp-s3-503-")
    s3 = TlsMoto(work, fault_percent=20)
    cluster = PgCluster(work / "pg", archive=PgBackRestArchive(STANZA, DEPLOY_CONF), settings={"archive_timeout": "2"})
    try:
        s3.start()
        s3.create_bucket("rp-backups")
        repo = PgBackRestRepo(s3, "rp-backups", cluster, work / "pgbackrest")
        cluster.init().start(env=repo.env())
        engine = store.make_engine(cluster.url())
        store.create_schema(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(store.query_log), [{"ts": store.utcnow(), "query": f"q{i}", "latency_ms": 1.0,
                                                       "n_results": 1} for i in range(50)])  # fmt: skip
        engine.dispose()
        repo.stanza_create()
        repo.backup("full")  # through the clean endpoint: the diff below goes through the faults
        drill = faults.s3_503(work, s3, repo, n_records=60, embedder=embedder)
    finally:
        cluster.stop(mode="immediate")
        s3.stop()
        remove_workdir(work)
    assert drill["errors"] == [], drill
    assert drill["injected_during_publish"] > 0 and drill["injected_during_backup"] > 0, drill
    assert 0.05 < drill["injected_503"] / drill["requests"] < 0.45, drill
    assert drill["passed"], drill


@pytest.mark.skipif(os.geteuid() != 0, reason="the disk_full drill mounts a tmpfs of fixed size (root)")
def test_disk_full_drill_keeps_the_live_generation(tmp_path, embedder):
    drill = faults.disk_full(tmp_path, n_records=150, size_mb=32, embedder=embedder)
    assert drill["error"] and "out of disk space" in drill["error"], drill
    assert drill["live_untouched"] and drill["partial_files_left"] == 0, drill
    assert drill["client_errors"] == 0 and drill["searches_answered"] > 0, drill
    assert drill["lost_rows"] == 0 and drill["passed"], drill


def test_postgresql_restarted_mid_reindex_the_run_retries_and_loses_nothing():
    work = make_workdir("rp-pg-restart-")  # a folder the cluster's OS user may enter
    try:
        drill = faults.pg_restart_mid_reindex(work, n_papers=2)
    finally:
        remove_workdir(work)
    assert "restarted mid-run" in drill["detail"], drill
    assert drill["step_retries"] >= 1, drill  # the restart hit a step, and its RetryPolicy ran it again
    assert all(d == {"missing": 0, "extra": 0} for d in drill["diff"].values()), drill
    assert drill["passed"], drill
