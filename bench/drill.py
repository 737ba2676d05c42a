"""Disaster-recovery drills; the last line printed is a JSON summary.

    python -m bench.drill [--docs N]

Drills (issue 12), each a record of the summary:
- `restore_latest`, `restore_pitr`: a private PostgreSQL 15 cluster (never the machine's 5432)
  archiving to S3 with pgBackRest (moto behind a TLS front, the deployed
  deploy/pgbackrest/pgbackrest.conf): N corpus documents (with a chunk and a logged query each),
  full backup, more committed writes, manifest, destroy the data directory, restore to the latest
  point and verify against the manifest; then a deliberate bad write and a point-in-time restore
  to just before it.
- `s3_503` (bench/faults.py): the S3 front answers 20% of requests 503 SlowDown while a
  generation is published to it and a pgBackRest differential backup is taken through it.
- `replica_failover`: a primary crashes under writes, its synchronous streaming replica is
  promoted and the writer repointed.
- `disk_full` (bench/faults.py): the embedded deployment on a small tmpfs fills during a build.
- `pg_restart_mid_reindex` (bench/faults.py): PostgreSQL restarted while reindex_job embeds.
- `daemon_killed_backfill`, `code_server_restart` (bench/dagster_drills.py): Dagster's deployed
  trio; the daemon SIGKILLed during a 16-shard backfill, then the code server mid-run.
Both restores run while a search replica (`research-pipeline serve` on a database of the same
cluster) answers 10 searches a second: its failed searches are the drill's client_errors and the
time until it answers again is the RTO. A search replica SIGKILLed and Redis stopped under 10x
load are steps of `make rehearsal`. Not built: writes during the restores, and the restores in
the rehearsal topology (`not_yet` in the summary; docs/RELIABILITY.md).

Summary: {"rpo_s", "rto_s", "drills": [{name, passed, lost_rows, recovery_s, client_errors}], ...}.
RPO: seconds from the last commit until its WAL is archived in S3 (what losing the data
directory at the worst moment loses); RTO: seconds from the destruction until the search replica
answers again (each restore's `recovery_s`: until the restored server answers a corpus query).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
from datetime import timezone

import sqlalchemy as sa

from bench import dagster_drills, faults
from bench.topology.pg import PgBackRestArchive, PgCluster, make_workdir, remove_workdir
from bench.topology.pgbackrest import DEPLOY_CONF, STANZA, PgBackRestRepo, TlsMoto
from research_pipeline.lib.backup.manifest import compare, take_manifest
from research_pipeline.lib.core import store

CORPUS_DB = "research_pipeline"
#: The database of the search replica that answers during the restores (same cluster).
SEARCH_DB = "rp_search"
PROBE = "select count(*) from documents"


def _rows(ids: range) -> tuple[list[dict], list[dict], list[dict]]:
    docs, chunks, queries = [], [], []
    now = store.utcnow()
    for i in ids:
        doc_id = f"{i:064x}"
        text = f"text of paper {i} " * 20
        docs.append({
            "doc_id": doc_id, "shard": doc_id[0], "source_kind": "record", "title": f"paper {i}",
            "page_count": 1, "text": text, "page_offsets": "[0]", "parser": "drill", "parser_version": "1",
            "quality": 1.0, "ingested_at": now,
        })  # fmt: skip
        chunks.append({
            "chunk_id": f"{i + 10**9:064x}", "doc_id": doc_id, "shard": doc_id[0], "ordinal": 0,
            "section": "body", "page_start": 0, "page_end": 0, "char_start": 0, "char_end": len(text),
            "n_tokens": 100, "content_hash": f"{i + 2 * 10**9:064x}", "text": text,
        })  # fmt: skip
        queries.append({"ts": now, "query": f"q{i}", "latency_ms": 1.0, "n_results": 1})
    return docs, chunks, queries


def write(engine: sa.Engine, ids: range, batch: int = 1000) -> None:
    for start in range(ids.start, ids.stop, batch):
        docs, chunks, queries = _rows(range(start, min(start + batch, ids.stop)))
        with engine.begin() as conn:
            store.upsert(conn, store.documents, docs, ["doc_id"])
            store.upsert(conn, store.chunks, chunks, ["chunk_id"])
            conn.execute(sa.insert(store.query_log), queries)


class _Searches(threading.Thread):
    """Searches a replica `rate` times a second (each with a 5 s timeout) until stopped; records
    (monotonic time, answered with 200) so a drill can count the failures of an outage and time
    the first answer after it."""

    def __init__(self, url: str, queries: list[str], rate: float = 10.0, limit: int = 20_000):
        super().__init__(name="drill-searches", daemon=True)
        self.url, self.queries, self.period, self.limit = url, queries, 1.0 / rate, limit
        self.results: list[tuple[float, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=5.0) as client:
            for i in range(self.limit):
                if self.stop.is_set():
                    return
                started = time.monotonic()
                try:
                    ok = client.get(self.url, params={"q": self.queries[i % len(self.queries)]}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.results.append((started, ok))
                self.stop.wait(max(0.0, self.period - (time.monotonic() - started)))  # the pacing of the load

    def outage(self, since: float) -> tuple[int, float | None]:
        """(failed searches since `since`, seconds from `since` to the first answer after the last failure)."""
        after = [(t, ok) for t, ok in list(self.results) if t >= since]
        failures = [t for t, ok in after if not ok]
        last_failure = max(failures, default=since)
        answered = [t for t, ok in after if ok and t >= last_failure]
        return len(failures), (answered[0] - since if answered else None)


def _search_replica(work, cluster: PgCluster):  # noqa: ANN001, ANN202
    """A search corpus (300 SciFact abstracts, a published generation) in its own database of the
    drill's cluster, and a `research-pipeline serve` replica on it; (Proc, its /search URL)."""
    from bench.topology import services
    from research_pipeline.lib.core.objectstore import LocalObjectStore

    with cluster.engine(isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text(f"create database {SEARCH_DB}"))
    engine = store.make_engine(cluster.url(SEARCH_DB))
    store.create_schema(engine)
    faults.load_records(engine, faults.scifact_records(300))
    objects = work / "search-objects"
    faults.new_live_generation(engine, LocalObjectStore(objects), _embedder())
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RP_HOME=str(work / "replica-home"),
               RP_DATABASE_URL=cluster.url(SEARCH_DB), RP_OBJECT_STORE_URL=str(objects))  # fmt: skip
    replica = services.search_replica(0, work / "logs", env).start()
    replica.wait_ready()
    return replica, f"http://{replica.host}:{replica.port}/search"


@functools.cache
def _embedder():  # noqa: ANN202
    """The model, loaded once for every drill of this process."""
    from research_pipeline.lib.embed.model import load_embedder

    return load_embedder()


def _restore(cluster: PgCluster, repo: PgBackRestRepo, target_time: str | None = None) -> float:
    """Destroy the data directory, restore, start; seconds until it serves (the RTO)."""
    started = time.monotonic()
    cluster.destroy()
    cluster.prepare_empty_data_dir()
    repo.restore(target_time=target_time)
    cluster.start()
    serving = cluster.wait_serving(CORPUS_DB, PROBE)
    with cluster.engine(CORPUS_DB).connect() as conn:
        conn.execute(sa.text("checkpoint"))  # archive_timeout again (docs/runbooks/restore.md)
    return serving - started


class _Writer(threading.Thread):
    """The pipeline's writes during a failover: batches of documents committed one after the
    other (upserts, as the pipeline writes) until `stop` is set (at most `limit` rows), each
    batch acknowledged only once its commit returned. A failed batch waits for `repointed`,
    reconnects to `url` and is written again."""

    def __init__(self, url: str, limit: int = 10**6, batch: int = 10):
        super().__init__(name="drill-writer", daemon=True)
        self.url, self.limit, self.batch = url, limit, batch
        self.acked: list[int] = []
        self.failed_attempts = 0
        self.first_write_after_failure: float | None = None
        self.repointed = threading.Event()
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.error: BaseException | None = None

    def run(self) -> None:
        engine = store.make_engine(self.url)
        try:
            i = 0
            while i < self.limit and not self.stop.is_set():
                ids = range(i, min(i + self.batch, self.limit))
                try:
                    write(engine, ids)
                except sa.exc.OperationalError:
                    self.failed_attempts += 1
                    if self.failed_attempts > 50:
                        raise
                    engine.dispose()
                    if not self.repointed.wait(120):
                        raise TimeoutError("the writer was not repointed within 120 s") from None
                    engine = store.make_engine(self.url)
                    continue
                if self.failed_attempts and self.first_write_after_failure is None:
                    self.first_write_after_failure = time.monotonic()
                with self.progress:
                    self.acked.extend(ids)
                    self.progress.notify_all()
                i = ids.stop
        except BaseException as exc:  # noqa: BLE001 - reported by the drill
            self.error = exc
        finally:
            engine.dispose()
            with self.progress:
                self.progress.notify_all()

    def wait_acked(self, n: int, timeout_s: float = 120) -> None:
        with self.progress:
            if not self.progress.wait_for(lambda: len(self.acked) >= n or not self.is_alive(), timeout_s):
                raise TimeoutError(f"the writer acknowledged {len(self.acked)} of {n} rows in {timeout_s} s")


def _set_synchronous_standbys(cluster: PgCluster, names: str) -> None:
    """synchronous_standby_names of a running server, applied by a reload ('' : none)."""
    engine = cluster.engine(isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f"alter system set synchronous_standby_names = '{names}'"))
            conn.execute(sa.text("select pg_reload_conf()"))
    finally:
        engine.dispose()


def _poll_sync_state(primary: PgCluster, timeout_s: float = 30) -> str:
    """The standby's sync_state in pg_stat_replication once the reload made it 'sync' (or the last seen)."""
    engine = primary.engine()
    state, deadline = "", time.monotonic() + timeout_s
    try:
        while state != "sync" and time.monotonic() < deadline:
            with engine.connect() as conn:
                state = conn.execute(sa.text("select coalesce(max(sync_state), '') from pg_stat_replication")).scalar_one()
            if state != "sync":
                time.sleep(0.05)  # polling the server's own view, bounded by timeout_s
    finally:
        engine.dispose()
    return state


def failover(work, n_writes: int = 2000) -> dict:
    """replica_failover: the primary crashes (immediate stop) under the pipeline's writes, the
    streaming replica is promoted and the writer is repointed to it; every write the primary
    acknowledged must be on the promoted server, and the writes go on there.

    The primary commits synchronously to its standby (`synchronous_standby_names = '*'`), the
    setting docs/RELIABILITY.md asks for where a failover must lose nothing; asynchronous
    streaming may lose the last commits (that is its RPO). After the promotion the new primary
    has no standby, so the requirement is lifted there (a runbook step: docs/runbooks/failover.md).
    recovery_s: from the crash until the writer's first commit on the promoted server.
    """
    primary = PgCluster(work / "fo_primary")
    replica = None
    try:
        primary.init().start()
        with primary.engine(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(sa.text(f"create database {CORPUS_DB}"))
        engine = store.make_engine(primary.url(CORPUS_DB))
        store.create_schema(engine)
        engine.dispose()
        replica = primary.make_replica(work / "fo_replica").start()
        replica.wait_replayed(primary.current_lsn())
        # Synchronous from now on (set before there is a standby, every commit would wait forever).
        _set_synchronous_standbys(primary, "*")
        sync_state = _poll_sync_state(primary)
        writer = _Writer(primary.url(CORPUS_DB))
        writer.start()
        writer.wait_acked(n_writes // 2)
        crashed = time.monotonic()  # the writer is committing right now: it never waits
        primary.stop(mode="immediate")
        replica.promote()
        _set_synchronous_standbys(replica, "")  # no standby left to wait for
        writer.url = replica.url(CORPUS_DB)
        writer.repointed.set()
        with writer.progress:
            acked_at_repoint = len(writer.acked)
        writer.wait_acked(acked_at_repoint + n_writes // 2)
        writer.stop.set()
        writer.join(120)
        if writer.error is not None:
            raise writer.error
        engine = store.make_engine(replica.url(CORPUS_DB))
        with engine.connect() as conn:
            present = set(conn.execute(sa.select(store.documents.c.doc_id)).scalars())
            rows = conn.execute(sa.select(sa.func.count()).select_from(store.documents)).scalar_one()
        engine.dispose()
        acked = {f"{i:064x}" for i in writer.acked}  # the writer has stopped
        lost = len(acked - present)
        recovery = (writer.first_write_after_failure or time.monotonic()) - crashed
        after = len(acked) - acked_at_repoint
        return {"name": "replica_failover",
                "passed": lost == 0 and len(present) == len(acked) and after > 0 and sync_state == "sync",
                "standby_sync_state": sync_state,
                "lost_rows": lost, "recovery_s": round(recovery, 3), "client_errors": writer.failed_attempts,
                "acknowledged_before_crash": acked_at_repoint, "acknowledged_after_failover": after,
                "rows_on_promoted": rows,
                "detail": f"{acked_at_repoint} rows acknowledged by the old primary, {after} more by the "
                          f"promoted one, {rows} rows there"}  # fmt: skip
    finally:
        if replica is not None:
            replica.stop(mode="immediate")
        primary.stop(mode="immediate")


def _max_or_none(values: list) -> float | None:
    """The largest value, or None when any is missing (a restore after which searches never answered)."""
    return None if any(v is None for v in values) else max(values)


def _wait_answering(searches: _Searches, since: float, timeout_s: float = 120) -> tuple[int, float | None]:
    """Wait (bounded) until the replica answers a search after the restore; (failed searches
    since `since`, seconds until it answered again: the RTO a user sees)."""
    deadline = time.monotonic() + timeout_s
    failed, answered = searches.outage(since)
    while answered is None and time.monotonic() < deadline and searches.is_alive():
        time.sleep(0.2)  # the searches thread records answers; this only reads them, bounded
        failed, answered = searches.outage(since)
    return failed, (round(answered, 3) if answered is not None else None)


def run(n_docs: int) -> dict:
    work = make_workdir("rp-drill-")
    s3 = TlsMoto(work)
    cluster = PgCluster(work / "pg", archive=PgBackRestArchive(STANZA, DEPLOY_CONF), settings={"archive_timeout": "2"})
    drills = []
    replica = searches = None
    try:
        s3.start()
        s3.create_bucket("rp-backups")
        repo = PgBackRestRepo(s3, "rp-backups", cluster, work / "pgbackrest")
        cluster.init().start(env=repo.env())
        with cluster.engine(isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(sa.text(f"create database {CORPUS_DB}"))
        engine = store.make_engine(cluster.url(CORPUS_DB))
        store.create_schema(engine)
        write(engine, range(n_docs))
        replica, search_url = _search_replica(work, cluster)
        searches = _Searches(search_url, faults.scifact_queries(50))
        searches.start()
        repo.stanza_create()
        repo.check()
        t = time.monotonic()
        repo.backup("full")
        backup_s = time.monotonic() - t

        # restore_latest: writes committed after the backup live only in the archived WAL.
        write(engine, range(n_docs, n_docs + max(10, n_docs // 10)))
        committed = time.monotonic()
        archived = cluster.wait_archived()
        before = take_manifest(engine)
        engine.dispose()
        destroyed = time.monotonic()
        rto = _restore(cluster, repo)
        failed, search_rto = _wait_answering(searches, destroyed)
        engine = store.make_engine(cluster.url(CORPUS_DB))
        diff = compare(before, take_manifest(engine))
        drills.append({"name": "restore_latest", "passed": diff.ok and search_rto is not None, "lost_rows": diff.lost_rows,
                       "recovery_s": round(rto, 3), "client_errors": failed,
                       "searches_answer_again_s": search_rto, "detail": diff.describe()})  # fmt: skip
        rpo = archived - committed

        # restore_pitr: back to just before a bad write.
        write(engine, range(10**6, 10**6 + 5))
        good = take_manifest(engine)
        with engine.connect() as conn:
            target = conn.execute(sa.text("select clock_timestamp()")).scalar_one()
        with engine.begin() as conn:
            conn.execute(sa.delete(store.chunks))
            conn.execute(sa.update(store.documents).values(title="oops"))
        cluster.wait_archived()
        engine.dispose()
        destroyed = time.monotonic()
        pitr = _restore(cluster, repo, target.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00"))
        failed, search_rto = _wait_answering(searches, destroyed)
        searches.stop.set()
        searches.join(30)
        engine = store.make_engine(cluster.url(CORPUS_DB))
        diff = compare(good, take_manifest(engine))
        engine.dispose()
        drills.append({"name": "restore_pitr", "passed": diff.ok and search_rto is not None, "lost_rows": diff.lost_rows,
                       "recovery_s": round(pitr, 3), "client_errors": failed,
                       "searches_answer_again_s": search_rto, "detail": diff.describe()})  # fmt: skip
        replica.stop()
        drills.append(faults.s3_503(work, s3, repo, embedder=_embedder()))
        drills.append(failover(work))
        drills.append(faults.disk_full(work, embedder=_embedder()))
        drills.append(faults.pg_restart_mid_reindex(work))
        drills.extend(dagster_drills.run(work))
        return {
            "rpo_s": round(rpo, 3),
            # RTO: from the destruction until the search replica answered again (what users see).
            "rto_s": _max_or_none([d["searches_answer_again_s"] for d in drills if d["name"].startswith("restore")]),
            "drills": drills,
            "documents": n_docs,
            "rows": sum(t.rows for t in before.tables.values()),
            "full_backup_s": round(backup_s, 3),
            "archive_timeout_s": 2,
            "in_rehearsal": ["search_replica_sigkill", "redis_down"],
            "not_yet": ["writes_during_restore", "rehearsal_topology"],
        }  # fmt: skip
    finally:
        if searches is not None:
            searches.stop.set()
        if replica is not None:
            replica.stop()
        cluster.stop(mode="immediate")
        s3.stop()
        remove_workdir(work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200, help="corpus documents loaded before the backup")
    args = parser.parse_args(argv)
    summary = run(args.docs)
    print(json.dumps(summary))
    return 0 if all(d["passed"] for d in summary["drills"]) else 1


if __name__ == "__main__":
    sys.exit(main())
