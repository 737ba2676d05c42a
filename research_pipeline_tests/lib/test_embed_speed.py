"""The Embedder's numeric paths: which one runs, its fallbacks, its key space, and its vectors
against float32 on real texts; embed_missing's path and backlog figures. Speed itself is
measured only by bench/bench_embed.py."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.embed import model as model_mod
from research_pipeline.lib.embed.embeddings import backlog, embed_missing
from research_pipeline.lib.embed.model import SAME_VECTORS_COSINE, Embedder, native_bf16
from research_pipeline.lib.ingest.chunking import chunk_document
from research_pipeline_tests.shared import IR, SHORT, add_documents, require_shared


@pytest.fixture(scope="module")
def fp32():
    return Embedder(precision="fp32")


@pytest.fixture(scope="module")
def scifact_texts() -> list[str]:
    path = require_shared(IR / "scifact" / "corpus.jsonl")
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in itertools.islice(fh, 120)]
    return [f"{r.get('title', '')}\n{r['text']}" for r in records]


def test_auto_picks_bf16_only_where_native_and_keeps_the_model_id(embedder, fp32):
    assert fp32.numeric_path == "cpu/fp32" and not fp32._autocast
    expected = "cpu/bf16-autocast" if native_bf16("cpu") else "cpu/fp32"
    assert embedder.numeric_path == expected, embedder.path_reason
    # Same vectors (cosine >= 0.999 on the probes) -> same key space as float32.
    assert embedder.model_id == fp32.model_id == "all-MiniLM-L6-v2@256"
    if embedder._autocast:
        assert embedder.probe_min_cosine >= SAME_VECTORS_COSINE


def test_default_path_vectors_match_fp32_on_scifact_and_chunks(embedder, fp32, scifact_texts, papers):  # noqa: F811
    chunk_texts = [r["text"] for p in SHORT for r in chunk_document(papers[p], embedder.count_tokens, 256, 32)]
    texts = scifact_texts + chunk_texts
    mine, ref = embedder.encode(texts), fp32.encode(texts)
    assert mine.dtype == np.float32 and mine.shape == ref.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(mine * ref, axis=1)
    assert cosine.min() >= SAME_VECTORS_COSINE, (cosine.min(), texts[int(cosine.argmin())][:80])
    # One query on one thread comes out as the same vector as in a batch.
    q = scifact_texts[0]
    assert float(embedder.encode_query(q) @ mine[0]) > 0.9999


def test_fallbacks_and_own_key_space(monkeypatch):
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        Embedder(precision="int8")
    monkeypatch.setattr(model_mod, "native_bf16", lambda device: False)
    assert Embedder(precision="auto").numeric_path == "cpu/fp32"
    monkeypatch.undo()
    if not native_bf16("cpu"):
        pytest.skip("the probe check below needs bf16 kernels")
    # A numeric path whose vectors are not the float32 vectors: auto falls back; an explicit bf16
    # gets its own model id, so its vectors never mix with float32's in the cache.
    monkeypatch.setattr(model_mod, "SAME_VECTORS_COSINE", 1.01)
    auto = Embedder(precision="auto")
    assert auto.numeric_path == "cpu/fp32" and "fp32" in auto.path_reason
    forced = Embedder(precision="bf16")
    assert forced.numeric_path == "cpu/bf16-autocast"
    assert forced.model_id == "all-MiniLM-L6-v2@256+bf16"


def test_embed_missing_reports_path_and_backlog(sqlite_url, embedder, papers):  # noqa: F811
    engine = store.make_engine(sqlite_url)
    store.create_schema(engine)
    rows = add_documents(engine, [papers[SHORT[0]]], embedder.count_tokens, max_tokens=64)
    distinct = {r["content_hash"] for r in rows}
    shard = rows[0]["shard"]
    before = backlog(engine, embedder.model_id)
    assert set(before) == set(store.SHARDS)
    assert before[shard] == len(distinct) and sum(before.values()) == len(distinct)
    stats = embed_missing(engine, embedder, shard=shard, batch_size=16)
    assert stats["numeric_path"] == embedder.numeric_path and stats["model_id"] == embedder.model_id
    assert (stats["embedded"], stats["backlog"]) == (len(distinct), 0)
    assert sum(backlog(engine, embedder.model_id).values()) == 0
    # Another model's backlog is the whole corpus again; removing one vector adds one back.
    assert backlog(engine, "another@256")[shard] == len(distinct)
    with engine.begin() as conn:
        conn.execute(sa.delete(store.embeddings).where(store.embeddings.c.content_hash == rows[0]["content_hash"]))
    assert backlog(engine, embedder.model_id)[shard] == 1
    engine.dispose()
