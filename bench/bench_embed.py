"""Benchmark: batch embedding against raw fp32 `encode`, and the measured profile of a reindex.

In one run, on the same chunk texts of a corpus ingested and chunked by the pipeline into a
fresh SQLite database, in the order A B C C B A (best of two each, so drifting load on the
shared machine hits every method alike):

- A: plain `SentenceTransformer(...).encode(texts, batch_size=64)` in float32, texts in document
  order (the raw primitive, and the quality reference; sentence-transformers sorts by length
  within one call),
- B: `embed_missing` with the default Embedder (`precision="auto"`: bf16 autocast where the CPU
  or GPU has native bf16; a commit per batch, vectors written to the database),
- C: the same plain model called under `torch.autocast(bfloat16)`: the raw primitive of B's
  numeric path, so B / C is what the pipeline itself costs.

Quality: every vector B wrote is compared with A's float32 vector of the same text (minimum
and mean cosine). `--ndcg` also runs the SciFact test split (dense mode) through the real
evaluation twice, float32 and the default path, each in its own work dir so no cached vector is
reused, and records both nDCG@10 (about 10 minutes at fp32 on 2 idle cores).

The same run records the reindex profile the capacity plan reads (lib/capacity): ingest,
chunking, embedding, full-text and vector index build times; PDF, database, full-text and
vector bytes; hybrid search latency over examples/queries.tsv (each query its best of 5). Results go to
docs/bench/embed.md (one section per device) and, with the machine description, to
docs/bench/embed-<corpus>-<device>.json.

Run from the repo root:
    .venv/bin/python -m bench.bench_embed [--json] [--ndcg]
    .venv/bin/python -m bench.bench_embed --corpus shared --profile-only   # 156 shared papers
    .venv/bin/python -m bench.bench_embed --papers 10   # 10 of the papers: a quick run on a busy machine
Environment: RP_DEVICE=cuda to run on a GPU; BENCH_EMBED_LIMIT=N embeds only the first N chunks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from bench.machine import machine
from research_pipeline.config import Settings
from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline.lib.embed.embeddings import embed_missing, load_embeddings
from research_pipeline.lib.embed.model import available_cores, load_embedder, resolve_model_path
from research_pipeline.lib.ingest.chunking import chunk_documents
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import sources_for

REPO = Path(__file__).resolve().parents[1]
CORPORA = {"demo": REPO / "examples" / "papers", "shared": REPO.parent / "shared" / "data" / "papers"}
SCIFACT = REPO.parent / "shared" / "data" / "ir" / "scifact"
QUERIES = REPO / "examples" / "queries.tsv"
DOC = REPO / "docs" / "bench" / "embed.md"
BATCH = 64
#: Each example query is timed this many times (after one warm-up pass over all of them).
QUERY_REPEATS = 5


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _db_bytes(engine: sa.Engine, db: Path) -> int:
    """The SQLite file's size once its write-ahead log is folded in."""
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return _disk(db) + sum(_disk(p) for p in db.parent.glob(db.name + "-*"))


def search_latency(engine: sa.Engine, work: Path, embedder: Any) -> dict[str, Any]:
    """Build the full-text and vector indexes of what is in `engine`; time hybrid searches."""
    import faiss

    from research_pipeline.lib.embed.vectors import build_vector_index, load_vector_index, write_vector_index
    from research_pipeline.lib.search.fts import build_fts
    from research_pipeline.lib.search.searcher import Searcher

    db = work / "rp.db"
    before = _db_bytes(engine, db)
    _, fts_s = _timed(lambda: build_fts(engine, "fts_bench"))
    fts_bytes = _db_bytes(engine, db) - before
    c = store.chunks
    with engine.connect() as conn:
        rows = conn.execute(sa.select(c.c.chunk_id, c.c.content_hash).order_by(c.c.chunk_id)).all()
    started = time.perf_counter()
    unique = list(dict.fromkeys(r.content_hash for r in rows))
    table = load_embeddings(engine, embedder.model_id, unique)
    row_of = {h: i for i, h in enumerate(unique)}
    index, params = build_vector_index(table[[row_of[r.content_hash] for r in rows]])
    objects = LocalObjectStore(work / "objects")
    key = write_vector_index(objects, "bench", index, [r.chunk_id for r in rows], {"model": embedder.model_id})
    vectors_s = time.perf_counter() - started
    vectors = load_vector_index(objects, key)
    searcher = Searcher(engine, "fts_bench", vectors, embedder)
    queries = [line.split("\t")[0] for line in QUERIES.read_text().splitlines()[1:] if line.strip()]
    # One query on one core, as the search service runs it (it sets one torch thread once at
    # start; encode_query no longer switches threads itself). FAISS and torch share one OpenMP
    # pool, so the thread counts are put back for any embedding after this.
    import torch

    threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        for q in queries:
            searcher.search(q, k=10)
        # Each query's best of QUERY_REPEATS: its service time without the queueing behind other
        # processes that a shared machine adds (which is what a capacity plan sizes from).
        best: dict[str, float] = dict.fromkeys(queries, float("inf"))
        for _ in range(QUERY_REPEATS):
            for q in queries:
                _, s = _timed(lambda q=q: searcher.search(q, k=10))
                best[q] = min(best[q], s * 1000)
        times = list(best.values())
    finally:
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(torch_threads)
    return {
        "fts_build_s": round(fts_s, 2),
        "fts_bytes": fts_bytes,
        "vector_build_s": round(vectors_s, 2),
        "vector_bytes": _disk(work / "objects"),
        "vector_index": params.get("type") or params.get("kind") or str(params),
        "search_queries": len(times),
        "search_p50_ms": round(statistics.median(times), 2),
        "search_p95_ms": round(float(np.percentile(times, 95)), 2),
    }


def _sub_collection(records: int, into: Path) -> Path:
    """A BEIR folder with SciFact's test queries and every judged record plus random others (seed 0)."""
    import random

    corpus = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").read_text().splitlines() if line.strip()]
    qrels = (SCIFACT / "qrels" / "test.tsv").read_text()
    judged = {line.split("\t")[1] for line in qrels.splitlines()[1:] if line.strip()}
    others = [r for r in corpus if str(r["_id"]) not in judged]
    random.Random(0).shuffle(others)
    keep = [r for r in corpus if str(r["_id"]) in judged] + others[: max(0, records - len(judged))]
    (into / "qrels").mkdir(parents=True)
    (into / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    (into / "qrels" / "test.tsv").write_text(qrels)
    shutil.copyfile(SCIFACT / "queries.jsonl", into / "queries.jsonl")
    return into


def ndcg_check(device: str, records: int = 0) -> dict[str, Any]:
    """SciFact test nDCG@10 (dense) with the float32 path and with the default path, fresh each.

    `records` > 0 evaluates on a sub-corpus of that many records (all judged ones included),
    for a machine too busy for the full 5,183; the vectors of both runs are compared too.
    """
    from research_pipeline.lib.embed.model import Embedder
    from research_pipeline.lib.release.evaluate import evaluate

    out: dict[str, Any] = {"records": records or "all"}
    with tempfile.TemporaryDirectory(prefix="bench_embed_ndcg_") as tmp:
        beir = _sub_collection(records, Path(tmp) / "scifact") if records else SCIFACT
        vectors = {}
        for precision in ("fp32", "auto"):
            embedder = Embedder(device=device, precision=precision)
            work = Path(tmp) / precision
            result, seconds = _timed(lambda e=embedder, w=work: evaluate(beir, "test", "dense", work_dir=w, embedder=e))
            out[precision] = {
                "numeric_path": embedder.numeric_path,
                "ndcg@10": round(float(result["ndcg@10"]), 4),
                "recall@100": round(float(result["recall@100"]), 4),
                "documents": int(result["documents"]),
                "chunks": int(result["chunks"]),
                "seconds": round(seconds, 1),
            }
            engine = store.make_engine(f"sqlite:///{work / 'eval.db'}")
            e = store.embeddings
            with engine.connect() as conn:
                vectors[precision] = {h: np.frombuffer(v, "<f4") for h, v in conn.execute(sa.select(e.c.content_hash, e.c.vector))}
            engine.dispose()
    cos = np.array([float(vectors["fp32"][h] @ v) for h, v in vectors["auto"].items()])
    out["ndcg_delta"] = round(out["auto"]["ndcg@10"] - out["fp32"]["ndcg@10"], 4)
    out["chunks_compared"] = len(cos)
    out["min_cosine_to_fp32"] = round(float(cos.min()), 6)
    out["mean_cosine_to_fp32"] = round(float(cos.mean()), 6)
    return out


def compare(engine: sa.Engine, embedder: Any, texts: list[str], hashes: list[str], device: str) -> dict[str, Any]:
    """A (raw fp32 encode), B (embed_missing), C (raw bf16 autocast encode) in A B C C B A order."""
    import torch
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(resolve_model_path(embedder.name), device=device, local_files_only=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    n = len(texts)
    reference: dict[str, np.ndarray] = {}

    def raw_fp32() -> None:
        reference["v"] = plain.encode(texts, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=False)

    def pipeline() -> None:
        stats = embed_missing(engine, embedder, batch_size=BATCH)
        assert stats["embedded"] == n, stats

    def raw_bf16() -> None:
        with torch.autocast(kind, dtype=torch.bfloat16):
            plain.encode(texts, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=False)

    # Warm both (first-call allocations, kernel selection) outside the timings.
    embedder.encode(texts[:BATCH], batch_size=BATCH)
    plain.encode(texts[:BATCH], batch_size=BATCH, normalize_embeddings=True)
    with torch.autocast(kind, dtype=torch.bfloat16):
        plain.encode(texts[:BATCH], batch_size=BATCH, normalize_embeddings=True)

    steps = {"raw_fp32": raw_fp32, "pipeline": pipeline, "raw_bf16": raw_bf16}
    best = dict.fromkeys(steps, float("inf"))
    for name in ("raw_fp32", "pipeline", "raw_bf16", "raw_bf16", "pipeline", "raw_fp32"):
        if name == "pipeline":
            with engine.begin() as conn:  # a cold cache each time, outside the timing
                conn.execute(sa.delete(store.embeddings))
        _, seconds = _timed(steps[name])
        best[name] = min(best[name], seconds)
    mine = load_embeddings(engine, embedder.model_id, hashes)
    ref = np.asarray(reference["v"], dtype=np.float32)
    cosine = np.sum(mine * ref, axis=1) / np.linalg.norm(ref, axis=1)
    rates = {k: n / v for k, v in best.items()}
    return {
        "pipeline_chunks_per_s": round(rates["pipeline"], 2),
        "raw_fp32_chunks_per_s": round(rates["raw_fp32"], 2),
        "raw_bf16_chunks_per_s": round(rates["raw_bf16"], 2),
        "ratio": round(rates["pipeline"] / rates["raw_fp32"], 3),
        "ratio_to_raw_bf16": round(rates["pipeline"] / rates["raw_bf16"], 3),
        "min_cosine_to_fp32": round(float(cosine.min()), 6),
        "mean_cosine_to_fp32": round(float(cosine.mean()), 6),
        "seconds": {k: round(v, 2) for k, v in best.items()},
    }


def _sample(corpus: Path, papers: int, into: Path) -> Path:
    """An inbox of `papers` PDFs of `corpus` spread evenly over its sorted file list."""
    pdfs = sorted(corpus.rglob("*.pdf"))
    step = max(1, len(pdfs) // papers)
    into.mkdir(parents=True)
    for i, pdf in enumerate(pdfs[::step][:papers]):
        shutil.copyfile(pdf, into / f"{i:04d}-{pdf.name}")
    return into


def run(corpus: str, device: str, profile_only: bool, ndcg: int | None, limit: int, papers: int = 0) -> dict[str, Any]:
    """Ingest, chunk, (compare,) embed, index and query `corpus`; the result as one dict."""
    settings = Settings.from_env()
    host = machine(device)
    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    source = _sample(CORPORA[corpus], papers, work / "inbox") if papers else CORPORA[corpus]
    try:
        engine = store.make_engine(f"sqlite:///{work / 'rp.db'}")
        store.create_schema(engine)
        report, ingest_s = _timed(lambda: ingest(engine, sources_for(source), workers=available_cores(), ocr=False))
        embedder = load_embedder(settings.model, device)
        chunk_stats, chunk_s = _timed(
            lambda: chunk_documents(engine, embedder.count_tokens, max_tokens=embedder.max_seq_length)
        )
        c = store.chunks
        with engine.connect() as conn:
            rows = conn.execute(sa.select(c.c.chunk_id, c.c.content_hash, c.c.text).order_by(c.c.doc_id, c.c.ordinal)).all()
        if limit:
            keep = rows[:limit]
            with engine.begin() as conn:
                conn.execute(sa.delete(c).where(c.c.chunk_id.not_in([r.chunk_id for r in keep])))
            rows = keep
        # Document order, one text per distinct hash: exactly the work embed_missing does.
        distinct = {r.content_hash: r.text for r in rows}
        hashes, texts = list(distinct), list(distinct.values())
        db_before_embed = _db_bytes(engine, work / "rp.db")
        result: dict[str, Any] = {}
        if profile_only:
            stats, embed_s = _timed(lambda: embed_missing(engine, embedder, batch_size=BATCH))
            result["pipeline_chunks_per_s"] = round(len(texts) / embed_s, 2)
        else:
            result.update(compare(engine, embedder, texts, hashes, device))
            embed_s = result["seconds"]["pipeline"]
        vector_rows = _db_bytes(engine, work / "rp.db") - db_before_embed
        profile = {
            "corpus": corpus if not papers else f"{corpus}-{papers}",
            "papers": report.documents_new,
            "pages": report.pages,
            "pdf_bytes": _disk(source),
            "chunks": int(chunk_stats["chunks"]) if not limit else len(rows),
            "distinct_texts": len(texts),
            "ingest_s": round(ingest_s, 2),
            "chunk_s": round(chunk_s, 2),
            "embed_s": round(embed_s, 2),
            "db_bytes_before_embeddings": db_before_embed,
            "embedding_rows_bytes": vector_rows,
        }
        profile.update(search_latency(engine, work, embedder))
        profile["db_bytes"] = _db_bytes(engine, work / "rp.db")
        # Peak resident memory of this process: model, runtime, corpus rows and both indexes.
        profile["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        profile["reindex_s"] = round(
            profile["ingest_s"] + profile["chunk_s"] + profile["embed_s"] + profile["fts_build_s"] + profile["vector_build_s"], 2
        )
        engine.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(
        {
            "bench": "embed",
            "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "model_id": embedder.model_id,
            "numeric_path": embedder.numeric_path,
            "path_reason": embedder.path_reason,
            "batch_size": BATCH,
            "machine": {**host, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
            "reindex": profile,
        }
    )
    if ndcg is not None:
        result["scifact_test_dense"] = ndcg_check(device, ndcg)
    return result


def _section(device: str, body: str) -> None:
    """Replace this device's section of docs/bench/embed.md, keeping the other devices' figures."""
    head = (
        "## Embeddings (bench_embed)\n\n"
        "Command: `.venv/bin/python -m bench.bench_embed --ndcg` from the repo root "
        "(`RP_DEVICE=cuda` for a GPU). Same chunk texts, same run, order A B C C B A, best of "
        "two each; ratio = pipeline / raw float32 `SentenceTransformer.encode` throughput.\n"
    )
    old = DOC.read_text() if DOC.exists() else head
    begin, end = f"<!-- device:{device} -->", f"<!-- /device:{device} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _m: block, old, flags=re.DOTALL)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(new)


def _table(r: dict[str, Any]) -> str:
    m, p = r["machine"], r["reindex"]
    lines = [
        f"### {m['device']} ({m['cpu_model']}, {m['cores']} cores, bf16: {', '.join(m['cpu_bf16']) or 'none'}; "
        f"load average {m['load_average'][0]:.1f} at the start, {m['load_average_end'][0]:.1f} at the end; {r['when']})\n",
        f"{p['papers']} {p['corpus']} papers -> {p['chunks']} chunks ({p['distinct_texts']} distinct texts), "
        f"model {r['model_id']}, default path **{r['numeric_path']}** ({r['path_reason']}), batch {r['batch_size']}.\n",
        "| method | chunks/s | seconds | ratio to raw fp32 |",
        "|---|---:|---:|---:|",
        f"| A raw fp32 `SentenceTransformer.encode` | {r['raw_fp32_chunks_per_s']:.1f} | {r['seconds']['raw_fp32']:.1f} | 1.00x |",
        f"| **B pipeline `embed_missing` ({r['numeric_path']})** | **{r['pipeline_chunks_per_s']:.1f}** | "
        f"{r['seconds']['pipeline']:.1f} | **{r['ratio']:.2f}x** |",
        f"| C raw bf16 autocast `encode` | {r['raw_bf16_chunks_per_s']:.1f} | {r['seconds']['raw_bf16']:.1f} | "
        f"{r['raw_bf16_chunks_per_s'] / r['raw_fp32_chunks_per_s']:.2f}x |",
        "",
        f"Pipeline / its own raw primitive (B / C): {r['ratio_to_raw_bf16']:.2f}x. Cosine of every pipeline "
        f"vector to the fp32 vector of the same text: min {r['min_cosine_to_fp32']:.6f}, mean {r['mean_cosine_to_fp32']:.6f}.",
    ]
    if "scifact_test_dense" in r:
        s = r["scifact_test_dense"]
        lines.append(
            f"SciFact test split (300 queries), dense, {s['fp32']['documents']} records "
            f"({'the full corpus' if s['records'] == 'all' else 'every judged record plus random others, seed 0'}), "
            f"{s['fp32']['chunks']} chunks, each path embedded from scratch: nDCG@10 fp32 {s['fp32']['ndcg@10']:.4f}, "
            f"{s['auto']['numeric_path']} {s['auto']['ndcg@10']:.4f} (delta {s['ndcg_delta']:+.4f}); recall@100 "
            f"{s['fp32']['recall@100']:.4f} / {s['auto']['recall@100']:.4f}; cosine of the {s['chunks_compared']} "
            f"chunk vectors to fp32: min {s['min_cosine_to_fp32']:.6f}, mean {s['mean_cosine_to_fp32']:.6f}."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.bench_embed", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="demo")
    parser.add_argument("--papers", type=int, default=0, help="only N papers of the corpus, spread over its file list")
    parser.add_argument("--profile-only", action="store_true", help="one pipeline pass, no A/B/C comparison")
    parser.add_argument(
        "--ndcg", nargs="?", type=int, const=0, default=None, metavar="RECORDS",
        help="also compare SciFact test nDCG@10, fp32 vs default (on a sub-corpus of RECORDS records if given)",
    )
    parser.add_argument("--ndcg-only", action="store_true", help="only the nDCG comparison (to docs/bench/ndcg-scifact-<device>.json)")
    args = parser.parse_args(argv)
    device = Settings.from_env().device
    if args.ndcg_only:
        check = {"bench": "embed-ndcg", "machine": machine(device), **ndcg_check(device, args.ndcg or 0)}
        check["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        out = REPO / "docs" / "bench" / f"ndcg-scifact-{device.replace(':', '')}.json"
        out.write_text(json.dumps(check, indent=2) + "\n")
        print(f"wrote {out}")
        print(json.dumps(check))
        return check
    limit = int(os.environ.get("BENCH_EMBED_LIMIT") or 0)
    result = run(args.corpus, device, args.profile_only, args.ndcg, limit, args.papers)
    out = REPO / "docs" / "bench" / f"embed-{result['reindex']['corpus']}-{device.replace(':', '')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.profile_only:
        table = _table(result)
        print(table)
        _section(device, table)
    print(f"wrote {out}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
