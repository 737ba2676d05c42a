"""The SQLite full-text backend: a contentless FTS5 table of analyzed terms.

FTS5's ``bm25()`` ranks the rows that match an OR of the query's terms; each row's term counts
(for the second stage of `fts.fts_search`) are JSON in the `<table>_rows` table.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.search.bm25 import Stats
from research_pipeline.lib.search.fts_tables import Row, Sink, aux_tables, build_tables, parse_counts, tf_json


def build(engine: Engine, table: str, sink: Sink | None = None) -> int:
    """Build the FTS5 table `table` and the tables beside it; returns the row count."""
    rows_table = aux_tables(table)["rows"]

    def insert(conn: sa.Connection, rows: list[Row]) -> None:
        conn.execute(
            sa.text(f'INSERT INTO "{table}" (rowid, title, abstract, body) VALUES (:rid, :t, :a, :b)'),
            [{"rid": rid, "t": " ".join(f[0]), "a": " ".join(f[1]), "b": " ".join(f[2])} for rid, _, f, _, _ in rows],
        )
        conn.execute(
            sa.text(f'INSERT INTO "{rows_table}" (rid, chunk_id, dl, tf) VALUES (:rid, :cid, :dl, :tf)'),
            [{"rid": rid, "cid": cid, "dl": dl, "tf": tf_json(counts)} for rid, cid, _, counts, dl in rows],
        )

    n = build_tables(
        engine,
        table,
        [
            # Contentless: the chunks table holds the text; FTS5 keeps the inverted index and
            # row lengths, which is all bm25() reads. The `ascii` tokenizer cannot split the
            # space-separated analyzed terms further.
            f"CREATE VIRTUAL TABLE \"{table}\" USING fts5(title, abstract, body, content='', tokenize='ascii')",
            f'CREATE TABLE "{rows_table}" (rid INTEGER PRIMARY KEY, chunk_id TEXT NOT NULL, dl INTEGER NOT NULL, tf TEXT NOT NULL)',
        ],
        insert,
        sink,
    )
    with engine.begin() as conn:
        # One b-tree segment: fewer segments to merge per query.
        conn.execute(sa.text(f"INSERT INTO \"{table}\" (\"{table}\") VALUES ('optimize')"))
    return n


def top(
    conn: sa.Connection, table: str, terms: list[str], stats: Stats, w: dict[str, float], n: int
) -> list[tuple[str, int, float]]:
    """The `n` best (chunk_id, row id, score) rows by bm25() over an OR of `terms`."""
    rows_table = aux_tables(table)["rows"]
    match = " OR ".join(f'"{t}"' for t in terms)
    # FTS5's bm25() is negated so that ascending order is best-first.
    sql = sa.text(
        f"SELECT r.chunk_id, f.rid, -f.s FROM ("
        f'SELECT rowid AS rid, bm25("{table}", {w["title"]}, {w["abstract"]}, {w["body"]}) AS s '
        f'FROM "{table}" WHERE "{table}" MATCH :q ORDER BY s, rid LIMIT :n'
        f') f JOIN "{rows_table}" r ON r.rid = f.rid'
    )
    return [tuple(r) for r in conn.execute(sql, {"q": match, "n": n})]


def counts(conn: sa.Connection, table: str, rids: list[int], terms: list[str]) -> dict[int, tuple[int, list]]:
    """{row id: (row length, [counts of each of `terms`, or None])} of the rows `rids`."""
    # Terms are letters and digits: '$."term"' is a plain JSON path; it is bound anyway.
    cols = ", ".join(f"json_extract(tf, :p{i})" for i in range(len(terms)))
    sql = sa.text(f'SELECT rid, dl, {cols} FROM "{aux_tables(table)["rows"]}" WHERE rid IN :rids')
    params = {f"p{i}": f'$."{t}"' for i, t in enumerate(terms)}
    rows = conn.execute(sql.bindparams(sa.bindparam("rids", expanding=True)), {**params, "rids": rids})
    return {r[0]: (r[1], [parse_counts(v) for v in r[2:]]) for r in rows}
