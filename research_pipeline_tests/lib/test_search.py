"""Hybrid Searcher on both backends: per-paper grouping, fusion, filters, References weight, safe queries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from research_pipeline.lib.core import store, util
from research_pipeline.lib.embed.model import load_embedder
from research_pipeline.lib.embed.vectors import VectorIndex, build_vector_index
from research_pipeline.lib.search import fts
from research_pipeline.lib.search.searcher import (
    PaperHit,
    Searcher,
    SearchFilters,
    make_snippet,
)
from research_pipeline_tests.shared import load_records, scifact_records

N_DOCS = 40


@pytest.fixture(scope="module")
def corpus():
    """40 real SciFact abstracts with their real MiniLM embeddings (embedded once per module)."""
    records = scifact_records(N_DOCS)
    embedder = load_embedder()
    return records, embedder, embedder.encode([r["text"] for r in records])


@pytest.fixture
def searcher(engine, corpus):
    """A Searcher over the corpus, with years and authors set, plus one paper whose second chunk
    is a References section quoting the first paper's abstract."""
    records, embedder, vecs = corpus
    ids = load_records(engine, records)
    chunk_of = {rid: cid for cid, rid in ids.items()}
    with engine.begin() as conn:
        for i, rec in enumerate(records):
            doc_id = conn.execute(
                sa.select(store.chunks.c.doc_id).where(store.chunks.c.chunk_id == chunk_of[rec["_id"]])
            ).scalar_one()
            conn.execute(
                sa.update(store.documents)
                .where(store.documents.c.doc_id == doc_id)
                .values(year=2000 + i % 10, authors=json.dumps([f"Author {i % 4}", "Shared Person"]))
            )
    # The citing paper: its own body, then a References chunk that repeats paper 0's abstract.
    cited = records[0]
    citing_doc = util.sha256_hex("citing paper")
    body, refs = records[1]["text"], cited["text"]
    text = body + "\n\f\n" + refs
    now = util.utcnow()
    rows = []
    for ordinal, (start, part, is_refs) in enumerate(((0, body, False), (len(body) + 3, refs, True))):
        h = util.sha256_hex(part)
        rows.append(dict(chunk_id=util.sha256_hex(f"{citing_doc}|{ordinal}|{h}"), doc_id=citing_doc, shard=citing_doc[0],
                         ordinal=ordinal, section="References" if is_refs else "Body", is_references=is_refs,
                         page_start=ordinal + 1, page_end=ordinal + 1, char_start=start, char_end=start + len(part),
                         n_tokens=len(part.split()), content_hash=h, text=part))
    with engine.begin() as conn:
        store.upsert(conn, store.documents, [dict(
            doc_id=citing_doc, shard=citing_doc[0], source_kind="pdf", title="A citing paper", authors="[]", year=2020,
            text=text, page_offsets=json.dumps([0, len(body) + 3]), parser="test", parser_version="1", quality=1.0,
            page_count=2, extra="{}", ingested_at=now)], ["doc_id"])
        store.upsert(conn, store.chunks, rows, ["chunk_id"])
    fts.build_fts(engine, "fts_s")
    chunk_ids = [chunk_of[r["_id"]] for r in records] + [r["chunk_id"] for r in rows]
    matrix = np.vstack([vecs, vecs[1:2], vecs[0:1]])  # the citing chunks' texts are records 1 and 0
    index, _ = build_vector_index(matrix)
    vi = VectorIndex(index, chunk_ids)
    return Searcher(engine, "fts_s", vi, embedder), records, citing_doc


@pytest.mark.parametrize("mode", ["hybrid", "bm25", "dense"])
def test_title_query_finds_its_paper_once_per_paper(searcher, mode):
    s, records, _ = searcher
    found = 0
    for rec in records[2:12]:
        hits = s.search(rec["title"], k=10, mode=mode)
        assert 0 < len(hits) <= 10
        assert len({h.doc_id for h in hits}) == len(hits)  # grouped: each paper once
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        found += hits[0].title == rec["title"]
    # Dense matches a title to its abstract less sharply than BM25 matches the title field.
    assert found >= (10 if mode != "dense" else 8)


def test_hit_fields_and_snippet(searcher):
    s, records, _ = searcher
    rec = records[5]
    hit = s.search(rec["title"], k=3, mode="bm25")[0]
    assert isinstance(hit, PaperHit)
    d = hit.as_dict()
    assert set(d) == {"doc_id", "title", "year", "authors", "score", "chunk_id", "section", "page_start", "snippet"}
    assert d["title"] == rec["title"] and d["authors"] == ["Author 1", "Shared Person"] and d["year"] == 2005
    assert 0 < len(hit.snippet) <= s.tuning["snippet_chars"] + 2
    assert " ".join(hit.snippet.strip("…").split()[:3]) in " ".join(rec["text"].split())
    json.dumps(d)  # serialisable as is


def test_filters(searcher):
    s, records, citing = searcher
    query = "cells protein expression disease"
    hits = s.search(query, k=50, filters=SearchFilters(year_min=2003, year_max=2004))
    assert hits and all(2003 <= h.year <= 2004 for h in hits)
    hits = s.search(query, k=50, filters=SearchFilters(author="author 2"))
    assert hits and all("Author 2" in h.authors for h in hits)
    hits = s.search(query, k=50, filters=SearchFilters(author="shared"))
    assert len(hits) >= 10
    assert s.search(query, k=50, filters=SearchFilters(author="%")) == []  # LIKE wildcards are literal
    hits = s.search(records[0]["title"], k=50, filters=SearchFilters(source="pdf"))
    assert [h.doc_id for h in hits] == [citing]


def test_references_are_weighted_down(searcher, engine):
    s, records, citing = searcher
    query = records[0]["title"]
    neutral = Searcher(engine, "fts_s", s.vector_index, s.embedder, references_weight=1.0)
    down = Searcher(engine, "fts_s", s.vector_index, s.embedder, references_weight=0.2)
    for mode in ("bm25", "hybrid"):
        before = {h.doc_id: h for h in neutral.search(query, k=N_DOCS + 1, mode=mode)}
        after = {h.doc_id: h for h in down.search(query, k=N_DOCS + 1, mode=mode)}
        assert before[citing].section == "References"
        # Down-weighted, the citing paper falls behind the cited one, and its score drops.
        ranked = list(after)
        assert ranked.index(citing) > ranked.index(next(h.doc_id for h in after.values() if h.title == query))
        assert after[citing].score < before[citing].score


def test_score_fusion_variants(searcher, engine):
    s, records, _ = searcher
    for tuning in ({"fusion": "score", "norm": "minmax", "alpha": 0.3}, {"fusion": "score", "norm": "zscore"}):
        alt = Searcher(engine, "fts_s", s.vector_index, s.embedder, **tuning)
        hits = alt.search(records[3]["title"], k=5)
        assert hits[0].title == records[3]["title"]


def test_bad_arguments_name_the_fix(searcher, engine):
    s, _, _ = searcher
    with pytest.raises(ValueError, match="mode must be one of"):
        s.search("cells", mode="fuzzy")
    with pytest.raises(ValueError, match="unknown search tuning keys"):
        Searcher(engine, "fts_s", None, None, alpah=0.5)
    with pytest.raises(ValueError, match="fusion must be"):
        Searcher(engine, "fts_s", None, None, fusion="max")


@pytest.mark.parametrize(
    "query", ["", "   ", "!!!", "\x00", None, '"', "NEAR(a b)", "🧬" * 50, "x" * 10_000, "title:cells AND -protein*"]
)
def test_junk_queries_never_raise(searcher, query):
    s, _, _ = searcher
    for mode in ("hybrid", "bm25", "dense"):
        hits = s.search(query, k=5, mode=mode)
        assert isinstance(hits, list) and len(hits) <= 5
    if not isinstance(query, str) or not query.strip() or query in ("!!!", "\x00", '"'):
        assert s.search(query, k=5) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=80))
def test_fuzzed_queries_never_raise(searcher, query):
    s, _, _ = searcher
    assert len(s.search(query, k=3, mode="hybrid")) <= 3


def test_snippet_window():
    text = "Intro words here. " * 40 + "The key finding about zebrafish fins." + " Tail words." * 40
    snip = make_snippet(text, ["zebrafish"], 100)
    assert "zebrafish" in snip and snip.startswith("…") and snip.endswith("…")
    assert len(snip) <= 102
    assert make_snippet("short  text\nhere", ["zz"], 100) == "short text here"
