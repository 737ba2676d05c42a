"""Benchmark: the Embedder on a GPU against raw `SentenceTransformer.encode` on the same GPU.

For a GPU machine that has torch and sentence-transformers but not the project's environment
(no database, no PDF parser): the chunk texts are exported where the project runs, and the run
on the GPU needs only the model folder, this file, bench/machine.py and lib/embed/model.py.

    # where the project runs: the demo corpus's distinct chunk texts, in document order
    .venv/bin/python -m bench.bench_embed_gpu --export texts.json
    # on the GPU machine (model: a local sentence-transformers folder)
    python -m bench.bench_embed_gpu --texts texts.json --model /path/to/all-MiniLM-L6-v2 --json

Same texts, same run, order A B C C B A, best of REPEATS each: A raw fp32 `encode`, B the
Embedder's default path (`precision="auto"`: bf16 autocast where the GPU has native bf16),
C raw `encode` under bf16 autocast; at batch 64 (the pipeline's default) and at larger batches.
Quality: B's vectors against A's (GPU fp32) and against fp32 on this machine's CPU (the key space
question: may GPU vectors share the CPU model id). B is `Embedder.encode` alone: embed_missing's
database round trips per batch are not in it (the result says so). Also: one-query latency
(`encode_query`) on the GPU. The last line printed is one JSON object; `--out` writes it to a file
(docs/bench/embed-<corpus>-cuda.json is what the capacity plan reads).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUERIES = REPO / "examples" / "queries.tsv"
BATCH = 64
LARGER_BATCHES = (256, 1024)
REPEATS = 3


def export_texts(out: Path, corpus: Path = REPO / "examples" / "papers", name: str = "demo") -> int:
    """Ingest and chunk `corpus` with the pipeline into a scratch SQLite; write its distinct chunk texts."""
    import tempfile

    import sqlalchemy as sa

    from research_pipeline.lib.core import store
    from research_pipeline.lib.embed.model import available_cores, load_embedder
    from research_pipeline.lib.ingest.chunking import chunk_documents
    from research_pipeline.lib.ingest.pipeline import ingest
    from research_pipeline.lib.ingest.sources import sources_for

    with tempfile.TemporaryDirectory(prefix="bench_embed_gpu_") as tmp:
        engine = store.make_engine(f"sqlite:///{Path(tmp) / 'rp.db'}")
        store.create_schema(engine)
        ingest(engine, sources_for(corpus), workers=available_cores(), ocr=False)
        embedder = load_embedder()
        chunk_documents(engine, embedder.count_tokens, max_tokens=embedder.max_seq_length)
        c = store.chunks
        with engine.connect() as conn:
            rows = conn.execute(sa.select(c.c.content_hash, c.c.text).order_by(c.c.doc_id, c.c.ordinal)).all()
        engine.dispose()
    texts = list({h: t for h, t in rows}.values())
    out.write_text(json.dumps({"corpus": name, "model_id": embedder.model_id, "texts": texts}))
    return len(texts)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn, repeats: int = REPEATS) -> tuple[Any, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync()
        started = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - started)
    return out, best


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}


def run(texts: list[str], model: str, device: str = "cuda") -> dict[str, Any]:
    """A B C C B A at each batch size, quality against GPU and CPU fp32, one-query latency."""
    import torch
    from sentence_transformers import SentenceTransformer

    from bench.machine import machine
    from research_pipeline.lib.embed.model import Embedder

    plain = SentenceTransformer(model, device=device, local_files_only=True)
    embedder = Embedder(model, device=device, precision="auto")

    def raw(batch: int, bf16: bool):  # noqa: ANN202
        kind = "cuda" if device.startswith("cuda") else "cpu"
        ctx = torch.autocast(kind, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        def go() -> np.ndarray:
            with ctx:
                v = plain.encode(texts, batch_size=batch, normalize_embeddings=True, show_progress_bar=False)
            return np.asarray(v, dtype=np.float32)

        return go

    by_batch: dict[str, Any] = {}
    vectors: dict[str, np.ndarray] = {}
    for batch in (BATCH, *LARGER_BATCHES):
        methods = {
            "raw_fp32": raw(batch, False),
            "pipeline": lambda b=batch: embedder.encode(texts, batch_size=b),
            "raw_bf16": raw(batch, True),
        }
        for fn in methods.values():  # warm-up: kernels, allocator, autotuning
            fn()
        seconds = dict.fromkeys(methods, float("inf"))
        for name in ("raw_fp32", "pipeline", "raw_bf16", "raw_bf16", "pipeline", "raw_fp32"):
            out, s = _best(methods[name])
            seconds[name] = min(seconds[name], s)
            vectors.setdefault(name, out)
        by_batch[str(batch)] = {
            **{f"{k}_chunks_per_s": round(len(texts) / v, 1) for k, v in seconds.items()},
            "ratio": round(seconds["raw_fp32"] / seconds["pipeline"], 3),
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }
    cpu = SentenceTransformer(model, device="cpu", local_files_only=True)
    cpu_fp32 = np.asarray(cpu.encode(texts, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)
    queries = [line.split("\t")[0] for line in QUERIES.read_text().splitlines()[1:] if line.strip()]
    for q in queries:
        embedder.encode_query(q)
    times = []
    for _ in range(3):
        for q in queries:
            _sync()
            started = time.perf_counter()
            embedder.encode_query(q)
            times.append((time.perf_counter() - started) * 1000)
    at = by_batch[str(BATCH)]
    return {
        "pipeline_chunks_per_s": at["pipeline_chunks_per_s"],
        "raw_fp32_chunks_per_s": at["raw_fp32_chunks_per_s"],
        "raw_bf16_chunks_per_s": at["raw_bf16_chunks_per_s"],
        "ratio": at["ratio"],
        "min_cosine_to_fp32": _cosines(vectors["pipeline"], vectors["raw_fp32"])["min"],
        "cosine_pipeline_to_gpu_fp32": _cosines(vectors["pipeline"], vectors["raw_fp32"]),
        "cosine_pipeline_to_cpu_fp32": _cosines(vectors["pipeline"], cpu_fp32),
        "cosine_gpu_fp32_to_cpu_fp32": _cosines(vectors["raw_fp32"], cpu_fp32),
        "by_batch_size": by_batch,
        "query_ms": {"p50": round(statistics.median(times), 3), "p95": round(float(np.percentile(times, 95)), 3),
                     "queries": len(times)},
        "bench": "embed",
        "pipeline": "Embedder.encode without the database (embed_missing's per-batch reads and commits not included)",
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "numeric_path": embedder.numeric_path,
        "path_reason": embedder.path_reason,
        "batch_size": BATCH,
        "texts": len(texts),
        "machine": machine(device),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="write the demo corpus's chunk texts here and stop")
    parser.add_argument("--texts", type=Path, help="chunk texts written by --export")
    parser.add_argument("--model", help="local sentence-transformers folder of the model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.export:
        print(json.dumps({"exported": export_texts(args.export), "to": str(args.export)}))
        return
    if not (args.texts and args.model):
        parser.error("--texts and --model are needed (or --export)")
    data = json.loads(args.texts.read_text())
    result = {**run(data["texts"], args.model, args.device), "model_id": data["model_id"], "corpus": data["corpus"]}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.json:
        for batch, r in result["by_batch_size"].items():
            print(f"batch {batch}: raw fp32 {r['raw_fp32_chunks_per_s']}/s, pipeline {r['pipeline_chunks_per_s']}/s "
                  f"({result['numeric_path']}), raw bf16 {r['raw_bf16_chunks_per_s']}/s, ratio {r['ratio']}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
