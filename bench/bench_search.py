"""Benchmark: hybrid query latency by full-text engine (Tantivy, SQL) against the raw engines and raw FAISS.

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

and, with ``--engine tantivy`` (or ``both``, the default), the per-generation Tantivy index
(`lib/search/fts_tantivy`) over the same rows: raw Tantivy search of a prepared query, the
pipeline's ``FulltextIndex.search``, the same without pruning (every match scored: the
exhaustive reference of the overlap figures) and the hybrid search on it. ``--engine sql``
skips the Tantivy part, ``--engine tantivy`` the SQL full-text table (its build is the slow part
at 1M). Prints a markdown table with p50/p95, build time, disk and peak memory, and the ratio
of the pipeline to the sum of the raw parts; with ``--json`` the last line is one JSON object
``{"<size>": {"hybrid": {"p50_ms": ..., "p95_ms": ...}, ...}}`` ("hybrid" is the search the
deployment runs: on Tantivy when it was built).

Run from the repo root: ``.venv/bin/python -m bench.bench_search [--sizes 10000,100000]
[--backend sqlite|postgresql] [--engine both|tantivy|sql] [--json]``.
"""

from __future__ import annotations

import argparse
import json
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
from research_pipeline.lib.search import analyzer, bm25, fts, fts_tantivy
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


def _overlap(fast: list[str], exact: list[str], depth: int) -> float | None:
    return len(set(fast[:depth]) & set(exact[:depth])) / len(exact[:depth]) if exact else None


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / max(1, len(values))


def _sql_part(engine: sa.Engine, queries: list[str]) -> dict:
    """The SQL full-text table: build, raw primitives, two-stage and exhaustive fts_search."""
    started = time.perf_counter()
    fts.build_fts(engine, "fts_bench")
    build_s = time.perf_counter() - started
    matches = [" OR ".join(f'"{t}"' for t in analyzer.query_terms(q)) for q in queries]
    lat = _raw_queries(engine, matches)
    lat["fts_search, every matching row scored (k=100)"] = _timed(
        lambda q: fts.fts_search(engine, "fts_bench", q, k=100, common_df=1.0), queries)
    lat["fts_search, two-stage as the pipeline (k=100)"] = _timed(
        lambda q: fts.fts_search(engine, "fts_bench", q, k=100), queries)
    exact = [[c for c, _ in fts.fts_search(engine, "fts_bench", q, k=100, common_df=1.0)] for q in queries]
    fast = [[c for c, _ in fts.fts_search(engine, "fts_bench", q, k=100)] for q in queries]
    return {"build_s": build_s, "lat": lat, "exact": exact,
            "overlap": {d: _mean([_overlap(f, e, d) for f, e in zip(fast, exact)]) for d in (10, 100)}}


def _tantivy_part(engine: sa.Engine, queries: list[str], folder: Path) -> dict:
    """The Tantivy index over the same rows: build, raw search, pipeline search, unpruned reference."""
    import tantivy

    info = fts_tantivy.build_index(engine, folder)
    index = fts_tantivy.FulltextIndex(folder)
    searcher, schema = index._searcher, index._schema
    prepared = [
        tantivy.Query.boolean_query([(tantivy.Occur.Should, tantivy.Query.term_query(schema, fts_tantivy.TEXT, t))
                                     for t in analyzer.query_terms(q)])
        for q in queries
    ]

    def unpruned(q: str) -> list[str]:
        # count=True makes Tantivy visit every matching document: the exhaustive top-100.
        terms = analyzer.query_terms(q)
        if not terms:
            return []
        query = tantivy.Query.boolean_query([(tantivy.Occur.Should, tantivy.Query.term_query(schema, fts_tantivy.TEXT, t))
                                             for t in terms])
        hits = searcher.search(query, 100 + bm25.TIE_MARGIN, count=True).hits
        rids = searcher.fast_field_values(fts_tantivy.RID, [a for _, a in hits]) if hits else []
        return [c for c, _ in bm25.top([(index.chunk_ids[r - 1], r, sc) for (sc, _), r in zip(hits, rids)], 100)]

    index.search(queries[0], k=100)  # warm the page cache
    lat = {
        "raw Tantivy search, prepared query (k=100)": _timed(lambda q: searcher.search(q, 100, count=False), prepared),
        "FulltextIndex.search as the pipeline (k=100)": _timed(lambda q: index.search(q, k=100), queries),
        "Tantivy, every match scored (count=True, k=100)": _timed(unpruned, queries),
    }
    fast = [[c for c, _ in index.search(q, k=100)] for q in queries]
    exact = [unpruned(q) for q in queries]
    return {"build_s": info["seconds"], "disk_mb": info["bytes"] / 2**20, "lat": lat, "index": index, "fast": fast,
            "overlap": {d: _mean([_overlap(f, e, d) for f, e in zip(fast, exact)]) for d in (10, 100)}}


def run_size(size: int, docs, chunks, vecs, queries: list[str], qvecs: np.ndarray, embedder, tmp: Path,  # noqa: ANN001
             pg_admin_url: str | None = None, engines: tuple[str, ...] = ("sql", "tantivy")) -> dict:
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
    chunk_ids = [x["chunk_id"] for x in c]
    del d, c
    out: dict = {"size": size, "backend": engine.dialect.name, "engines": {}, "lat": {}}
    if engine.dialect.name == "sqlite":
        out["db_only_mb"] = os.path.getsize(tmp / f"bench_{size}.db") / 2**20
    sql = _sql_part(engine, queries) if "sql" in engines else None
    tv = _tantivy_part(engine, queries, tmp / f"tantivy_{size}") if "tantivy" in engines else None
    import faiss

    # The index is built on every core (as the vector_index asset does); queries run on one
    # thread below, as a search server's request thread would.
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    index, params = build_vector_index(v)
    out["faiss_build_s"] = time.perf_counter() - started
    faiss.omp_set_num_threads(1)
    from research_pipeline.lib.embed.vectors import VectorIndex

    vi = VectorIndex(index, chunk_ids)
    out["index"] = params["type"]
    out["lat"]["raw FAISS search (k=100)"] = _timed(lambda i: index.search(qvecs[i : i + 1], 100), range(len(queries)))
    out["lat"]["query encoding"] = _timed(embedder.encode_query, queries)
    for name, part in (("sql", sql), ("tantivy", tv)):
        if part is None:
            continue
        searcher = Searcher(engine, "fts_bench" if name == "sql" else None, vi, embedder,
                            fulltext=part.get("index"))
        searcher.search(queries[0], k=10)
        part["lat"]["hybrid Searcher.search (k=10)"] = _timed(lambda q, s=searcher: s.search(q, k=10, mode="hybrid"), queries)
        out["engines"][name] = part
    if sql and tv:  # how close Tantivy's scorer is to our exhaustive SQL BM25
        tv["vs_sql_exhaustive"] = {dep: _mean([_overlap(f, e, dep) for f, e in zip(tv["fast"], sql["exact"])])
                                   for dep in (10, 100)}
    if engine.dialect.name == "sqlite":
        out["db_mb"] = os.path.getsize(tmp / f"bench_{size}.db") / 2**20
    else:
        with engine.connect() as conn:
            out["db_mb"] = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one() / 2**20
    engine.dispose()
    if pg_admin_url:
        _pg_database(pg_admin_url, False, f"rp_bench_search_{size}")
    out["rss_mb"] = _rss_mb()
    for part in out["engines"].values():
        part.pop("index", None), part.pop("fast", None), part.pop("exact", None)
    return out


def _p(lat: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2)}


def summary(rows: list[dict]) -> dict:
    """The JSON of the run: per size, the deployment's hybrid search first, then each engine."""
    out = {}
    for r in rows:
        engines = {}
        for name, part in r["engines"].items():
            engines[name] = {
                "hybrid": _p(part["lat"]["hybrid Searcher.search (k=10)"]),
                "fulltext": _p(part["lat"]["FulltextIndex.search as the pipeline (k=100)" if name == "tantivy"
                                           else "fts_search, two-stage as the pipeline (k=100)"]),
                "build_s": round(part["build_s"], 1),
                "top_overlap_vs_exhaustive": {str(k): round(v, 4) for k, v in part["overlap"].items()},
                "latency": {k: _p(v) for k, v in part["lat"].items()},
            }
            if "disk_mb" in part:
                engines[name]["disk_mb"] = round(part["disk_mb"], 1)
            if "vs_sql_exhaustive" in part:
                engines[name]["top_overlap_vs_sql_exhaustive"] = {str(k): round(v, 4) for k, v in part["vs_sql_exhaustive"].items()}
        main = engines.get("tantivy") or engines.get("sql") or {}
        out[str(r["size"])] = {
            "hybrid": main.get("hybrid"),
            "fulltext_engine": "tantivy" if "tantivy" in engines else r["backend"],
            "backend": r["backend"],
            "engines": engines,
            "raw_faiss": _p(r["lat"]["raw FAISS search (k=100)"]),
            "query_encoding": _p(r["lat"]["query encoding"]),
            "vector_index": r["index"],
            "faiss_build_s": round(r["faiss_build_s"], 1),
            "db_mb": round(r["db_mb"], 1),
            "peak_rss_mb": round(r["rss_mb"]),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--work-dir", default=None, help="SciFact eval cache (default $RP_HOME/eval/scifact)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                        help="database of the corpus rows (postgresql: a scratch database on --pg-admin-url)")
    parser.add_argument("--pg-admin-url", default=None,
                        help="PostgreSQL server URL (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres); "
                             "implies --backend postgresql")
    parser.add_argument("--engine", choices=("both", "tantivy", "sql"), default="both",
                        help="full-text engines to build and time")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    args = parser.parse_args(argv)
    pg_admin_url = args.pg_admin_url
    if args.backend == "postgresql" and not pg_admin_url:
        pg_admin_url = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    engines = ("sql", "tantivy") if args.engine == "both" else (args.engine,)
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
            r = run_size(size, docs, chunks, vecs, queries, qvecs, embedder, Path(tmp), pg_admin_url, engines)
            rows.append(r)
            builds = ", ".join(f"{n} full-text build {p['build_s']:.1f}s" + (f" ({p['disk_mb']:.0f} MiB)" if "disk_mb" in p else "")
                               for n, p in r["engines"].items())
            print(f"size {size}: {r['index']}, {builds}, FAISS build {r['faiss_build_s']:.1f}s, "
                  f"{r['backend']} db {r['db_mb']:.0f} MiB, peak RSS {r['rss_mb']:.0f} MiB", flush=True)
    print("\n| chunks | engine | what | p50 ms | p95 ms |")
    print("|---:|---|---|---:|---:|")
    for r in rows:
        for name, lat in r["lat"].items():
            print(f"| {r['size']:,} | | {name} | {percentile(lat, 50):.1f} | {percentile(lat, 95):.1f} |")
        for engine_name, part in r["engines"].items():
            lat = part["lat"]
            for name, values in lat.items():
                print(f"| {r['size']:,} | {engine_name} | {name} | {percentile(values, 50):.1f} | {percentile(values, 95):.1f} |")
            if engine_name == "sql":
                text_key = ("raw FTS5 MATCH, weighted bm25() (k=100)" if r["backend"] == "sqlite"
                            else "raw GIN match, count of every matching row")
                what = "two-stage vs every row scored"
            else:
                text_key, what = "raw Tantivy search, prepared query (k=100)", "block-max WAND vs every match scored"
            raw = [a + b + c for a, b, c in zip(lat[text_key], r["lat"]["raw FAISS search (k=100)"], r["lat"]["query encoding"])]
            hyb = lat["hybrid Searcher.search (k=10)"]
            print(f"| {r['size']:,} | {engine_name} | {what}: top-10 / top-100 overlap | "
                  f"{part['overlap'][10]:.3f} | {part['overlap'][100]:.3f} |")
            if "vs_sql_exhaustive" in part:
                print(f"| {r['size']:,} | {engine_name} | vs exhaustive SQL BM25 (FTS5 formula): top-10 / top-100 overlap | "
                      f"{part['vs_sql_exhaustive'][10]:.3f} | {part['vs_sql_exhaustive'][100]:.3f} |")
            print(f"| {r['size']:,} | {engine_name} | ratio hybrid / (raw full-text + FAISS + encoding) | "
                  f"{percentile(hyb, 50) / percentile(raw, 50):.2f}x | {percentile(hyb, 95) / percentile(raw, 95):.2f}x |")
    if args.json:
        print(json.dumps(summary(rows), sort_keys=True))


if __name__ == "__main__":
    main()
