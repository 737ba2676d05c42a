"""Benchmark: query cache, query log and generation swap, against the raw primitives.

In one run, on six demo papers ingested, chunked, embedded and published by the pipeline:

- cache hit vs miss: `cached_search` answering from the cache (in-process LRU, then the real
  Redis at RP_REDIS_URL or 127.0.0.1:6379) against the uncached `Searcher.search` (the raw
  primitive) on the same queries, plus a bare Redis GET of the same payload (what the cache
  layer adds on top of Redis);
- query log: `QueryLog.log` (buffered, flushed by a background thread) against a synchronous
  INSERT per search;
- swap: `publishing.publish` (checks, pointer flip in one transaction, retention) against
  the bare UPDATE of the pointer row, on SQLite and (when reachable) PostgreSQL.

Run from the repo root:  .venv/bin/python -m bench.bench_gates
Figures go to docs/bench/gates.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline.lib.embed.embeddings import embed_missing
from research_pipeline.lib.embed.model import load_embedder
from research_pipeline.lib.ingest.chunking import chunk_documents
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import sources_for
from research_pipeline.lib.release import build, gates, publish as publishing, searchers
from research_pipeline.lib.search.cache import QueryCache, cache_key, cached_search
from research_pipeline.lib.search.querylog import QueryLog

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "papers"
DOC = REPO / "docs" / "bench" / "gates.md"
PAPERS = (
    "joss-2018-pycm-multiclass-confusion-matrix-library-python.pdf",
    "joss-2021-niaaml-automl-framework-based-stochastic.pdf",
    "joss-2024-pdr-planetary-data-reader.pdf",
    "jose-2018-cfd-python-12-steps-navier-stokes.pdf",
    "jose-2021-game-theory-python-educational-tutorial-game.pdf",
    "rescience-2021-drivers-evapotranspiration-from-boreal-wildfires.pdf",
)
SWAPS = 5
RELAXED = gates.GateThresholds(latency_p95_ms=1e9)
PG_ADMIN = os.environ.get("RP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
CORPUS_TABLES = (store.documents, store.document_sources, store.chunks, store.embeddings)


def ms(seconds: float) -> float:
    return seconds * 1000.0


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


def timed(fn) -> float:  # noqa: ANN001
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_cache(searcher, queries: list[str], redis_url: str) -> list[tuple[str, str, str, str]]:  # noqa: ANN001
    rows = []
    for name, cache in (
        ("LRU", QueryCache()),
        ("Redis", QueryCache(redis_url=redis_url, prefix=f"rp:bench:{uuid.uuid4().hex}:")),
    ):
        try:
            # Raw and miss interleaved query by query, so machine load hits both alike.
            raw, miss = [], []
            for q in queries:
                raw.append(timed(lambda q=q: searcher.search(q, k=10)))
                miss.append(timed(lambda q=q: cached_search(searcher, q, cache=cache)))
            hit = [timed(lambda q=q: cached_search(searcher, q, cache=cache)) for q in queries for _ in range(20)]
            assert cache.hits == 20 * len(queries), cache.stats()
            rows.append(
                (
                    f"cache {name}: hit vs uncached Searcher.search (median)",
                    f"{median_ms(hit):.3f} ms",
                    f"{median_ms(raw):.1f} ms",
                    f"{median_ms(raw) / median_ms(hit):.0f}x faster",
                )
            )
            rows.append(
                (
                    f"cache {name}: miss (search + store) vs uncached search",
                    f"{median_ms(miss):.1f} ms",
                    f"{median_ms(raw):.1f} ms",
                    f"{median_ms(miss) / median_ms(raw):.2f}x",
                )
            )
            if name == "Redis":
                key = cache.prefix + cache_key(queries[0], None, 10, "hybrid", searcher.gen_id)
                bare = [timed(lambda: cache._redis.get(key)) for _ in range(200)]
                hit_one = [timed(lambda: cached_search(searcher, queries[0], cache=cache)) for _ in range(200)]
                rows.append(
                    (
                        "cache Redis: hit vs bare redis GET of the same payload",
                        f"{median_ms(hit_one):.3f} ms",
                        f"{median_ms(bare):.3f} ms",
                        f"{median_ms(hit_one) / median_ms(bare):.2f}x",
                    )
                )
        finally:
            cache.clear()
            cache.close()
    return rows


def bench_querylog(engine) -> tuple[str, str, str, str]:  # noqa: ANN001
    n = 500
    qlog = QueryLog(engine, flush_interval_s=0.5)
    buffered = [timed(lambda i=i: qlog.log(f"query {i}", None, 1.0, "g", 3)) for i in range(n)]
    qlog.close()

    def insert_one(i: int) -> None:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(store.query_log),
                {"ts": util.utcnow(), "query": f"q {i}", "gen_id": "g", "latency_ms": 1.0, "n_results": 3, "cache_hit": False},
            )

    sync = [timed(lambda i=i: insert_one(i)) for i in range(n)]
    return (
        f"query log: QueryLog.log vs one INSERT per search ({n} searches, SQLite)",
        f"{median_ms(buffered) * 1000:.1f} µs",
        f"{median_ms(sync) * 1000:.0f} µs",
        f"{median_ms(sync) / median_ms(buffered):.0f}x less time on the search path",
    )


def bench_swap(engine, obj, embedder, label: str) -> tuple[str, str, str, str]:  # noqa: ANN001
    candidates = []
    for _ in range(SWAPS):
        gen = build.build_generation(engine, obj, embedder)
        gates.evaluate_generation(engine, obj, embedder, gen["gen_id"], thresholds=RELAXED, max_probe_queries=1)
        candidates.append(gen["gen_id"])
    publish = [timed(lambda g=g: publishing.publish(engine, g, keep=3, store=obj)) for g in candidates]
    live = store.live_generation(engine)["gen_id"]
    p = store.index_pointer

    def flip() -> None:
        with engine.begin() as conn:
            conn.execute(sa.update(p).where(p.c.name == "live").values(gen_id=live, updated_at=util.utcnow()))

    bare = [timed(flip) for _ in range(SWAPS)]
    rollback = timed(lambda: publishing.rollback(engine))
    return (
        f"swap ({label}): publish (gates check, pointer flip, retention) vs bare pointer UPDATE",
        f"{median_ms(publish):.1f} ms (rollback {ms(rollback):.1f} ms)",
        f"{median_ms(bare):.1f} ms",
        f"{median_ms(publish) / median_ms(bare):.1f}x",
    )


def copy_corpus(src, dst) -> None:  # noqa: ANN001
    with src.connect() as s, dst.begin() as d:
        for t in CORPUS_TABLES:
            rows = [dict(r._mapping) for r in s.execute(sa.select(t))]
            if rows:
                d.execute(sa.insert(t), rows)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_gates_"))
    redis_url = os.environ.get("RP_REDIS_URL") or "redis://127.0.0.1:6379/0"
    pg_url = None
    rows: list[tuple[str, str, str, str]] = []
    try:
        inbox = work / "inbox"
        inbox.mkdir()
        for name in PAPERS:
            shutil.copy(DEMO / name, inbox / name)
        engine = store.make_engine(f"sqlite:///{work / 'rp.db'}")
        store.create_schema(engine)
        ingest(engine, sources_for(inbox), workers=2, ocr=False)
        embedder = load_embedder()
        chunk_documents(engine, embedder.count_tokens)
        embed_missing(engine, embedder)
        obj = LocalObjectStore(work / "objects")
        n_chunks = store.counts(engine)["chunks"]

        rows.append(bench_swap(engine, obj, embedder, "SQLite"))
        searcher = searchers.open_searcher(engine, obj, embedder)
        queries = list(gates.load_probe_set().queries.values())[:10]
        searcher.search(queries[0], k=10)  # warm-up outside the timings
        rows.extend(bench_cache(searcher, queries, redis_url))
        rows.append(bench_querylog(engine))

        try:
            admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            name = f"rp_bench_{uuid.uuid4().hex[:10]}"
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            pg_url = sa.engine.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
        except sa.exc.OperationalError as exc:
            print(f"PostgreSQL not reachable ({exc.__class__.__name__}); swap measured on SQLite only")
        if pg_url:
            pg = store.make_engine(pg_url)
            store.create_schema(pg)
            copy_corpus(engine, pg)
            rows.append(bench_swap(pg, LocalObjectStore(work / "objects_pg"), embedder, "PostgreSQL"))
            pg.dispose()
        engine.dispose()
    finally:
        if pg_url:
            with sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT").connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{sa.engine.make_url(pg_url).database}" WITH (FORCE)'))
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    table = "\n".join(
        ["| step | pipeline | raw primitive | ratio |", "|---|---|---|---|"] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    )
    body = (
        "## Release gates, query cache and swap (bench_gates)\n\n"
        "Command: `.venv/bin/python -m bench.bench_gates` from the repo root (needs Redis on "
        "RP_REDIS_URL or 127.0.0.1:6379; PostgreSQL on 127.0.0.1:5432 for the PostgreSQL swap row).\n\n"
        f"{platform.machine()}, {os.cpu_count()} cores visible, load average {load:.1f} at the end of the run; "
        f"{len(PAPERS)} demo papers -> {n_chunks} chunks, model {embedder.model_id}, hybrid search top 10, "
        f"{SWAPS} publications per backend (keep 3).\n\n"
        f"{table}\n"
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(body)
    print(body)


if __name__ == "__main__":
    main()
