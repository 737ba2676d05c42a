"""Chunking: token bounds by the real tokenizer, exact offsets, sections of real papers, idempotence."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from research_pipeline.lib.core import store, util
from research_pipeline.lib.ingest.chunking import (
    FRONT_MATTER,
    chunk_document,
    chunk_documents,
    detect_sections,
)
from research_pipeline_tests.shared import ingest_demo

#: Papers with numbered headings (ReScience) and with JOSS-style unnumbered ones.
RESCIENCE = "rescience-2019-variational-sparse-coding.pdf"
JOSS = "joss-2024-pdr-planetary-data-reader.pdf"
LONG = "rescience-2020-mathematical-analysis-depolarization-block.pdf"
BUDGET = 254  # MiniLM's 256 word pieces minus [CLS] and [SEP]


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> dict[str, dict]:
    return ingest_demo([RESCIENCE, JOSS, LONG], tmp_path_factory.mktemp("demo"))


def check_chunk(doc: dict, row: dict, count_tokens, budget: int = BUDGET) -> None:
    text = doc["text"]
    # Exact, up to what no database stores (NUL, lone surrogates: U+FFFD one for one).
    assert row["text"] == util.pg_safe_text(text[row["char_start"] : row["char_end"]])
    assert row["text"].strip() == row["text"], "chunks start and end on a token"
    assert 0 < count_tokens(row["text"]) == row["n_tokens"] <= budget
    assert row["content_hash"] == util.sha256_hex(row["text"])
    assert row["chunk_id"] == util.sha256_hex(
        f"{doc['doc_id']}|{row['ordinal']}|{row['content_hash']}|{row['chunking_id']}")
    assert row["shard"] == doc["doc_id"][0]
    offsets = json.loads(doc["page_offsets"])
    # 1-based pages: the page holding the first and the last character of the chunk.
    assert offsets[row["page_start"] - 1] <= row["char_start"]
    assert row["page_start"] == len(offsets) or row["char_start"] < offsets[row["page_start"]]
    assert offsets[row["page_end"] - 1] <= row["char_end"] - 1
    assert row["page_end"] == len(offsets) or row["char_end"] - 1 < offsets[row["page_end"]]


def test_chunks_are_token_bounded_with_exact_offsets(docs, embedder):
    for doc in docs.values():
        rows = chunk_document(doc, embedder.count_tokens)
        assert rows, doc["title"]
        assert [r["ordinal"] for r in rows] == list(range(len(rows)))
        assert [r["char_start"] for r in rows] == sorted(r["char_start"] for r in rows)
        for row in rows:
            check_chunk(doc, row, embedder.count_tokens)
        assert rows[-1]["page_end"] == doc["page_count"]


def test_sections_of_real_papers(docs, embedder):
    for name, doc in docs.items():
        rows = chunk_document(doc, embedder.count_tokens)
        sections = detect_sections(doc["text"])
        names = [s.name for s in sections]
        assert "References" in names, name
        if name != JOSS:
            assert "Introduction" in names, name
        # No chunk crosses a section boundary, and each carries its section's name.
        for row in rows:
            inside = [s for s in sections if s.start <= row["char_start"] and row["char_end"] <= s.end]
            assert len(inside) == 1 and inside[0].name == row["section"], row["text"][:80]
            assert row["is_references"] == (row["section"] == "References")
        refs = [r for r in rows if r["is_references"]]
        assert refs and refs[0]["text"].lower().startswith("references"), "the heading opens its section"
        assert rows[0]["section"] == FRONT_MATTER
    numbered = [s.name for s in detect_sections(docs[RESCIENCE]["text"])]
    # "1 Introduction", "2 Related Work" ... "7 Conclusions" in the PDF, in order.
    for earlier, later in [("Introduction", "Related Work"), ("Related Work", "Conclusions"), ("Conclusions", "References")]:
        assert numbered.index(earlier) < numbered.index(later)
    assert {"Summary", "Statement of Need", "Acknowledgements"} <= {s.name for s in detect_sections(docs[JOSS]["text"])}


def test_no_text_is_lost_and_chunks_overlap(docs, embedder):
    doc = docs[LONG]
    text = doc["text"]
    rows = chunk_document(doc, embedder.count_tokens, overlap_tokens=32)
    overlaps = 0
    for section in detect_sections(text):
        mine = [r for r in rows if r["char_start"] >= section.start and r["char_end"] <= section.end]
        covered = section.start
        for prev, nxt in zip(mine, mine[1:]):
            if nxt["char_start"] < prev["char_end"]:
                overlaps += 1
                shared = text[nxt["char_start"] : prev["char_end"]]
                assert embedder.count_tokens(shared) <= 32
        for r in mine:
            assert not text[covered : r["char_start"]].strip(), "text between chunks is only whitespace"
            covered = max(covered, r["char_end"])
        assert not text[covered : section.end].strip()
    multi = sum(1 for i in range(1, len(rows)) if rows[i]["section"] == rows[i - 1]["section"])
    assert overlaps == multi > 0, "every pair of neighbours in a section overlaps"
    without = chunk_document(doc, embedder.count_tokens, overlap_tokens=0)
    assert all(b["char_start"] >= a["char_end"] for a, b in zip(without, without[1:]))
    assert len(without) < len(rows)


def assert_covers(text: str, rows: list[dict], count_tokens) -> None:
    """Every part of `text` the model sees (that has tokens) is in some chunk."""
    covered = 0
    for row in rows:
        assert count_tokens(text[covered : row["char_start"]]) == 0, text[covered : row["char_start"]][:80]
        covered = max(covered, row["char_end"])
    assert count_tokens(text[covered:]) == 0


def test_any_count_tokens_function(docs, embedder):
    # A plain function (no tokenizer with offsets behind it) takes the fallback path: words
    # weighted by their own counts, every chunk re-counted and split if it overflows.
    doc = docs[JOSS]
    rows = chunk_document(doc, lambda t: embedder.count_tokens(t), max_tokens=64, overlap_tokens=8)
    assert len(rows) > 10
    for row in rows:
        check_chunk(doc, row, embedder.count_tokens, budget=62)
    assert_covers(doc["text"], rows, embedder.count_tokens)


def test_deterministic_ids(docs, embedder):
    doc = docs[JOSS]
    first = chunk_document(doc, embedder.count_tokens)
    again = chunk_document(dict(doc), embedder.count_tokens)
    assert [r["chunk_id"] for r in first] == [r["chunk_id"] for r in again]
    other = chunk_document({**doc, "doc_id": "f" * 64}, embedder.count_tokens)
    assert [r["content_hash"] for r in other] == [r["content_hash"] for r in first]
    assert not {r["chunk_id"] for r in other} & {r["chunk_id"] for r in first}


def test_heading_forms():
    text = "\n".join(
        [
            "A Title Of A Paper",
            "Abstract—We study things.",
            "I. INTRODUCTION",
            "Intro text here.",
            "II. RELATED WORK",
            "Prior art.",
            "2.1 Methods",
            "We did it.",
            "3 Adam 0.01 0.02",
            "Figure 1",
            "4 Experimental Setup",
            "Setup text.",
            "1 Then a table row",
            "R E F E R E N C E S",
            "1 A. Author. A cited work. 2001.",
            "2 Some Reference Title",
            "Appendix A: Proofs",
            "Proof text.",
        ]
    )
    names = [s.name for s in detect_sections(text)]
    assert names == [
        FRONT_MATTER,
        "Abstract",
        "Introduction",
        "Related Work",
        "Methods",
        "Experimental Setup",
        "References",
        "Appendix",
    ]
    chinese = "标题\n摘要\n我们研究了一些东西。\n一、引言\n正文。\n参考文献\n[1] 某某. 2001."
    assert [s.name for s in detect_sections(chinese)] == [FRONT_MATTER, "Abstract", "Introduction", "References"]


def test_overlong_word_and_record(embedder):
    # A "word" of more word pieces than the budget (a sequence) has no place to cut between
    # words, so it is cut inside. (MiniLM maps words over 100 characters to one [UNK], so the
    # word is short and the budget small.)
    dna = "ACGTTGCA" * 12
    doc = {"doc_id": "a" * 64, "text": f"Introduction\n{dna}\nEnd.", "page_offsets": "[0]", "source_kind": "pdf"}
    assert embedder.count_tokens(dna) > 14
    rows = chunk_document(doc, embedder.count_tokens, max_tokens=16, overlap_tokens=0)
    assert len(rows) > 2
    for row in rows:
        check_chunk(doc, row, embedder.count_tokens, budget=14)
    assert "".join(r["text"] for r in rows).replace("\n", "") == doc["text"].replace("\n", "")
    overlapping = chunk_document(doc, embedder.count_tokens, max_tokens=16, overlap_tokens=4)
    for row in overlapping:
        check_chunk(doc, row, embedder.count_tokens, budget=14)
    assert_covers(doc["text"], overlapping, embedder.count_tokens)
    record = {"doc_id": "b" * 64, "text": "A short abstract of a record.", "page_offsets": "[0]", "source_kind": "record"}
    [row] = chunk_document(record, embedder.count_tokens)
    assert (row["section"], row["page_start"], row["page_end"], row["text"]) == ("Body", 1, 1, record["text"])
    assert chunk_document({**record, "text": "  \n\f\n "}, embedder.count_tokens) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(
        st.one_of(
            st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30),
            st.sampled_from(["\n", ". ", "\n\n", "1 Introduction\n", "References\n", "\n\f\n", "ü", "–"]),
        ),
        max_size=400,
    ),
    max_tokens=st.sampled_from([16, 64, 256]),
    fallback=st.booleans(),
)
def test_any_text_is_bounded(embedder, words, max_tokens, fallback):
    text = " ".join(words)
    doc = {"doc_id": "c" * 64, "text": text, "page_offsets": "[0]", "source_kind": "pdf"}
    count = (lambda t: embedder.count_tokens(t)) if fallback else embedder.count_tokens
    rows = chunk_document(doc, count, max_tokens=max_tokens, overlap_tokens=max_tokens // 4)
    for row in rows:
        check_chunk(doc, row, embedder.count_tokens, budget=max_tokens - 2)
    assert_covers(text, rows, embedder.count_tokens)
    if embedder.count_tokens(text):
        assert rows


def test_chunk_documents_is_idempotent(engine, docs, embedder):
    with engine.begin() as conn:
        store.upsert(conn, store.documents, [docs[JOSS], docs[RESCIENCE]], ["doc_id"])
    stats = chunk_documents(engine, embedder.count_tokens)
    expected = chunk_document(docs[JOSS], embedder.count_tokens) + chunk_document(docs[RESCIENCE], embedder.count_tokens)
    assert stats == {"documents_chunked": 2, "documents_rechunked": 0, "chunks": len(expected), "chunks_removed": 0}
    c = store.chunks
    with engine.connect() as conn:
        stored = {r["chunk_id"]: dict(r) for r in conn.execute(sa.select(c)).mappings()}
    assert stored == {r["chunk_id"]: r for r in expected}
    assert chunk_documents(engine, embedder.count_tokens) == {
        "documents_chunked": 0, "documents_rechunked": 0, "chunks": 0, "chunks_removed": 0}
    # A document that is gone takes its chunks with it.
    with engine.begin() as conn:
        conn.execute(sa.delete(store.documents).where(store.documents.c.doc_id == docs[JOSS]["doc_id"]))
    n_joss = sum(1 for r in expected if r["doc_id"] == docs[JOSS]["doc_id"])
    assert chunk_documents(engine, embedder.count_tokens)["chunks_removed"] == n_joss
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(c)).scalar_one() == len(expected) - n_joss


def _chunk_rows(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["chunk_id"]: dict(r) for r in conn.execute(sa.select(store.chunks)).mappings()}


def test_changed_chunking_rechunks_and_reembeds_only_new_text(engine, docs, embedder, monkeypatch):
    from research_pipeline.lib.embed.embeddings import embed_missing
    from research_pipeline.lib.ingest import chunking

    short = {**docs[JOSS], "doc_id": "e" * 64, "shard": "e", "source_kind": "record",
             "text": "A short record: shorter than any window, so every chunking keeps it whole.",
             "page_offsets": "[0]"}
    with engine.begin() as conn:
        store.upsert(conn, store.documents, [docs[JOSS], short], ["doc_id"])
    chunk_documents(engine, embedder.count_tokens)
    first = _chunk_rows(engine)
    assert {r["chunking_id"] for r in first.values()} == {chunking.chunking_id(embedder.count_tokens)}
    assert embed_missing(engine, embedder)["embedded"] == len({r["content_hash"] for r in first.values()})

    # Smaller windows: both documents are re-chunked, the old chunks are replaced.
    stats = chunk_documents(engine, embedder.count_tokens, max_tokens=128, overlap_tokens=16)
    assert stats["documents_chunked"] == stats["documents_rechunked"] == 2
    second = _chunk_rows(engine)
    assert not set(first) & set(second)
    assert {r["chunking_id"] for r in second.values()} == {chunking.chunking_id(embedder.count_tokens, 128, 16)}
    for row in second.values():
        doc = docs[JOSS] if row["doc_id"] == docs[JOSS]["doc_id"] else short
        check_chunk(doc, row, embedder.count_tokens, budget=126)
    # Only texts no earlier chunk had are embedded; the short record's text is reused.
    old_hashes = {r["content_hash"] for r in first.values()}
    new_hashes = {r["content_hash"] for r in second.values()}
    [short_row] = [r for r in second.values() if r["doc_id"] == short["doc_id"]]
    assert short_row["content_hash"] in old_hashes
    again = embed_missing(engine, embedder)
    assert again["embedded"] == len(new_hashes - old_hashes) > 0

    # A new chunker version with the same parameters re-chunks everything; the texts are the
    # same, so nothing is embedded again.
    monkeypatch.setattr(chunking, "CHUNKER_VERSION", chunking.CHUNKER_VERSION + "-next")
    stats = chunk_documents(engine, embedder.count_tokens, max_tokens=128, overlap_tokens=16)
    assert stats["documents_rechunked"] == 2
    third = _chunk_rows(engine)
    assert not set(third) & set(second)
    assert {r["content_hash"] for r in third.values()} == new_hashes
    assert embed_missing(engine, embedder)["embedded"] == 0
    assert chunk_documents(engine, embedder.count_tokens, max_tokens=128, overlap_tokens=16)["documents_chunked"] == 0


def test_chunks_of_unstorable_text_are_storable(engine, embedder):
    """Text holding NUL or a lone surrogate (a store written before entry normalisation) is chunked
    into text both backends store, offsets unchanged."""
    text = "Results\nThe value\x00 was high \ud800 in every run. " * 3
    doc = {"doc_id": "a" * 64, "text": text, "page_offsets": "[0]", "source_kind": "record"}
    rows = chunk_document(doc, embedder.count_tokens)
    assert rows
    for row in rows:
        assert "\x00" not in row["text"] and "\ud800" not in row["text"]
        assert row["text"] == util.pg_safe_text(text[row["char_start"] : row["char_end"]])
    with engine.begin() as conn:
        conn.execute(sa.insert(store.chunks), rows)
    assert {r["text"] for r in _chunk_rows(engine).values()} == {r["text"] for r in rows}
