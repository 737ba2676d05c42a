"""Full-text (BM25) index over chunks: build, drop and search, on SQLite FTS5 or PostgreSQL.

Both backends (`fts_sqlite`, `fts_postgres`) index three weighted fields per chunk — the
paper's title, its abstract and the chunk body — so any chunk of a paper can match the paper's
title, and both rank with the BM25 formula of FTS5's ``bm25()`` (`bm25`).

One analyzer for both (`analyzer.analyze`): text becomes terms in Python, and each backend
indexes those terms verbatim — FTS5 with its ``ascii`` tokenizer over space-separated terms,
PostgreSQL as given lexemes. No backend tokenizer decides what a word is, so both see the same
terms, the same document frequencies and row lengths, and return the same top-k: scores are
rounded to 1e-9 (summation order differs in the last bits) and ties go to the lower row id,
which both assign in chunk_id order.

Above `EXHAUSTIVE_ROWS` rows a query runs in two stages (`fts_search`): rows are found by its
rare terms, and its common terms' share of the score is added to the best of those from the
rows' term counts, so FTS5 no longer scores half the table for a query with everyday words.

User text never reaches a query parser: `analyzer.query_terms` reduces it to analyzed terms,
and the match expression is built from those alone (quoted terms joined by OR in FTS5, a
tsquery of quoted lexemes joined by ``|`` in PostgreSQL). An OR of terms is BM25's
bag-of-words semantics; an AND (``websearch_to_tsquery``) drops every paper that misses one
query word.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.search import bm25, fts_postgres, fts_sqlite
from research_pipeline.lib.search.analyzer import query_terms
from research_pipeline.lib.search.fts_tables import Sink, aux_tables, check_table_name, drop_tables

#: Query terms in more than this share of rows are "common": rows are found by the other
#: terms, and the common terms' share of the score is added to the best `CANDIDATES` of those
#: (measured on SciFact train, docs/SEARCH.md). Without it an OR query over a claim's words
#: scores about half of all rows.
COMMON_DF = 0.1
CANDIDATES = 300
#: Smaller tables score every matching row: it costs a few ms there and is exact.
EXHAUSTIVE_ROWS = 20_000

#: Version of what `build_fts` writes; caches of built indexes key on it.
INDEX_FORMAT = 3

_BACKENDS: dict[str, ModuleType] = {"sqlite": fts_sqlite, "postgresql": fts_postgres}


def _backend(engine: Engine) -> ModuleType:
    backend = _BACKENDS.get(engine.dialect.name)
    if backend is None:
        raise ValueError(f"full-text search needs SQLite or PostgreSQL, not {engine.dialect.name}")
    return backend


def drop_fts(engine: Engine, table: str) -> None:
    """Drop the full-text table `table` and the tables beside it, where they exist."""
    check_table_name(table)
    with engine.begin() as conn:
        drop_tables(conn, table)


def build_fts(engine: Engine, table: str, sink: Sink | None = None) -> int:
    """Build the full-text table `table` from the current chunks joined to documents.

    The tables are dropped and rebuilt inside one transaction, so a crash leaves either no
    index or a complete one and a re-run after a partial build starts clean. Returns the row
    count. `sink(rid, chunk_id, [title, abstract, body terms])` gets every analyzed row (the
    generation's Tantivy index is built from them: `fts_tantivy.IndexBuilder.add`).
    """
    check_table_name(table)
    return _backend(engine).build(engine, table, sink)


def fts_search(
    engine: Engine,
    table: str,
    query: str,
    k: int = 100,
    weights: Mapping[str, float] | None = None,
    common_df: float | None = None,
) -> list[tuple[str, float]]:
    """The `k` best chunks for `query` by BM25 as (chunk_id, score), higher is better.

    `weights` overrides `bm25.FIELD_WEIGHTS` (keys title, abstract, body). `common_df` overrides
    `COMMON_DF` (1.0: score every matching row; by default tables under `EXHAUSTIVE_ROWS` rows
    are searched that way). Never raises on user text; a query with no searchable terms gives [].
    """
    w = {**bm25.FIELD_WEIGHTS, **(weights or {})}
    w = {key: float(w[key]) for key in bm25.FIELDS}
    check_table_name(table)
    terms = query_terms(query)
    k = int(k)
    if not terms or k <= 0:
        return []
    backend = _backend(engine)
    aux = aux_tables(table)
    with engine.connect() as conn:
        try:
            n, tokens = conn.execute(sa.text(f'SELECT n, tokens FROM "{aux["meta"]}"')).one()
        except sa.exc.DBAPIError as exc:
            raise LookupError(
                f"full-text index {table!r} is missing or was built by an older version "
                f"(no {aux['meta']!r} table): rebuild it, e.g. run reindex_job"
            ) from exc
        ndoc = dict(
            conn.execute(sa.text(f'SELECT lexeme, ndoc FROM "{aux["df"]}" WHERE lexeme IN :terms').bindparams(
                sa.bindparam("terms", expanding=True)), {"terms": terms}).all()
        )
        present = [t for t in terms if t in ndoc]
        if not present or not n:
            return []
        stats = bm25.Stats(n=int(n), avgdl=float(tokens) / float(n), idf={t: bm25.idf(int(n), int(ndoc[t])) for t in present})
        if common_df is None:
            common_df = COMMON_DF if n >= EXHAUSTIVE_ROWS else 1.0
        limit = float(common_df) * n
        common = [t for t in present if ndoc[t] > limit]
        rare = [t for t in present if ndoc[t] <= limit]
        if not rare:  # every term is common: match on the rarest
            rarest = min(common, key=lambda t: (ndoc[t], t))
            rare, common = [rarest], [t for t in common if t != rarest]
        if not common:
            return bm25.top(backend.top(conn, table, rare, stats, w, k + bm25.TIE_MARGIN), k)
        # Two stages: the rows with a rare term, best first by the rare terms' share of the
        # score; then the common terms' share added from the rows' term counts.
        candidates = backend.top(conn, table, rare, stats, w, max(k, CANDIDATES) + bm25.TIE_MARGIN)
        counts = backend.counts(conn, table, [rid for _, rid, _ in candidates], common)
    rescored = []
    for cid, rid, score in candidates:
        dl, row_counts = counts[rid]
        for term, c in zip(common, row_counts):
            if c:
                score += bm25.term_score(stats, term, w["title"] * c[0] + w["abstract"] * c[1] + w["body"] * c[2], dl)
        rescored.append((cid, rid, score))
    return bm25.top(rescored, k)
