"""Embeddings: cached per (content hash, model), resumable after kill -9, equal to plain sentence-transformers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.embed.embeddings import (
    bytes_to_vector,
    embed_missing,
    load_embeddings,
    vector_to_bytes,
)
from research_pipeline.lib.embed.model import resolve_model_path
from research_pipeline.lib.ingest.chunking import chunk_document
from research_pipeline_tests.shared import REPO, SHORT, add_documents


class RenamedModel:
    """The real model under another model_id: how a model change looks to the cache."""

    def __init__(self, inner, model_id: str):
        self.inner = inner
        self.model_id = model_id

    def encode(self, texts, batch_size=64):
        return self.inner.encode(texts, batch_size=batch_size)


def stored(engine, model_id: str) -> dict[str, bytes]:
    e = store.embeddings
    with engine.connect() as conn:
        rows = conn.execute(sa.select(e.c.content_hash, e.c.vector, e.c.shard).where(e.c.model_id == model_id)).all()
    assert all(shard == h[0] for h, _, shard in rows)
    return {h: bytes(v) for h, v, _ in rows}


def test_embeds_each_text_once_per_model(engine, embedder, papers, caplog):
    paper = papers[SHORT[0]]
    # The same paper under a second doc_id (another copy): identical chunk texts, embedded once.
    shard = "1" if paper["shard"] == "0" else "0"
    twin = {**paper, "doc_id": shard + paper["doc_id"][1:], "shard": shard}
    # Short chunks keep the model's work (and the test) small.
    rows = add_documents(engine, [paper, twin], embedder.count_tokens, max_tokens=64)
    distinct = {r["content_hash"] for r in rows}
    assert len(rows) == 2 * len(distinct)

    # One doc shard at a time, as the partitioned asset runs it.
    first = embed_missing(engine, embedder, shard=twin["shard"], batch_size=8)
    assert (first["embedded"], first["cached"]) == (len(distinct), 0)
    again = embed_missing(engine, embedder, shard=paper["shard"], batch_size=8)
    assert (again["embedded"], again["cached"]) == (0, len(distinct))
    assert set(stored(engine, embedder.model_id)) == distinct
    assert embed_missing(engine, embedder)["embedded"] == 0

    # A new paper: only its texts are embedded.
    other = papers[SHORT[1]]
    new_rows = add_documents(engine, [other], embedder.count_tokens, max_tokens=64)
    new = {r["content_hash"] for r in new_rows} - distinct
    assert new
    # Only this call's records: an earlier test may have left the logger at INFO already.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="research_pipeline.lib.embed.embeddings"):
        stats = embed_missing(engine, embedder, batch_size=8)
    assert (stats["embedded"], stats["cached"]) == (len(new), len(distinct))
    assert stats["chunks_per_s"] > 0
    # Progress is standard logging: one record to start, one per committed batch, with fields.
    records = [r for r in caplog.records if r.name == "research_pipeline.lib.embed.embeddings"]
    assert records[0].done == 0 and records[0].total == len(new) and records[0].cached == len(distinct)
    assert [r.done for r in records[1:]] == [min(n, len(new)) for n in range(8, len(new) + 8, 8)]
    assert all(r.model_id == embedder.model_id and r.chunks_per_s > 0 for r in records[1:])

    # Another model id has its own key space and leaves the first model's rows alone.
    before = stored(engine, embedder.model_id)
    renamed = RenamedModel(embedder, embedder.model_id + "#renamed")
    assert embed_missing(engine, renamed, batch_size=8)["embedded"] == len(distinct | new)
    assert stored(engine, embedder.model_id) == before
    assert set(stored(engine, renamed.model_id)) == distinct | new

    e = store.embeddings
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(e)).scalar_one() == 2 * len(distinct | new)


def test_vectors_equal_sentence_transformers(sqlite_url, embedder, papers):
    from sentence_transformers import SentenceTransformer

    engine = store.make_engine(sqlite_url)
    store.create_schema(engine)
    rows = add_documents(engine, [papers[SHORT[1]]], embedder.count_tokens)
    embed_missing(engine, embedder, batch_size=4)
    hashes = [r["content_hash"] for r in rows]
    # Ask in reverse order, with a repeat: rows come back as asked.
    asked = hashes[::-1] + hashes[:1]
    mine = load_embeddings(engine, embedder.model_id, asked)
    plain = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu", local_files_only=True)
    text_of = {r["content_hash"]: r["text"] for r in rows}
    reference = plain.encode([text_of[h] for h in asked], batch_size=64, normalize_embeddings=True)
    assert mine.shape == (len(asked), embedder.dim) and mine.dtype == np.float32
    cosine = np.sum(mine * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.999
    assert np.allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-4)

    with pytest.raises(KeyError, match="f" * 64):
        load_embeddings(engine, embedder.model_id, [hashes[0], "f" * 64])
    with pytest.raises(KeyError):
        load_embeddings(engine, "another-model@256", hashes[:1])
    assert np.array_equal(bytes_to_vector(vector_to_bytes(mine[0]), embedder.dim), mine[0])
    with pytest.raises(ValueError, match="re-run embed_missing"):
        bytes_to_vector(vector_to_bytes(mine[0]), embedder.dim * 2)
    with pytest.raises(ValueError, match="hex digit"):
        embed_missing(engine, embedder, shard="g")
    engine.dispose()


CHILD = textwrap.dedent(
    """
    import logging, sys, time
    from research_pipeline.lib.core import store
    from research_pipeline.lib.embed.model import load_embedder
    from research_pipeline.lib.embed.embeddings import embed_missing

    class Progress(logging.Handler):
        # Reports each progress record to the parent; after the second committed batch it
        # stalls, so the parent's kill -9 lands in the middle of the run whatever the speed.
        batches = 0

        def emit(self, record):
            print(record.getMessage(), flush=True)
            if record.getMessage().startswith("embedded "):
                assert record.done == 16 * (self.batches + 1), record.done
                self.batches += 1
                if self.batches == 2:
                    time.sleep(600)

    logger = logging.getLogger("research_pipeline.lib.embed.embeddings")
    logger.addHandler(Progress())
    logger.setLevel(logging.INFO)
    embed_missing(store.make_engine(sys.argv[1]), load_embedder(), batch_size=16)
    print("finished", flush=True)
    """
)


def test_resumes_after_kill_9(engine, db_url, embedder, papers, tmp_path):
    # ~300 short chunks from a few demo papers.
    docs, rows = [], []
    for name in sorted(n for n in papers if n.startswith("jose-")):
        doc = papers[name]
        docs.append(doc)
        rows += chunk_document(doc, embedder.count_tokens, max_tokens=48, overlap_tokens=6)
        if len({r["content_hash"] for r in rows}) >= 300:
            break
    with engine.begin() as conn:
        store.upsert(conn, store.documents, docs, ["doc_id"])
        store.upsert(conn, store.chunks, rows, ["chunk_id"])
    distinct = {r["content_hash"] for r in rows}
    assert len(distinct) >= 300

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    errors = tmp_path / "child.err"
    with errors.open("w") as err:
        child = subprocess.Popen(
            [sys.executable, str(script), db_url],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        lines = []
        for line in child.stdout:
            lines.append(line)
            if line.startswith("embedded 32/"):
                break
        assert lines and lines[-1].startswith("embedded 32/"), (lines, errors.read_text()[-3000:])
        os.kill(child.pid, signal.SIGKILL)  # the child is stalled in its progress report, mid-run
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    committed = stored(engine, embedder.model_id)
    assert len(committed) == 32, "the two committed batches survive the kill, nothing else"
    resumed = embed_missing(engine, embedder, batch_size=64)
    assert (resumed["embedded"], resumed["cached"]) == (len(distinct) - 32, 32)
    after = stored(engine, embedder.model_id)
    assert set(after) == distinct
    assert all(after[h] == v for h, v in committed.items()), "committed vectors are kept, not rewritten"
    e = store.embeddings
    with engine.connect() as conn:
        n_rows, n_hashes = conn.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(e.c.content_hash)))
        ).one()
    assert n_rows == n_hashes == len(distinct)
