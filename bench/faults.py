"""Fault drills of `make drill`: a disk that fills during a build, S3 answering 503s, PostgreSQL
restarted in the middle of a reindex.

`disk_full(work)`: the embedded deployment (SQLite, local object store, scratch) on a tmpfs of
fixed size; a first generation is built, gated and published; a ballast file then leaves the
volume a few hundred KiB, and the next generation's build must fail cleanly (OutOfSpaceError
naming the volume and what to do, its partial files removed) while the live generation keeps its
files byte for byte and keeps answering searches (a thread searching it throughout). Then the
ballast is deleted and a rebuild publishes: recovery_s is from freeing the space until the new
generation is live.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import open_object_store
from research_pipeline.lib.core.util import sha256_file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RP_SHARED_DATA", REPO.parent / "shared" / "data"))
SCIFACT = SHARED / "ir" / "scifact"
#: Free space left by the ballast: far less than one generation of the drill corpus needs.
LEFT_FREE = 256 << 10


class Tmpfs:
    """A tmpfs of fixed size mounted at `path` (needs root: the drill says so otherwise)."""

    def __init__(self, path: Path, size_mb: int):
        self.path, self.size_mb = Path(path), size_mb

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"the disk_full drill mounts a {self.size_mb} MiB tmpfs and could not "
                f"({done.stderr.strip() or done.returncode}): run it as root, or skip it with --skip disk_full"
            )
        return self.path

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free on `disk`'s filesystem; its path."""
    st = os.statvfs(disk)
    ballast = Path(disk) / "ballast"
    with open(ballast, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def scifact_records(n: int) -> list[dict]:
    out = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def scifact_queries(n: int) -> list[str]:
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line, _ in zip(fh, range(n), strict=False)]


def load_records(engine, records: list[dict]) -> None:  # noqa: ANN001
    """One document and one chunk per SciFact abstract (ids are content hashes, writes upserts)."""
    from research_pipeline.lib.core import util

    now, docs, chunks = util.utcnow(), [], []
    for rec in records:
        doc_id = util.sha256_hex(json.dumps(rec, sort_keys=True))
        text, content_hash = rec["text"], util.sha256_hex(rec["text"])
        docs.append(dict(doc_id=doc_id, shard=doc_id[0], source_kind="record", title=rec["title"], authors="[]",
                         text=text, page_offsets="[0]", parser="drill", parser_version="1", quality=1.0,
                         page_count=1, ingested_at=now))  # fmt: skip
        chunks.append(dict(chunk_id=util.sha256_hex(f"{doc_id}|0|{content_hash}"), doc_id=doc_id, shard=doc_id[0],
                           ordinal=0, section="Body", is_references=False, page_start=1, page_end=1, char_start=0,
                           char_end=len(text), n_tokens=len(text.split()), content_hash=content_hash, text=text))  # fmt: skip
    with engine.begin() as conn:
        store.upsert(conn, store.documents, docs, ["doc_id"])
        store.upsert(conn, store.chunks, chunks, ["chunk_id"])


def new_live_generation(engine, obj, embedder) -> str:  # noqa: ANN001
    """Build, gate (latency relaxed: the machine is shared) and publish a generation; its id."""
    from research_pipeline.lib.release import build, gates, publish

    gen = build.build_generation(engine, obj, embedder)
    gates.evaluate_generation(engine, obj, embedder, gen["gen_id"],
                              thresholds=gates.GateThresholds(latency_p95_ms=600_000.0), max_probe_queries=4)  # fmt: skip
    publish.publish(engine, gen["gen_id"], store=obj)
    return gen["gen_id"]


def _files(root: Path, prefix: str) -> dict[str, str]:
    base = root / prefix
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(base.rglob("*")) if p.is_file()}


def _corpus_rows(engine) -> int:  # noqa: ANN001
    import sqlalchemy as sa

    with engine.connect() as conn:
        return sum(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                   for t in (store.documents, store.chunks, store.embeddings))  # fmt: skip


class _Searching(threading.Thread):
    """Searches the live generation over and over until stopped; counts answers and errors."""

    def __init__(self, searcher, queries: list[str]):  # noqa: ANN001
        super().__init__(name="drill-searches", daemon=True)
        self.searcher, self.queries = searcher, queries
        self.stop, self.answered, self.errors, self.last_error = threading.Event(), 0, 0, ""

    def run(self) -> None:
        i = 0
        while not self.stop.is_set() and i < 100_000:
            try:
                if self.searcher.search(self.queries[i % len(self.queries)], k=5):
                    self.answered += 1
            except Exception as exc:  # noqa: BLE001 - counted: the drill fails on any
                self.errors += 1
                self.last_error = repr(exc)
            i += 1


def disk_full(work: Path, n_records: int = 600, size_mb: int = 64, embedder=None) -> dict:  # noqa: ANN001
    """The disk_full drill (see the module docstring); a drill record of the summary."""
    from research_pipeline.lib.embed.model import load_embedder
    from research_pipeline.lib.release import build, registry, searchers

    embedder = embedder or load_embedder()
    with Tmpfs(Path(work) / "small-disk", size_mb) as disk:
        old_tmp = tempfile.tempdir
        (disk / "tmp").mkdir()
        tempfile.tempdir = str(disk / "tmp")  # the build's scratch is on the small disk too
        engine = store.make_engine(f"sqlite:///{disk / 'rp.db'}")
        searching = None
        try:
            store.create_schema(engine)
            load_records(engine, scifact_records(n_records))
            obj = open_object_store(str(disk / "objects"))
            live = new_live_generation(engine, obj, embedder)
            live_prefix = registry.vector_prefix(live)
            before = _files(disk / "objects", live_prefix)
            rows_before = _corpus_rows(engine)
            searcher = searchers.open_searcher(engine, obj, embedder, cache_dir=Path(work) / "replica-cache")
            queries = scifact_queries(50)
            expected = [h.doc_id for h in searcher.search(queries[0], k=5)]
            searching = _Searching(searcher, queries)
            searching.start()

            ballast = fill(disk, LEFT_FREE)
            error, failed_gen = None, None
            try:
                failed_gen = build.build_generation(engine, obj, embedder)["gen_id"]
            except build.OutOfSpaceError as exc:
                error = str(exc)
            building = [g["gen_id"] for g in registry.list_generations(engine) if g["status"] == "building"]
            leftovers = {g: _files(disk / "objects", registry.vector_prefix(g)) for g in building}
            live_after = (store.live_generation(engine) or {}).get("gen_id")
            lost = rows_before - _corpus_rows(engine)
            same_files = _files(disk / "objects", live_prefix) == before
            same_answer = [h.doc_id for h in searcher.search(queries[0], k=5)] == expected

            ballast.unlink()
            freed = time.monotonic()
            new_live = new_live_generation(engine, obj, embedder)
            recovery = time.monotonic() - freed
            searching.stop.set()
            searching.join(60)
            clean_message = error is not None and "reindex_job" in error and "free of" in error and live in error
            passed = (clean_message and lost == 0 and failed_gen is None and live_after == live and same_files and same_answer
                      and not any(leftovers.values()) and searching.errors == 0 and searching.answered > 0
                      and new_live != live)  # fmt: skip
            return {
                "name": "disk_full", "passed": passed, "lost_rows": lost,
                "recovery_s": round(recovery, 3), "client_errors": searching.errors,
                "searches_answered": searching.answered, "error": error, "live_untouched": same_files,
                "partial_files_left": sum(len(v) for v in leftovers.values()), "tmpfs_mb": size_mb,
                "detail": f"the build failed with {'a clear' if clean_message else 'NO clear'} message; live "
                          f"{live} {'kept' if same_files else 'LOST'} its {len(before)} files and answered "
                          f"{searching.answered} searches ({searching.errors} errors); after freeing the "
                          f"space {new_live} was live in {recovery:.1f} s",
            }  # fmt: skip
        finally:
            if searching is not None:
                searching.stop.set()
                searching.join(60)
            engine.dispose()
            tempfile.tempdir = old_tmp


def _verify_published(obj, engine, gen_id: str) -> list[str]:  # noqa: ANN001
    """Problems of generation `gen_id`'s objects: every file its two manifests name, read back
    and hashed (an empty list: nothing is missing or half-written)."""
    from research_pipeline.lib.core.util import sha256_hex
    from research_pipeline.lib.release import fulltext, registry

    gen = registry.get_generation(engine, gen_id)
    problems = []
    for manifest_key in (gen["vector_key"], fulltext.manifest_key(gen_id)):
        manifest = json.loads(obj.get_bytes(manifest_key))
        for name, entry in manifest["files"].items():
            try:
                data = obj.get_bytes(entry["key"])
            except KeyError:
                problems.append(f"{entry['key']} missing")
                continue
            if len(data) != entry["bytes"] or sha256_hex(data) != entry["sha256"]:
                problems.append(f"{name}: {len(data)} bytes, not the {entry['bytes']} of the manifest")
    return problems


def s3_503(work: Path, s3, repo, n_records: int = 300, embedder=None) -> dict:  # noqa: ANN001
    """s3_503: the S3 endpoint answers 20% of requests 503 SlowDown while a generation is built and
    published to it (the pipeline's S3 client: botocore standard retries) and while pgBackRest
    takes a differential backup through it (pgBackRest retries 5xx itself). Passed: both finish,
    every object the generation's manifests name reads back whole (sha256), `pgbackrest verify`
    finds every backup and WAL file valid, a fresh replica fetches the generation and searches it
    through the clean endpoint, and the front really answered 503s (counted in its access log).
    recovery_s: the extra seconds the faults cost the publish (faulty minus clean, same corpus).
    """
    from bench.topology.pg import as_pg_user
    from research_pipeline.lib.backup.pgbackrest import PgBackRest, parse_info
    from research_pipeline.lib.core.objectstore import S3ObjectStore
    from research_pipeline.lib.embed.model import load_embedder
    from research_pipeline.lib.release import searchers

    embedder = embedder or load_embedder()
    bucket = "rp-artifacts"
    s3.create_bucket(bucket)

    def bucket_store(faulty: bool, prefix: str) -> S3ObjectStore:
        return S3ObjectStore(bucket, prefix, client=s3.s3_client(faulty=faulty))

    timings, errors, published = {}, [], {}
    for faulty in (False, True):  # the same build through the clean endpoint first: the baseline
        engine = store.make_engine(f"sqlite:///{Path(work) / f's3drill-{faulty}.db'}")
        try:
            store.create_schema(engine)
            load_records(engine, scifact_records(n_records))
            started = time.monotonic()
            try:
                published[faulty] = new_live_generation(engine, bucket_store(faulty, f"faulty-{faulty}"), embedder)
            except Exception as exc:  # noqa: BLE001 - counted: any error fails the drill
                errors.append(f"publish: {exc!r}")
            timings[faulty] = time.monotonic() - started
            if faulty and faulty in published:
                clean_reader = bucket_store(False, f"faulty-{faulty}")
                errors.extend(_verify_published(clean_reader, engine, published[faulty]))
                searcher = searchers.open_searcher(engine, clean_reader, embedder, cache_dir=Path(work) / "s3drill-cache")
                if not searcher.search(scifact_queries(1)[0], k=3):
                    errors.append("the fetched generation answered nothing")
        finally:
            engine.dispose()
    publish_faults = s3.fault_counts()

    repo.through_faults = True
    started = time.monotonic()
    try:
        repo.backup("diff")
    except RuntimeError as exc:
        errors.append(f"backup: {exc}")
    finally:
        repo.through_faults = False
    backup_s = time.monotonic() - started
    # pgbackrest verify exits 0 whatever it found: the project's wrapper judges its report.
    tool = PgBackRest(repo.stanza, config=repo.config, env={**os.environ, **repo.env()}, prefix=tuple(as_pg_user([])))
    report = tool.verify()
    if not report.ok:
        errors.append(f"verify: {'; '.join(report.problems) or report.text[:500]}")
    info = parse_info(repo.stanza, repo.run("--output=json", "info"))
    latest = info.latest()
    if latest is None or latest.type != "diff":
        errors.append(f"the differential backup is not the latest in the repository: {latest}")
    counts = s3.fault_counts()
    injected = counts.get("503", 0)
    backup_injected = injected - publish_faults.get("503", 0)
    passed = not errors and publish_faults.get("503", 0) > 0 and backup_injected > 0
    return {
        "name": "s3_503", "passed": passed, "lost_rows": 0, "client_errors": len(errors),
        "recovery_s": round(max(0.0, timings.get(True, 0) - timings.get(False, 0)), 3),
        "fault_percent": s3.fault_percent, "requests": sum(counts.values()), "injected_503": injected,
        "injected_during_publish": publish_faults.get("503", 0), "injected_during_backup": backup_injected,
        "publish_s": {"clean": round(timings.get(False, 0), 3), "faulty": round(timings.get(True, 0), 3)},
        "backup_s": round(backup_s, 3), "errors": errors[:5],
        "detail": f"{injected} of {sum(counts.values())} S3 requests answered 503; the generation published "
                  f"{'whole' if not errors else 'WITH ERRORS'} ({timings.get(True, 0):.1f} s, clean "
                  f"{timings.get(False, 0):.1f} s) and the diff backup verified ({backup_s:.1f} s)",
    }  # fmt: skip



def _reindex(settings, instance):  # noqa: ANN001, ANN202
    """reindex_job over `settings` (gates' latency relaxed: the machine is shared), in process."""
    import dagster as dg

    from research_pipeline.defs.embeddings.assets import chunk_embeddings
    from research_pipeline.defs.ingest.assets import chunks, documents
    from research_pipeline.defs.resources import ReleaseGatesResource, build_resources
    from research_pipeline.defs.search.assets import fts_index, published_index, vector_index
    from research_pipeline.defs.search.checks import release_gates_check
    from research_pipeline.defs.search.jobs import reindex_job

    resources = build_resources(settings)
    resources["release_gates"] = ReleaseGatesResource(latency_p95_ms=600_000.0)
    defs = dg.Definitions(
        assets=[documents, chunks, chunk_embeddings, fts_index, vector_index, published_index],
        asset_checks=[release_gates_check], jobs=[reindex_job], resources=resources,
    )  # fmt: skip
    run_config = {"ops": {"documents": {"config": {"workers": 1, "ocr": False}},
                          "release_gates_check": {"config": {"max_probe_queries": 2}}}}  # fmt: skip
    return defs.resolve_job_def("reindex_job").execute_in_process(
        run_config=run_config, instance=instance, raise_on_error=False
    )


def _corpus_keys(url: str) -> dict[str, set]:
    import sqlalchemy as sa

    engine = store.make_engine(url)
    try:
        with engine.connect() as conn:
            live = store.live_generation(conn) or {}
            return {
                "documents": set(conn.execute(sa.select(store.documents.c.doc_id)).scalars()),
                "chunks": {tuple(r) for r in conn.execute(sa.select(store.chunks.c.chunk_id, store.chunks.c.content_hash))},
                "embeddings": {tuple(r) for r in conn.execute(sa.select(store.embeddings.c.content_hash, store.embeddings.c.model_id))},
                "live_chunks": {live.get("n_chunks")}, "live_fts_rows": {live.get("n_fts_rows")},
            }  # fmt: skip
    finally:
        engine.dispose()


def pg_restart_mid_reindex(work: Path, n_papers: int = 4) -> dict:
    """pg_restart_mid_reindex: reindex_job on real papers into a private PostgreSQL 15 cluster,
    which is restarted (fast shutdown: sessions terminated) as soon as the run has written its
    first chunks, i.e. while chunks are embedded. The failed step is retried (its RetryPolicy) and
    the run succeeds; its corpus (documents, chunks, embeddings by key) and the live generation's
    counts must equal those of a reference run of the same papers without the restart: nothing
    duplicated, nothing missing. recovery_s: from the restart until the run ended."""
    import shutil

    import dagster as dg
    import sqlalchemy as sa

    from bench.topology.pg import PgCluster
    from research_pipeline.config import Settings

    papers = sorted((REPO / "examples" / "papers").glob("*.pdf"), key=lambda p: p.stat().st_size)[:n_papers]
    inbox = Path(work) / "restart-inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for paper in papers:
        shutil.copy(paper, inbox / paper.name)
    cluster = PgCluster(Path(work) / "restart-pg")
    try:
        cluster.init().start()
        with cluster.engine(isolation_level="AUTOCOMMIT").connect() as conn:
            for db in ("rp_reference", "rp_restarted"):
                conn.execute(sa.text(f"create database {db}"))
        results, restart = {}, {}
        for db in ("rp_reference", "rp_restarted"):
            url = cluster.url(db)
            engine = store.make_engine(url)
            store.create_schema(engine)
            settings = Settings(home=Path(work) / db, inbox=inbox, database_url=url,
                                object_store_url=str(Path(work) / db / "objects"))  # fmt: skip
            stop = threading.Event()

            def restart_when_chunks_arrive(engine=engine, stop=stop) -> None:
                deadline = time.monotonic() + 600
                while not stop.is_set() and time.monotonic() < deadline:
                    with engine.connect() as conn:
                        if conn.execute(sa.select(sa.func.count()).select_from(store.chunks)).scalar_one():
                            break
                    stop.wait(0.05)  # polling the database the run writes to, bounded by the deadline
                else:
                    return
                restart["at"] = time.monotonic()
                cluster.stop(mode="fast")
                cluster.start()
                restart["back_s"] = time.monotonic() - restart["at"]

            watcher = threading.Thread(target=restart_when_chunks_arrive, daemon=True)
            if db == "rp_restarted":
                watcher.start()
            with dg.instance_for_test() as instance:
                result = _reindex(settings, instance)
                retries = sum(1 for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)
                retried = sorted({e.step_key for e in result.all_events
                                  if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY})  # fmt: skip
            ended = time.monotonic()
            stop.set()
            if db == "rp_restarted":
                watcher.join(120)
            engine.dispose()
            results[db] = {"success": result.success, "retries": retries, "retried_steps": retried, "ended": ended,
                           "keys": _corpus_keys(url)}  # fmt: skip
        ref, got = results["rp_reference"], results["rp_restarted"]
        diff = {name: {"missing": len(ref["keys"][name] - got["keys"][name]),
                       "extra": len(got["keys"][name] - ref["keys"][name])} for name in ref["keys"]}  # fmt: skip
        same = all(d["missing"] == d["extra"] == 0 for d in diff.values())
        lost = sum(d["missing"] for d in diff.values())
        passed = ref["success"] and got["success"] and same and "at" in restart and None not in ref["keys"]["live_chunks"]
        return {
            "name": "pg_restart_mid_reindex", "passed": bool(passed), "lost_rows": lost,
            "recovery_s": round(got["ended"] - restart["at"], 3) if "at" in restart else None,
            "client_errors": got["retries"], "step_retries": got["retries"], "retried_steps": got["retried_steps"],
            "restart_s": round(restart.get("back_s", 0.0), 3), "papers": len(papers),
            "chunks": len(ref["keys"]["chunks"]), "diff": diff,
            "detail": f"PostgreSQL restarted {'mid-run' if 'at' in restart else 'NEVER (the run wrote no chunks)'}; "
                      f"{got['retries']} step retries, run {'succeeded' if got['success'] else 'FAILED'}; corpus "
                      f"{'identical to' if same else 'DIFFERENT from'} the reference run "
                      f"({len(ref['keys']['chunks'])} chunks)",
        }  # fmt: skip
    finally:
        cluster.stop(mode="immediate")
