"""The restore path, small scale: pgBackRest backups + archived WAL in S3, destroy, restore, verify.

A private PostgreSQL 15 cluster (bench/topology/pg.py, never the machine's 5432) archives its
WAL with the deployed pgBackRest configuration (deploy/pgbackrest/pgbackrest.conf) to a real S3
endpoint: moto's server behind a TLS front (pgBackRest 2.45 has no plain-HTTP S3). The corpus
schema and a few rows go in, a full backup is taken, more rows are committed after it, a
manifest (rows and checksum per table, live generation) is recorded, the data directory is
destroyed and restored to the latest point: nothing committed and archived is lost. Then a PITR
restore to a timestamp before a deliberate bad write shows the bad write absent and the good
rows present. RPO (seconds from the last commit until its WAL is in S3: what a disaster at the
worst moment would lose) and RTO (seconds from the destruction until the restored server answers
queries and accepts writes) are printed as JSON lines.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import dagster as dg
import pytest
import sqlalchemy as sa

from bench.topology.pg import PgBackRestArchive, PgCluster, as_pg_user, make_workdir, remove_workdir
from bench.topology.pgbackrest import DEPLOY_CONF, STANZA, PgBackRestRepo, TlsMoto
from research_pipeline.lib.backup.manifest import compare, take_manifest
from research_pipeline.lib.backup.pgbackrest import BackupError, PgBackRest, freshness
from research_pipeline.lib.core import store

pytestmark = pytest.mark.integration

CORPUS_DB = "research_pipeline"


def _doc(i: int, title: str) -> dict:
    doc_id = f"{i:064x}"
    return {
        "doc_id": doc_id,
        "shard": doc_id[0],
        "source_kind": "record",
        "title": title,
        "authors": '["A. Author"]',
        "year": 2020 + i % 5,
        "abstract": f"abstract {i}",
        "page_count": 1,
        "text": f"text of paper {i}",
        "page_offsets": "[0]",
        "parser": "test",
        "parser_version": "1",
        "quality": 1.0,
        "ingested_at": store.utcnow(),
    }


def _chunk(i: int) -> dict:
    doc_id = f"{i:064x}"
    return {
        "chunk_id": f"{i + 10_000:064x}",
        "doc_id": doc_id,
        "shard": doc_id[0],
        "ordinal": 0,
        "section": "body",
        "page_start": 0,
        "page_end": 0,
        "char_start": 0,
        "char_end": 16,
        "n_tokens": 4,
        "content_hash": f"{i + 20_000:064x}",
        "text": f"text of paper {i}",
    }


def _write(engine: sa.Engine, ids: range) -> None:
    with engine.begin() as conn:
        store.upsert(conn, store.documents, [_doc(i, f"paper {i}") for i in ids], ["doc_id"])
        store.upsert(conn, store.chunks, [_chunk(i) for i in ids], ["chunk_id"])
        conn.execute(
            sa.insert(store.query_log),
            [{"ts": store.utcnow(), "query": f"q{i}", "latency_ms": 1.0, "n_results": 1} for i in ids],
        )


def _publish(engine: sa.Engine, gen_id: str) -> None:
    with engine.begin() as conn:
        row = {
            "gen_id": gen_id, "status": "published", "model_id": "m", "fts_table": f"fts_{gen_id}",
            "vector_key": f"indexes/{gen_id}/manifest.json", "created_at": store.utcnow(),
            "published_at": store.utcnow(),
        }  # fmt: skip
        store.upsert(conn, store.index_generations, [row], ["gen_id"])
        ptr = {"name": "live", "gen_id": gen_id, "updated_at": store.utcnow()}
        store.upsert(conn, store.index_pointer, [ptr], ["name"])


@pytest.fixture(scope="module")
def backed_up():
    """A cluster with the corpus schema and rows, WAL archived to S3, one full backup taken."""
    work = make_workdir("rp-restore-")
    s3 = TlsMoto(work)
    cluster = None
    try:
        s3.start()
        s3.create_bucket("rp-backups")
        cluster = PgCluster(
            work / "pg", archive=PgBackRestArchive(STANZA, DEPLOY_CONF), settings={"archive_timeout": "2"}
        )
        repo = PgBackRestRepo(s3, "rp-backups", cluster, work / "pgbackrest")
        cluster.init().start(env=repo.env())
        with cluster.engine(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(sa.text(f"create database {CORPUS_DB}"))
        engine = store.make_engine(cluster.url(CORPUS_DB))
        store.create_schema(engine)
        _write(engine, range(0, 20))
        _publish(engine, "20261204T000000-aaaaaa")
        engine.dispose()
        repo.stanza_create()
        repo.check()
        repo.backup("full")
        tool = PgBackRest(
            STANZA, config=DEPLOY_CONF, env={**os.environ, **repo.env()}, prefix=tuple(as_pg_user([]))
        )
        yield cluster, repo, tool
    finally:
        if cluster is not None:
            cluster.stop(mode="immediate")
        s3.stop()
        remove_workdir(work)


def test_backup_is_listed_fresh_and_verifies(backed_up):
    _, _, tool = backed_up
    info = tool.info()
    latest = info.latest()
    assert latest is not None and latest.type == "full"
    assert latest.repo_size > 0 and latest.size > latest.repo_size  # compressed into S3
    fresh = freshness(info, max_age_s=3600)
    assert fresh.passed, fresh.description
    assert not freshness(info, max_age_s=0, now=datetime.now(timezone.utc)).passed
    report = tool.verify()
    assert report.ok, report.text


def test_restore_to_latest_loses_no_committed_row(backed_up, tmp_path):
    cluster, repo, _ = backed_up
    engine = store.make_engine(cluster.url(CORPUS_DB))
    _write(engine, range(20, 30))  # committed after the backup: only the archived WAL has them
    _publish(engine, "20261204T010000-bbbbbb")
    committed = time.monotonic()
    archived = cluster.wait_archived()
    before = take_manifest(engine)
    engine.dispose()
    assert before.tables["documents"].rows == 30

    started = time.monotonic()
    cluster.destroy()
    assert not cluster.data_dir.exists()
    cluster.prepare_empty_data_dir()
    repo.restore()
    cluster.start()
    serving = cluster.wait_serving(CORPUS_DB, "select count(*) from documents")

    engine = store.make_engine(cluster.url(CORPUS_DB))
    with engine.connect() as conn:
        # Part of the procedure (docs/runbooks/restore.md): after the end of recovery PostgreSQL 15's
        # checkpointer sleeps up to checkpoint_timeout before it honours archive_timeout again (seen
        # here: no segment switch in 60 s without it); a CHECKPOINT wakes it, bounding the RPO again.
        conn.execute(sa.text("checkpoint"))
    diff = compare(before, take_manifest(engine))
    assert diff.ok, diff.describe()
    assert diff.lost_rows == 0
    _write(engine, range(30, 31))  # writable again, and archiving on the new timeline works
    engine.dispose()
    repo.check()
    figures = {
        "drill": "restore_latest",
        "rpo_s": round(archived - committed, 3),
        "rto_s": round(serving - started, 3),
        "lost_rows": diff.lost_rows,
        "rows": sum(t.rows for t in before.tables.values()),
    }
    print(json.dumps(figures))
    assert figures["rpo_s"] < 60 and figures["rto_s"] < 120


def test_point_in_time_restore_before_a_bad_write(backed_up):
    cluster, repo, _ = backed_up
    assert cluster.running(), "the previous restore left no running cluster"
    engine = store.make_engine(cluster.url(CORPUS_DB))
    _write(engine, range(40, 45))  # good, committed before the target
    good = take_manifest(engine)
    with engine.connect() as conn:
        target = conn.execute(sa.text("select clock_timestamp()")).scalar_one()
    with engine.begin() as conn:  # the deliberate bad write: a wrong bulk delete and update
        conn.execute(sa.delete(store.chunks))
        conn.execute(sa.update(store.documents).values(title="oops"))
    bad = take_manifest(engine)
    assert compare(good, bad).changed["documents"] == good.tables["documents"].rows
    cluster.wait_archived()  # recovery must see WAL past the target to stop there
    engine.dispose()

    started = time.monotonic()
    cluster.destroy()
    cluster.prepare_empty_data_dir()
    repo.restore(target_time=target.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00"))
    cluster.start()
    serving = cluster.wait_serving(CORPUS_DB, "select count(*) from documents")

    engine = store.make_engine(cluster.url(CORPUS_DB))
    diff = compare(good, take_manifest(engine))
    engine.dispose()
    assert diff.ok, diff.describe()  # the bad write is absent, the good rows are there
    print(json.dumps({"drill": "restore_pitr", "rto_s": round(serving - started, 3), "lost_rows": diff.lost_rows}))


def test_bad_input_says_what_to_do(backed_up):
    _, repo, tool = backed_up
    env = {**os.environ, **repo.env()}
    with pytest.raises(BackupError, match=r"stanza 'nope' does not exist.*RP_PGBACKREST_STANZA"):
        PgBackRest("nope", config=DEPLOY_CONF, env=env, prefix=tool.prefix).info()
    no_key = {k: v for k, v in env.items() if k != "PGBACKREST_REPO1_S3_KEY"}
    with pytest.raises(BackupError, match=r"no S3 credentials.*PGBACKREST_REPO1_S3_KEY"):
        PgBackRest(STANZA, config=DEPLOY_CONF, env=no_key, prefix=tool.prefix).info()
    closed = {**env, "PGBACKREST_REPO1_STORAGE_PORT": "1"}  # nothing listens there
    with pytest.raises(BackupError, match=r"cannot reach the S3 endpoint.*PGBACKREST_REPO1_S3_ENDPOINT"):
        PgBackRest(STANZA, config=DEPLOY_CONF, env=closed, prefix=tool.prefix, io_timeout_s=1).verify()
    untrusted = {k: v for k, v in env.items() if k != "PGBACKREST_REPO1_STORAGE_CA_FILE"}
    with pytest.raises(BackupError, match=r"not trusted.*PGBACKREST_REPO1_STORAGE_CA_FILE"):
        PgBackRest(STANZA, config=DEPLOY_CONF, env=untrusted, prefix=tool.prefix, io_timeout_s=1).info()


def test_dagster_backup_checks_on_the_real_repository(backed_up, tmp_path, monkeypatch):
    """backup_checks_job runs backup_fresh and backup_restorable against the S3 repository; a
    wrong stanza fails both with the hint instead of raising."""
    from research_pipeline.config import BackupSettings
    from research_pipeline.defs.backup.checks import build_backup_defs

    _, repo, _ = backed_up
    for key, value in repo.env().items():
        monkeypatch.setenv(key, value)
    # This test process is not the cluster's OS user: its own pgBackRest log and lock folders.
    monkeypatch.setenv("PGBACKREST_LOG_PATH", str(tmp_path / "log"))
    monkeypatch.setenv("PGBACKREST_LOCK_PATH", str(tmp_path / "lock"))

    def run(stanza: str) -> dict[str, dg.AssetCheckEvaluation]:
        defs = build_backup_defs(BackupSettings(stanza=stanza, config=DEPLOY_CONF, max_age_s=3600))
        result = defs.resolve_job_def("backup_checks_job").execute_in_process(raise_on_error=False)
        return {e.check_name: e for e in result.get_asset_check_evaluations()}

    good = run(STANZA)
    assert set(good) == {"backup_fresh", "backup_restorable"}
    assert all(e.passed for e in good.values()), {k: e.description for k, e in good.items()}
    assert good["backup_fresh"].metadata["latest_type"].value == "full"
    wrong = run("nope")
    assert not any(e.passed for e in wrong.values())
    assert all("RP_PGBACKREST_STANZA" in e.description for e in wrong.values())
