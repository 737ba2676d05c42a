"""Release-gate functions: metrics, the bundled probe set, and each gate's verdict on real tables."""

import csv
import json
import math
from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.release import gates
from research_pipeline_tests.conftest import DEMO_PAPERS, REPO


def test_percentiles_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    pct = gates.percentiles(values[::-1])
    assert (pct["p50"], pct["p95"], pct["p99"], pct["max"]) == (50.0, 95.0, 99.0, 100.0)
    assert gates.percentiles([]) == {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    assert gates.percentiles([7.0])["p95"] == 7.0


def test_ndcg_at_k():
    rel = {"a": 1, "b": 1}
    assert gates.ndcg_at_k(["a", "b", "c"], rel) == pytest.approx(1.0)
    # One relevant paper at rank 2 of two judged: (1/log2 3) / (1 + 1/log2 3).
    assert gates.ndcg_at_k(["c", "a"], rel) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert gates.ndcg_at_k(["c", "d"], rel) == 0.0
    assert gates.ndcg_at_k(["a"], {}) == 0.0
    assert gates.ndcg_at_k(["x"] * 10 + ["a"], {"a": 1}, k=10) == 0.0


def test_bundled_probe_set_matches_the_demo_queries():
    probe = gates.load_probe_set()
    with (REPO / "examples" / "queries.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    with (DEMO_PAPERS / "ATTRIBUTION.tsv").open(encoding="utf-8") as fh:
        sha = {r["file"]: r["sha256"] for r in csv.DictReader(fh, delimiter="\t")}
    assert sorted(probe.queries.values()) == sorted(r["query"] for r in rows)
    by_text = {text: qid for qid, text in probe.queries.items()}
    for r in rows:
        expected = {sha[f.strip()] for f in r["files"].split(";")}
        assert set(probe.qrels[by_text[r["query"]]]) == expected
    # The doc ids are the sha256 of the PDF bytes, i.e. what ingest uses as doc_id.
    pdf = next(iter(sha))
    assert util.sha256_hex((DEMO_PAPERS / pdf).read_bytes()) == sha[pdf]


def test_probe_set_limited_prefers_answerable_queries():
    probe = gates.load_probe_set()
    q, rel = sorted(probe.qrels.items())[-1]
    small = probe.limited(1, set(rel))
    assert list(small.queries) == [q]
    assert probe.limited(0, set()) is probe
    assert gates.answerable_qrels(probe, set(rel)) == {
        qid: {d: r for d, r in judged.items() if d in rel} for qid, judged in probe.qrels.items() if set(judged) & set(rel)
    }


def test_probe_set_errors_name_the_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="queries.jsonl and qrels.tsv"):
        gates.load_probe_set(tmp_path)


def test_latency_gate():
    ok = gates.latency_gate([10.0, 20.0, 30.0], 30.0)
    assert ok.passed and ok.metadata["latency_ms_p95"] == 30.0 and ok.metadata["probe_queries"] == 3
    bad = gates.latency_gate([10.0, 20.0, 31.0], 30.0)
    assert not bad.passed and "exceeds the SLA" in bad.description and "RP_GATE_LATENCY_P95_MS" in bad.description


def test_quality_gate_floor_regression_and_not_applicable():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    perfect = {"q1": ["a"], "q2": ["b"]}
    half = {"q1": ["a"], "q2": ["x"]}
    assert gates.quality_gate(perfect, qrels, 0.3, 0.05).passed
    low = gates.quality_gate(half, qrels, 0.9, 0.05)
    assert not low.passed and low.metadata["ndcg_at_10"] == 0.5 and "below the floor" in low.description
    regressed = gates.quality_gate(half, qrels, 0.3, 0.05, live_rankings=perfect)
    assert not regressed.passed and "regressed" in regressed.description
    assert regressed.metadata["live_ndcg_at_10"] == 1.0
    na = gates.quality_gate({}, {}, 0.3, 0.05)
    assert na.passed and "not applicable" in na.description and na.metadata["probe_queries"] == 0


def _doc(doc_id: str, quality: float = 1.0, hours_ago: float = 0.0) -> dict:
    return {
        "doc_id": doc_id,
        "shard": doc_id[0],
        "source_kind": "record",
        "title": f"title {doc_id[:4]}",
        "text": "body",
        "page_offsets": "[0]",
        "page_count": 1,
        "parser": "test",
        "parser_version": "1",
        "quality": quality,
        "ingested_at": util.utcnow() - timedelta(hours=hours_ago),
    }


def _chunk(doc_id: str, ordinal: int, text: str) -> dict:
    h = util.sha256_hex(text)
    return {
        "chunk_id": util.sha256_hex(f"{doc_id}|{ordinal}|{h}"),
        "doc_id": doc_id,
        "shard": doc_id[0],
        "ordinal": ordinal,
        "section": "Body",
        "is_references": False,
        "page_start": 1,
        "page_end": 1,
        "char_start": 0,
        "char_end": len(text),
        "n_tokens": len(text.split()),
        "content_hash": h,
        "text": text,
    }


def test_volume_gate_counts_the_real_artifacts(engine):
    from research_pipeline.lib.embed import vectors
    from research_pipeline.lib.embed.embeddings import vector_to_bytes
    from research_pipeline.lib.search import fts

    docs = [_doc(util.sha256_hex(f"doc{i}")) for i in range(3)]
    chunks = [_chunk(d["doc_id"], j, f"passage {j} of paper {d['doc_id'][:6]}") for d in docs for j in range(2)]
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((len(chunks), 8)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with engine.begin() as conn:
        conn.execute(sa.insert(store.documents), docs)
        conn.execute(sa.insert(store.chunks), chunks)
        conn.execute(
            sa.insert(store.embeddings),
            [
                {"content_hash": c["content_hash"], "model_id": "m", "shard": c["content_hash"][0], "dim": 8,
                 "vector": vector_to_bytes(v), "created_at": util.utcnow()}
                for c, v in zip(chunks, vecs)
            ],
        )
    table = "fts_test_volume"
    assert fts.build_fts(engine, table) == len(chunks)
    index, _ = vectors.build_vector_index(vecs)
    vi = vectors.VectorIndex(index=index, chunk_ids=[c["chunk_id"] for c in chunks])
    gen = {"gen_id": "g", "model_id": "m", "n_documents": 3, "n_chunks": len(chunks), "fts_table": table}
    th = gates.GateThresholds()

    ok = gates.volume_gate(engine, gen, None, th, vi)
    assert ok.passed, ok.description
    assert (ok.metadata["fts_rows"], ok.metadata["vectors"], ok.metadata["embeddings"]) == (6, 6, 6)

    few = gates.volume_gate(engine, gen, None, gates.GateThresholds(min_documents=4), vi)
    assert not few.passed and "only 3 documents" in few.description

    dropped = gates.volume_gate(engine, gen, {"n_documents": 4}, th, vi)
    assert not dropped.passed and dropped.metadata["document_drop_share"] == 0.25

    with engine.begin() as conn:
        conn.execute(sa.delete(store.embeddings).where(store.embeddings.c.content_hash == chunks[0]["content_hash"]))
    missing = gates.volume_gate(engine, gen, None, th, vi)
    assert not missing.passed and missing.metadata["embeddings"] == 5 and "incomplete" in missing.description
    fts.drop_fts(engine, table)
    assert gates.volume_gate(engine, gen, None, th, vi).metadata["fts_rows"] == 0


def test_advisory_gates(engine):
    with engine.begin() as conn:
        conn.execute(
            sa.insert(store.documents),
            [_doc(util.sha256_hex("a"), 0.9, hours_ago=1), _doc(util.sha256_hex("b"), 0.3, hours_ago=2)],
        )
        conn.execute(
            sa.insert(store.quarantine),
            [{"uri": "x.pdf", "reason": "corrupt", "message": "m", "quarantined_at": util.utcnow()}],
        )
    th = gates.GateThresholds(max_quarantine_share=0.5, min_median_quality=0.2)
    ok = gates.parse_quality_gate(engine, th)
    assert ok.passed and ok.metadata["quarantine_share"] == pytest.approx(1 / 3, abs=1e-3)
    assert ok.metadata["low_quality_documents"] == 1 and ok.metadata["quality_min"] == 0.3
    warn = gates.parse_quality_gate(engine, gates.GateThresholds(max_quarantine_share=0.2))
    assert not warn.passed and "quarantined" in warn.description

    fresh = gates.freshness_gate(engine, None, th)
    assert fresh.passed and 0.9 < fresh.metadata["hours_since_newest_document"] < 1.5
    stale = gates.freshness_gate(engine, None, gates.GateThresholds(max_staleness_hours=0.5))
    assert not stale.passed and "inbox sensor" in stale.description
    json.dumps(stale.metadata)  # plain numbers only
