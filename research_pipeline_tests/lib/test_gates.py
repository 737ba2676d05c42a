"""Release-gate functions: metrics, the bundled probe set, and each gate's verdict on real tables."""

import csv
import json
from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.release import gates, probes
from research_pipeline.lib.release.ir_metrics import (
    percentile,
    percentiles,
    rank_biased_overlap,
)
from research_pipeline_tests.shared import DEMO_PAPERS, REPO


def test_percentiles_interpolate_between_ranks():
    values = [float(v) for v in range(1, 101)]  # 1..100
    pct = percentiles(values[::-1])
    # Position (n - 1) * q: p95 sits 5% of the way from the 95th value to the 96th.
    assert (pct["p50"], pct["p95"], pct["p99"], pct["max"]) == pytest.approx((50.5, 95.05, 99.01, 100.0))
    assert percentiles([]) == {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    assert percentiles([7.0])["p95"] == 7.0


def test_latency_gate_and_evaluation_share_one_percentile():
    """The latency gate's p95 is the evaluation's p95: the same figure for the same latencies."""
    from research_pipeline.lib.release import evaluate

    latencies = [3.0, 40.0, 7.0, 12.0, 90.0, 5.0, 8.0]
    assert gates.latency_gate(latencies, 1e9).metadata["latency_ms_p95"] == round(percentile(latencies, 95), 3)
    assert evaluate.percentile is percentile


def test_rank_biased_overlap():
    a = ["a", "b", "c", "d", "e"]
    assert rank_biased_overlap(a, a) == pytest.approx(1.0)
    assert rank_biased_overlap(a, ["v", "w", "x", "y", "z"]) == 0.0
    assert rank_biased_overlap([], []) == 1.0 and rank_biased_overlap(a, []) == 0.0
    top_swapped = ["b", "a", "c", "d", "e"]
    bottom_swapped = ["a", "b", "c", "e", "d"]
    # Top-weighted: disagreeing at the top costs more than at the bottom; symmetric.
    assert rank_biased_overlap(a, top_swapped) < rank_biased_overlap(a, bottom_swapped) < 1.0
    assert rank_biased_overlap(a, top_swapped) == pytest.approx(rank_biased_overlap(top_swapped, a))
    # Webber et al.'s RBO_ext at depth 2 for (a, b) vs (b, a): X1 = 0, X2 = 2 -> p^2 + (1 - p) p.
    assert rank_biased_overlap(["a", "b"], ["b", "a"], p=0.9) == pytest.approx(0.81 + 0.1 * 0.9)
    with pytest.raises(ValueError, match="0 < p < 1"):
        rank_biased_overlap(a, a, p=1.0)


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
    q, rel = max(probe.qrels.items())
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
    # p95 of 10, 20, 30 interpolates to 29.0; of 10, 20, 32 to 30.8.
    ok = gates.latency_gate([10.0, 20.0, 30.0], 29.0)
    assert ok.passed and ok.metadata["latency_ms_p95"] == 29.0 and ok.metadata["probe_queries"] == 3
    bad = gates.latency_gate([10.0, 20.0, 32.0], 30.0)
    assert not bad.passed and "exceeds the SLA" in bad.description and "RP_GATE_LATENCY_P95_MS" in bad.description


def _probe_run(found: dict[str, int], live: dict[str, list[str]] | None = None) -> probes.ProbeRun:
    """Ten title probes of papers p0..p9; `found[mode]` of them ranked first in that mode, the rest missed."""
    items = [probes.KnownItemProbe(f"title:p{i}", "title", f"paper {i}", f"p{i}") for i in range(10)]
    rankings = {
        mode: {p.qid: ([p.target] if i < found.get(mode, 10) else ["other"]) for i, p in enumerate(items)}
        for mode in probes.PROBE_MODES
    }
    run = probes.ProbeRun(items, rankings, live_rankings=live, live_status="compared" if live is not None else "no live generation")
    return run


def test_quality_gate_on_known_item_probes():
    th = gates.GateThresholds()
    ok = gates.quality_gate(_probe_run({}), th)
    assert ok.passed, ok.description
    assert (ok.metadata["n_probes"], ok.metadata["success_at_10"], ok.metadata["mrr_at_10"]) == (10, 1.0, 1.0)
    # No bundled paper, no live generation: neither is scored, neither passes as a 0.
    assert "ndcg_at_10" not in ok.metadata and "live_ndcg_at_10" not in ok.metadata and "rbo_vs_live" not in ok.metadata

    broken_dense = gates.quality_gate(_probe_run({"dense": 2}), th)
    assert not broken_dense.passed and broken_dense.metadata["dense_success_at_10"] == 0.2
    assert "dense search finds 20.0%" in broken_dense.description and "vector index" in broken_dense.description

    empty = gates.quality_gate(probes.ProbeRun([]), th)
    assert not empty.passed and "no known-item probe could be drawn" in empty.description


def test_quality_gate_against_live():
    th = gates.GateThresholds()
    same = {f"title:p{i}": [f"p{i}"] for i in range(10)}
    agreed = gates.quality_gate(_probe_run({}, live=same), th)
    assert agreed.passed and agreed.metadata["rbo_vs_live"] == 1.0 and agreed.metadata["live_success_at_10"] == 1.0
    # The candidate misses 3 papers live found: success dropped by 0.3 and the rankings disagree.
    worse = gates.quality_gate(_probe_run({"hybrid": 7}, live=same), th)
    assert not worse.passed and worse.metadata["success_at_10_drop_vs_live"] == pytest.approx(0.3)
    assert "fell from 100.0% on the live generation to 70.0%" in worse.description
    assert worse.metadata["rbo_vs_live"] == pytest.approx(0.7) and "rank-biased overlap" not in worse.description
    strict = gates.quality_gate(_probe_run({"hybrid": 7}, live=same), gates.GateThresholds(probe_min_rbo=0.75))
    assert "rank-biased overlap 0.700" in strict.description and "RP_GATE_PROBE_MIN_RBO" in strict.description


def test_quality_gate_bundled_probe_set():
    th = gates.GateThresholds(ndcg_floor=0.9)
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    perfect = {"q1": ["a"], "q2": ["b"]}
    half = {"q1": ["a"], "q2": ["x"]}
    assert gates.quality_gate(_probe_run({}), th, perfect, qrels).passed
    low = gates.quality_gate(_probe_run({}), th, half, qrels)
    assert not low.passed and low.metadata["ndcg_at_10"] == 0.5 and "below the floor" in low.description
    regressed = gates.quality_gate(_probe_run({}), gates.GateThresholds(), half, qrels, live_rankings=perfect)
    assert not regressed.passed and "regressed" in regressed.description
    assert regressed.metadata["live_ndcg_at_10"] == 1.0


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


def test_figures_that_do_not_exist_are_left_out_not_written_as_0_or_minus_1(engine):
    """An empty store, no live generation, no probe query: no age, share, quantile or percentile
    is reported (a -1 h age or a 0 ms p95 would plot as data), and the gates say why."""
    th = gates.GateThresholds()
    fresh = gates.freshness_gate(engine, None, th)
    assert not fresh.passed and "no document has been ingested" in fresh.description
    assert set(fresh.metadata) == {"max_staleness_hours"}
    parse = gates.parse_quality_gate(engine, th)
    assert not parse.passed and "nothing has been ingested" in parse.description
    assert set(parse.metadata) == {"documents", "quarantined", "low_quality_documents", "ocr_documents"}
    latency = gates.latency_gate([], 100.0)
    assert not latency.passed and "not measured" in latency.description
    assert set(latency.metadata) == {"probe_queries", "sla_p95_ms"}

    with engine.begin() as conn:
        conn.execute(sa.insert(store.documents), [_doc(util.sha256_hex("a"), 0.8, hours_ago=3)])
    gen = {"gen_id": "g", "model_id": "m", "n_documents": 1, "n_chunks": 0, "fts_table": ""}
    volume = gates.volume_gate(engine, gen, None, th, None)
    assert "live_documents" not in volume.metadata and "document_drop_share" not in volume.metadata
    assert gates.volume_gate(engine, gen, {"n_documents": 2}, th, None).metadata["document_drop_share"] == 0.5
    fresh = gates.freshness_gate(engine, None, th)
    assert fresh.passed and "hours_since_live_published" not in fresh.metadata
    assert 2.9 < fresh.metadata["hours_since_newest_document"] < 3.5
    live = {"published_at": util.utcnow() - timedelta(hours=5)}
    assert 4.9 < gates.freshness_gate(engine, live, th).metadata["hours_since_live_published"] < 5.5
    parse = gates.parse_quality_gate(engine, th)
    assert parse.passed and parse.metadata["quality_p50"] == parse.metadata["quality_min"] == 0.8
    assert parse.metadata["quarantine_share"] == 0.0, "a share of a real corpus, 0 quarantined"
