"""Benchmark: hybrid query latency at 10k and 100k chunks against raw FAISS and raw FTS5 MATCH.

Corpus: SciFact's chunks as the pipeline makes them (ingest -> chunk_documents ->
embed_missing, cached under $RP_HOME/eval/scifact, or the folder given by --work-dir), with
their real MiniLM vectors. Larger sizes repeat that base with perturbed text (a word dropped,
sentences rotated) and vectors (real vector + small Gaussian noise, renormalised); the report
says so. Queries: the 300 SciFact test queries. In the same run and on the same data it times

- raw FTS5: ``SELECT chunk_id FROM t WHERE t MATCH ? ORDER BY rank LIMIT 100`` with the same
  OR-of-terms expression the pipeline builds, and the same with the pipeline's field-weighted
  ``bm25()`` (what fts_search runs),
- raw FAISS: ``index.search`` of a pre-computed query vector, k=100,
- query encoding alone,
- the pipeline's ``Searcher.search(query, k=10, mode='hybrid')`` end to end (encode, both
  candidate lists, fusion, SQL for metadata and snippets),

and prints a markdown table with p50/p95 and the ratio of the pipeline to the sum of the raw
parts. Run from the repo root: ``.venv/bin/python -m bench.bench_search [--sizes 10000,100000]``.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from research_pipeline.config import Settings
from research_pipeline.lib.core import store, util
from research_pipeline.lib.embed.embeddings import load_embeddings
from research_pipeline.lib.embed.model import load_embedder
from research_pipeline.lib.embed.vectors import build_vector_index
from research_pipeline.lib.release import evaluate
from research_pipeline.lib.release.ir_metrics import percentile
from research_pipeline.lib.search import analyzer, bm25, fts
from research_pipeline.lib.search.searcher import Searcher

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ir" / "scifact"
NOISE = 0.02


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def base_corpus(work_dir: Path, embedder) -> tuple[list[dict], list[dict], np.ndarray]:  # noqa: ANN001
    """SciFact documents and chunks as the pipeline made them, with their real vectors."""
    index = evaluate.prepare(SCIFACT, work_dir, embedder, need_vectors=True)
    with index.engine.connect() as conn:
        docs = [dict(r) for r in conn.execute(sa.select(store.documents)).mappings()]
        chunks = [dict(r) for r in conn.execute(sa.select(store.chunks).order_by(store.chunks.c.chunk_id)).mappings()]
    vecs = load_embeddings(index.engine, embedder.model_id, [c["content_hash"] for c in chunks])
    index.engine.dispose()
    return docs, chunks, vecs


def _perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) > 3:
        del words[rng.randrange(len(words))]
    cut = rng.randrange(len(words)) if words else 0
    return " ".join(words[cut:] + words[:cut])


def scaled_corpus(docs, chunks, vecs, size: int, seed: int = 0):  # noqa: ANN001
    """`size` chunks: the base, then perturbed copies (text and vector) under new documents."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    doc_by_id = {d["doc_id"]: d for d in docs}
    out_docs = {d["doc_id"]: d for d in docs}
    out_chunks = list(chunks[:size])
    out_vecs = [vecs[: min(size, len(chunks))]]
    copy = 0
    while len(out_chunks) < size:
        copy += 1
        take = chunks[: size - len(out_chunks)]
        batch_vecs = vecs[: len(take)] + nrng.normal(0, NOISE, size=(len(take), vecs.shape[1])).astype(np.float32)
        batch_vecs /= np.linalg.norm(batch_vecs, axis=1, keepdims=True)
        out_vecs.append(batch_vecs)
        for c in take:
            doc_id = util.sha256_hex(f"{c['doc_id']}|copy{copy}")
            if doc_id not in out_docs:
                out_docs[doc_id] = {**doc_by_id[c["doc_id"]], "doc_id": doc_id, "shard": doc_id[0]}
            text = _perturb(c["text"], rng)
            h = util.sha256_hex(text)
            out_chunks.append({**c, "doc_id": doc_id, "shard": doc_id[0], "text": text, "content_hash": h,
                               "chunk_id": util.sha256_hex(f"{doc_id}|{c['ordinal']}|{h}")})
    return list(out_docs.values()), out_chunks, np.vstack(out_vecs)


def _timed(fn, items) -> list[float]:  # noqa: ANN001
    out = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - started) * 1000.0)
    return out


def _pg_database(admin_url: str, create: bool, name: str) -> str:
    """Create (or drop) database `name` on the server of `admin_url`; returns its URL."""
    admin = store.make_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if create:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _raw_queries(engine: sa.Engine, matches: list[str]) -> dict[str, list[float]]:
    """The backend's own full-text primitives over the same OR-of-terms queries, k=100."""
    if engine.dialect.name == "sqlite":
        raw_sql = sa.text("SELECT rowid FROM fts_bench WHERE fts_bench MATCH :q ORDER BY rank LIMIT 100")
        w = bm25.FIELD_WEIGHTS
        weighted_sql = sa.text(
            f"SELECT rowid, bm25(fts_bench, {w['title']}, {w['abstract']}, {w['body']}) AS s "
            "FROM fts_bench WHERE fts_bench MATCH :q ORDER BY s LIMIT 100"
        )
        with engine.connect() as conn:
            conn.execute(raw_sql, {"q": matches[0]}).all()  # warm the page cache
            return {
                "raw FTS5 MATCH (k=100)": _timed(lambda m: conn.execute(raw_sql, {"q": m}).all(), matches),
                "raw FTS5 MATCH, weighted bm25() (k=100)": _timed(lambda m: conn.execute(weighted_sql, {"q": m}).all(), matches),
            }
    # PostgreSQL has no BM25: its primitives are the GIN lookup alone and ts_rank_cd over it.
    tsqueries = [m.replace('"', "'").replace(" OR ", " | ") for m in matches]
    gin_sql = sa.text("SELECT rid FROM fts_bench WHERE lexemes @@ CAST(:q AS tsquery) LIMIT 100")
    count_sql = sa.text("SELECT count(*) FROM fts_bench WHERE lexemes @@ CAST(:q AS tsquery)")
    with engine.connect() as conn:
        conn.execute(count_sql, {"q": tsqueries[0]}).all()
        return {
            "raw GIN match, unranked (k=100)": _timed(lambda q: conn.execute(gin_sql, {"q": q}).all(), tsqueries),
            "raw GIN match, count of every matching row": _timed(lambda q: conn.execute(count_sql, {"q": q}).all(), tsqueries),
        }


def run_size(size: int, docs, chunks, vecs, queries: list[str], qvecs: np.ndarray, embedder, tmp: Path,  # noqa: ANN001
             pg_admin_url: str | None = None) -> dict:
    d, c, v = scaled_corpus(docs, chunks, vecs, size)
    if pg_admin_url:
        url = _pg_database(pg_admin_url, True, f"rp_bench_search_{size}")
    else:
        url = f"sqlite:///{tmp / f'bench_{size}.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    with engine.begin() as conn:
        store.upsert(conn, store.documents, d, ["doc_id"])
        store.upsert(conn, store.chunks, c, ["chunk_id"])
    started = time.perf_counter()
    fts.build_fts(engine, "fts_bench")
    fts_build_s = time.perf_counter() - started
    rss_before = _rss_mb()
    import faiss

    # The index is built on every core (as the vector_index asset does); queries run on one
    # thread below, as a search server's request thread would.
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index, params = build_vector_index(v)
    faiss_build_s = time.perf_counter() - started
    faiss.omp_set_num_threads(1)
    from research_pipeline.lib.embed.vectors import VectorIndex

    vi = VectorIndex(index, [x["chunk_id"] for x in c])
    searcher = Searcher(engine, "fts_bench", vi, embedder)

    matches = [" OR ".join(f'"{t}"' for t in analyzer.query_terms(q)) for q in queries]
    raw = _raw_queries(engine, matches)
    two_stage = _timed(lambda q: fts.fts_search(engine, "fts_bench", q, k=100), queries)
    exhaustive = _timed(lambda q: fts.fts_search(engine, "fts_bench", q, k=100, common_df=1.0), queries)
    overlap = {10: [], 100: []}
    for q in queries:
        fast = [cid for cid, _ in fts.fts_search(engine, "fts_bench", q, k=100)]
        exact = [cid for cid, _ in fts.fts_search(engine, "fts_bench", q, k=100, common_df=1.0)]
        for depth in overlap:
            if exact:
                overlap[depth].append(len(set(fast[:depth]) & set(exact[:depth])) / len(exact[:depth]))
    raw_faiss = _timed(lambda i: index.search(qvecs[i : i + 1], 100), range(len(queries)))
    encode = _timed(embedder.encode_query, queries)
    searcher.search(queries[0], k=10)
    hybrid = _timed(lambda q: searcher.search(q, k=10, mode="hybrid"), queries)
    if engine.dialect.name == "sqlite":
        db_mb = os.path.getsize(tmp / f"bench_{size}.db") / 2**20
    else:
        with engine.connect() as conn:
            db_mb = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one() / 2**20
    engine.dispose()
    if pg_admin_url:
        _pg_database(pg_admin_url, False, f"rp_bench_search_{size}")
    return {
        "size": size,
        "index": params["type"],
        "fts_build_s": fts_build_s,
        "faiss_build_s": faiss_build_s,
        "faiss_mb": index.ntotal * index.d * 4 / 2**20 if params["type"] == "flat_ip" else None,
        "db_mb": db_mb,
        "rss_mb": max(_rss_mb(), rss_before),
        "overlap": {depth: sum(v) / max(1, len(v)) for depth, v in overlap.items()},
        "backend": engine.dialect.name,
        "lat": {**raw,
                "fts_search, every matching row scored (k=100)": exhaustive,
                "fts_search, two-stage as the pipeline (k=100)": two_stage,
                "raw FAISS search (k=100)": raw_faiss,
                "query encoding": encode, "hybrid Searcher.search (k=10)": hybrid},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--work-dir", default=None, help="SciFact eval cache (default $RP_HOME/eval/scifact)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--pg-admin-url", default=None,
                        help="run on PostgreSQL instead of SQLite: a server URL (a scratch database is made and dropped)")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir) if args.work_dir else Settings.from_env().home / "eval" / "scifact"
    embedder = load_embedder()
    docs, chunks, vecs = base_corpus(work_dir, embedder)
    queries_by_id, _ = evaluate.load_queries(SCIFACT, "test")
    queries = list(queries_by_id.values())[: args.queries]
    qvecs = embedder.encode(queries)
    load = os.getloadavg()
    print(f"\nbase: {len(chunks)} real SciFact chunks with real MiniLM vectors; larger sizes add perturbed copies "
          f"(text: a word dropped and rotated; vectors: + N(0, {NOISE}) noise, renormalised). "
          f"{len(queries)} SciFact test queries. Load average at start: {load[0]:.1f} on {os.cpu_count()} CPUs.\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            r = run_size(size, docs, chunks, vecs, queries, qvecs, embedder, Path(tmp), args.pg_admin_url)
            rows.append(r)
            print(f"size {size}: {r['index']}, FTS build {r['fts_build_s']:.1f}s, FAISS build {r['faiss_build_s']:.1f}s, "
                  f"{r['backend']} db {r['db_mb']:.0f} MiB, peak RSS {r['rss_mb']:.0f} MiB", flush=True)
    print("\n| chunks | what | p50 ms | p95 ms |")
    print("|---:|---|---:|---:|")
    for r in rows:
        for name, lat in r["lat"].items():
            print(f"| {r['size']:,} | {name} | {percentile(lat, 50):.1f} | {percentile(lat, 95):.1f} |")
        lat = r["lat"]
        text_key, text_name = (
            ("raw FTS5 MATCH, weighted bm25() (k=100)", "weighted FTS5") if r["backend"] == "sqlite"
            else ("raw GIN match, count of every matching row", "GIN count")
        )
        raw = [a + b + c for a, b, c in zip(lat[text_key], lat["raw FAISS search (k=100)"], lat["query encoding"])]
        hyb = lat["hybrid Searcher.search (k=10)"]
        print(f"| {r['size']:,} | two-stage vs every row scored: top-10 / top-100 overlap | "
              f"{r['overlap'][10]:.3f} | {r['overlap'][100]:.3f} |")
        print(f"| {r['size']:,} | ratio hybrid / ({text_name} + FAISS + encoding) | "
              f"{percentile(hyb, 50) / percentile(raw, 50):.2f}x | {percentile(hyb, 95) / percentile(raw, 95):.2f}x |")


if __name__ == "__main__":
    main()
