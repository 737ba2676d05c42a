"""Benchmark of the row migration: SQLite -> PostgreSQL, against a raw psycopg COPY of the same rows.

The source is a SQLite database of >= 100k chunks with embeddings: real passages (SciFact and
Cranfield abstracts from the shared data, cut into chunk-sized pieces) and random unit vectors
of the model's dimension. The pipeline (`rows.migrate_rows` over all 16 shards: read,
canonical digests, COPY, read-back verification, state) and the raw primitive (psycopg COPY
of the same rows, already in memory, into an empty copy of the schema) run in the same process
on the same data, each into a fresh database.

Run from the repository root:  .venv/bin/python -m bench.bench_migrate [--chunks N] [--workers W] [--threads]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.migration.codec import RowCodec
from research_pipeline.lib.migration.endpoints import (
    MigrationSource,
    MigrationTarget,
    open_source_engine,
    open_target_engine,
    prepare_target,
)
from research_pipeline.lib.migration.rows import migrate_rows
from research_pipeline.lib.migration.tables import TABLE_SPECS
from research_pipeline.lib.migration.verify import verify

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RP_SHARED_DATA", REPO.parent / "shared" / "data"))
CHUNKS_PER_DOC = 50
DIM = 384
MODEL_ID = "all-MiniLM-L6-v2@256"
PG_ADMIN = os.environ.get("RP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _passages() -> list[str]:
    out = []
    for name in ("scifact", "cranfield"):
        with open(SHARED / "ir" / name / "corpus.jsonl", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                text = f"{rec.get('title', '')}. {rec.get('text', '')}".strip()
                # Chunk-sized pieces (~1 KB, what 256 tokens of prose come to).
                out += [text[i : i + 1000] for i in range(0, len(text), 1000) if len(text[i : i + 1000]) > 100]
    return out


def build_source(path: Path, n_chunks: int) -> str:
    """A SQLite deployment with `n_chunks` chunks and one embedding each."""
    url = f"sqlite:///{path}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    passages = _passages()
    rng = np.random.default_rng(0)
    now = util.utcnow()
    n_docs = n_chunks // CHUNKS_PER_DOC
    with engine.begin() as conn:
        for d in range(n_docs):
            doc_id = util.sha256_hex(f"bench-doc-{d}")
            pieces = [f"[{d}.{o}] {passages[(d * CHUNKS_PER_DOC + o) % len(passages)]}" for o in range(CHUNKS_PER_DOC)]
            text = "\n".join(pieces)
            store.upsert(conn, store.documents, [dict(
                doc_id=doc_id, shard=doc_id[0], source_kind="record", title=pieces[0][:80], authors="[]",
                year=2000 + d % 25, abstract=pieces[0][:300], doi=None, arxiv_id=None, language="en", page_count=1,
                text=text, page_offsets="[0]", parser="jsonl", parser_version="1", quality=1.0, garbled_ratio=0.0,
                empty_pages=0, ocr_pages=0, extra=None, ingested_at=now)], ["doc_id"])
            chunks, embs, pos = [], [], 0
            vecs = rng.standard_normal((CHUNKS_PER_DOC, DIM)).astype("<f4")
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            for o, piece in enumerate(pieces):
                h = util.sha256_hex(piece)
                chunks.append(dict(
                    chunk_id=util.sha256_hex(f"{doc_id}|{o}|{h}"), doc_id=doc_id, shard=doc_id[0], ordinal=o,
                    section="Abstract", is_references=False, page_start=1, page_end=1, char_start=pos,
                    char_end=pos + len(piece), n_tokens=len(piece.split()), content_hash=h, text=piece))
                embs.append(dict(content_hash=h, model_id=MODEL_ID, shard=h[0], dim=DIM, vector=vecs[o].tobytes(),
                                 created_at=now))
                pos += len(piece) + 1
            store.upsert(conn, store.chunks, chunks, ["chunk_id"])
            store.upsert(conn, store.embeddings, embs, ["content_hash", "model_id"], update=())
    engine.dispose()
    return url


def _new_db(tag: str) -> str:
    name = f"rp_bench_{tag}_{os.getpid()}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.engine.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)


def _drop_db(url: str) -> None:
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{sa.engine.make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


_ENDPOINTS: dict[tuple[str, str], tuple[MigrationSource, MigrationTarget]] = {}


def _migrate_shard(source_url: str, target_url: str, shard: str | None) -> dict:
    """migrate_rows of one shard in this worker process (engines opened once per process);
    `shard=None` only opens them, so the timed run does not pay for imports and connects."""
    if (source_url, target_url) not in _ENDPOINTS:
        target = MigrationTarget(open_target_engine(target_url, source_url))
        _ENDPOINTS[(source_url, target_url)] = (MigrationSource.open(source_url), target)
    source, target = _ENDPOINTS[(source_url, target_url)]
    if not shard:
        return {}
    result = migrate_rows(source, target, shard)
    return {"rows": result.rows, "bytes": result.bytes}


def run_pipeline(source_url: str, workers: int, processes: bool = True) -> dict:
    """migrate_rows over all 16 shards, `workers` shards at a time: in worker processes, as a
    backfill's partition runs are, or in threads of this process."""
    url = _new_db("pipeline")
    try:
        source = MigrationSource.open(source_url)
        target = MigrationTarget(open_target_engine(url, source_url))
        prepare_target(target.engine)
        pool_type = ProcessPoolExecutor if processes else ThreadPoolExecutor
        with pool_type(max_workers=workers) as pool:
            list(pool.map(_migrate_shard, [source_url] * workers, [url] * workers, [None] * workers))
            t0 = time.perf_counter()
            results = list(pool.map(_migrate_shard, [source_url] * 16, [url] * 16, store.SHARDS))
            seconds = time.perf_counter() - t0
        report = verify(source, target)
        assert report.ok, report.summary()
        source.engine.dispose()
        target.engine.dispose()
        return {"rows": sum(r["rows"] for r in results), "bytes": sum(r["bytes"] for r in results), "seconds": seconds}
    finally:
        _drop_db(url)


def run_raw(source_url: str) -> dict:
    """psycopg COPY of the same rows (read into memory first, not timed) into an empty schema."""
    url = _new_db("raw")
    try:
        source = open_source_engine(source_url)
        tables = {}
        with source.connect() as conn:
            for spec in TABLE_SPECS:
                codec = RowCodec(spec)
                tables[spec.name] = [codec.to_pg(codec.clean(r)) for r in conn.execute(sa.select(spec.table)).all()]
        source.dispose()
        target = store.make_engine(url)
        store.create_schema(target)
        with target.begin() as conn:
            conn.exec_driver_sql("TRUNCATE schema_version")
        rows = nbytes = 0
        t0 = time.perf_counter()
        with target.begin() as conn:
            raw = conn.connection.driver_connection
            for name, data in tables.items():
                cols = ", ".join(f'"{c.name}"' for c in store.metadata.tables[name].columns)
                with raw.cursor() as cur, cur.copy(f'COPY "{name}" ({cols}) FROM STDIN') as copy:
                    for row in data:
                        copy.write_row(row)
                rows += len(data)
                nbytes += sum(len(v) for row in data for v in row if isinstance(v, (str, bytes)))
        seconds = time.perf_counter() - t0
        target.dispose()
        return {"rows": rows, "bytes": nbytes, "seconds": seconds}
    finally:
        _drop_db(url)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2, help="shards migrated concurrently (default: one per core)")
    parser.add_argument("--threads", action="store_true", help="shards in threads of one process, not in processes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_migrate_") as tmp:
        t0 = time.perf_counter()
        source_url = build_source(Path(tmp) / "rp.db", args.chunks)
        build_s = time.perf_counter() - t0
        raw = run_raw(source_url)
        pipe = run_pipeline(source_url, args.workers, processes=not args.threads)
    assert pipe["rows"] == raw["rows"], (pipe["rows"], raw["rows"])
    rows_ratio = (pipe["rows"] / pipe["seconds"]) / (raw["rows"] / raw["seconds"])
    print(f"source: {args.chunks} chunks + {args.chunks} embeddings + {args.chunks // CHUNKS_PER_DOC} documents "
          f"(built in {build_s:.0f}s); {os.cpu_count()} CPUs; {args.workers} shards at a time in "
          f"{'threads' if args.threads else 'processes'}\n")
    print("| run | rows | MB | seconds | rows/s | MB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("migrate_rows x16 shards (read+COPY+verify)", pipe), ("raw psycopg COPY (rows in memory)", raw)):
        print(f"| {name} | {r['rows']} | {r['bytes'] / 1e6:.0f} | {r['seconds']:.1f} | "
              f"{r['rows'] / r['seconds']:.0f} | {r['bytes'] / 1e6 / r['seconds']:.1f} |")
    print(f"\npipeline / raw throughput: {rows_ratio:.2f}x")


if __name__ == "__main__":
    main()
