"""The PostgreSQL full-text backend: a GIN-indexed tsvector of analyzed terms, BM25 in SQL.

The lexemes (given verbatim, no text-search configuration) find the rows with any query term;
each row's jsonb holds its terms' counts per field, from which the query computes BM25 exactly
as FTS5's ``bm25()`` does (field weights apply at query time).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.search.bm25 import B, K1, Stats
from research_pipeline.lib.search.fts_tables import Row, Sink, build_tables, parse_counts, tf_json


def build(engine: Engine, table: str, sink: Sink | None = None) -> int:
    """Build the table `table`, its GIN index and the tables beside it; returns the row count."""

    def insert(conn: sa.Connection, rows: list[Row]) -> None:
        conn.execute(
            sa.text(
                f'INSERT INTO "{table}" (rid, chunk_id, lexemes, tf, dl) '
                "VALUES (:rid, :cid, array_to_tsvector(CAST(:lex AS text[])), CAST(:tf AS jsonb), :dl)"
            ),
            [{"rid": rid, "cid": cid, "lex": sorted(counts), "tf": tf_json(counts), "dl": dl}
             for rid, cid, _, counts, dl in rows],
        )

    # lexemes (GIN) finds the rows with any query term; tf holds each term's count per field
    # (weights apply at query time); dl is the row length in terms, as FTS5 counts it.
    n = build_tables(
        engine,
        table,
        [
            f'CREATE TABLE "{table}" (rid bigint PRIMARY KEY, chunk_id varchar(64) NOT NULL, '
            "lexemes tsvector NOT NULL, tf jsonb NOT NULL, dl integer NOT NULL)",
        ],
        insert,
        sink,
    )
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE INDEX "{table}_gin" ON "{table}" USING gin (lexemes)'))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'ANALYZE "{table}"'))
    return n


def top(
    conn: sa.Connection, table: str, terms: list[str], stats: Stats, w: dict[str, float], n: int
) -> list[tuple[str, int, float]]:
    """The `n` best (chunk_id, row id, score) rows with any of `terms`, by BM25 computed in SQL."""
    # Written as FTS5 evaluates bm25(): idf * (f * (k1 + 1)) / (f + k1 * (1 - b + b * dl / avgdl)).
    # The row's jsonb is read once (d: OFFSET 0 keeps it one value per row) and the query
    # terms are looked up in it per row, rather than re-reading the stored value per term.
    sql = sa.text(
        f"""
        SELECT t.chunk_id, t.rid, (
            SELECT sum(q.idf * ((f.tf * ({K1} + 1.0)) / (f.tf + {K1} * (1 - {B} + {B} * t.dl / :avgdl))))
            FROM unnest(CAST(:terms AS text[]), CAST(:idfs AS float8[])) WITH ORDINALITY AS q(term, idf, i)
            CROSS JOIN LATERAL (SELECT d.tf -> q.term AS c) x
            CROSS JOIN LATERAL (
                SELECT :wa * (x.c ->> 0)::float8 + :wb * (x.c ->> 1)::float8 + :wc * (x.c ->> 2)::float8 AS tf
            ) f
            WHERE x.c IS NOT NULL
        ) AS score
        FROM "{table}" t
        CROSS JOIN LATERAL (SELECT t.tf || '{{}}'::jsonb AS tf OFFSET 0) d
        WHERE t.lexemes @@ CAST(:tsq AS tsquery)
        ORDER BY score DESC, t.rid
        LIMIT :n
        """
    )
    params = {
        "terms": terms,
        "idfs": [stats.idf[t] for t in terms],
        "avgdl": stats.avgdl,
        # Terms are letters and digits, quoted anyway; the tsquery is a bound parameter.
        "tsq": " | ".join("'" + t.replace("'", "''") + "'" for t in terms),
        "n": n,
        "wa": w["title"],
        "wb": w["abstract"],
        "wc": w["body"],
    }
    return [tuple(r) for r in conn.execute(sql, params)]


def counts(conn: sa.Connection, table: str, rids: list[int], terms: list[str]) -> dict[int, tuple[int, list]]:
    """{row id: (row length, [counts of each of `terms`, or None])} of the rows `rids`."""
    cols = ", ".join(f"tf -> :p{i}" for i in range(len(terms)))
    sql = sa.text(f'SELECT rid, dl, {cols} FROM "{table}" WHERE rid = ANY(CAST(:rids AS bigint[]))')
    rows = conn.execute(sql, {**{f"p{i}": t for i, t in enumerate(terms)}, "rids": rids})
    return {r[0]: (r[1], [parse_counts(v) for v in r[2:]]) for r in rows}
