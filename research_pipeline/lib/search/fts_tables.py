"""The tables of one full-text index and the build both backends share.

A full-text index `table` is the backend's own table plus three beside it: per-row term counts
(`<table>_rows`, SQLite only; PostgreSQL keeps them in `table`), document frequencies
(`<table>_df`) and totals (`<table>_meta`). Every chunk is analyzed once in Python
(`analyzer.analyze`); the backend only writes the terms it is given.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.search.analyzer import analyze

_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
_BATCH = 2000

#: One row to write: (row id, chunk_id, [title, abstract, body terms], {term: [3 counts]}, row length).
Row = tuple[int, str, list[list[str]], dict[str, list[int]], int]
#: Called with every analyzed row as it is written: (row id, chunk_id, [title, abstract, body terms]).
Sink = Callable[[int, str, list[list[str]]], None]


def check_table_name(table: str) -> str:
    """`table` if it is a plain SQL identifier (letters, digits, underscore; at most 41 chars)."""
    if not isinstance(table, str) or not _TABLE_RE.match(table):
        raise ValueError(
            f"invalid full-text table name {table!r}: use letters, digits and '_' "
            "(at most 41 characters, not starting with a digit)"
        )
    return table


def aux_tables(table: str) -> dict[str, str]:
    """Tables beside the full-text table `table`: per-row term counts, document frequencies, totals."""
    return {"rows": f"{table}_rows", "df": f"{table}_df", "meta": f"{table}_meta"}


def drop_tables(conn: sa.Connection, table: str) -> None:
    """Drop `table` and the tables beside it, where they exist."""
    for name in (table, *aux_tables(table).values()):
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))


# The abstract is indexed once per paper (on its first chunk): when a record's abstract is also
# its text, repeating it on every chunk would count the same words twice.
_SOURCE_SELECT = """
    SELECT c.chunk_id, coalesce(d.title, ''),
           CASE WHEN c.ordinal = 0 AND coalesce(d.abstract, '') <> c.text
                THEN coalesce(d.abstract, '') ELSE '' END,
           c.text
    FROM chunks c JOIN documents d ON d.doc_id = c.doc_id
    WHERE c.chunk_id > :after AND d.retired_at IS NULL
    ORDER BY c.chunk_id
    LIMIT :limit
"""


def analyzed_rows(conn: sa.Connection) -> Iterator[tuple[int, str, list[list[str]]]]:
    """(row id, chunk_id, [title, abstract, body terms]) for every chunk of a live document, in chunk_id order.

    Row ids count from 1 in chunk_id order, so both backends number rows alike.
    """
    after, rid = "", 0
    while True:
        rows = conn.execute(sa.text(_SOURCE_SELECT), {"after": after, "limit": _BATCH}).all()
        if not rows:
            return
        for chunk_id, title, abstract, body in rows:
            rid += 1
            yield rid, chunk_id, [analyze(title), analyze(abstract), analyze(body)]
        after = rows[-1][0]


def _batches(rows: Iterator, size: int = _BATCH) -> Iterator[list]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _term_counts(fields: list[list[str]]) -> dict[str, list[int]]:
    """{term: [count in title, in abstract, in body]} of one row."""
    counts: dict[str, list[int]] = {}
    for i, terms in enumerate(fields):
        for term in terms:
            counts.setdefault(term, [0, 0, 0])[i] += 1
    return counts


def build_tables(
    engine: Engine,
    table: str,
    create: list[str],
    insert_rows: Callable[[sa.Connection, list[Row]], None],
    sink: Sink | None = None,
) -> int:
    """The build both backends share: drop and create the tables, analyze every chunk once,
    write the backend's rows through `insert_rows(conn, batch)`, then the document frequencies
    and totals every query reads. One transaction; returns the row count. `sink` (e.g. a
    Tantivy index builder) gets the same analyzed rows, so both indexes hold the same terms."""
    aux = aux_tables(table)
    df: Counter[str] = Counter()
    n = tokens = 0
    with engine.begin() as conn:
        drop_tables(conn, table)
        for statement in create:
            conn.execute(sa.text(statement))
        for batch in _batches(analyzed_rows(conn)):
            rows = []
            for rid, cid, fields in batch:
                if sink is not None:
                    sink(rid, cid, fields)
                counts = _term_counts(fields)
                dl = sum(len(terms) for terms in fields)
                df.update(counts.keys())
                tokens += dl
                rows.append((rid, cid, fields, counts, dl))
            insert_rows(conn, rows)
            n += len(rows)
        conn.execute(sa.text(f'CREATE TABLE "{aux["df"]}" (lexeme text PRIMARY KEY, ndoc bigint NOT NULL)'))
        for batch in _batches(iter(df.items()), 10_000):
            conn.execute(
                sa.text(f'INSERT INTO "{aux["df"]}" (lexeme, ndoc) VALUES (:lexeme, :ndoc)'),
                [{"lexeme": lexeme, "ndoc": ndoc} for lexeme, ndoc in batch],
            )
        conn.execute(sa.text(f'CREATE TABLE "{aux["meta"]}" (n bigint NOT NULL, tokens bigint NOT NULL)'))
        conn.execute(sa.text(f'INSERT INTO "{aux["meta"]}" (n, tokens) VALUES (:n, :tokens)'), {"n": n, "tokens": tokens})
    return n


def tf_json(counts: dict[str, list[int]]) -> str:
    """A row's term counts as the compact JSON both backends store."""
    return json.dumps(counts, separators=(",", ":"), ensure_ascii=False)


def parse_counts(value: Any) -> list[int] | None:
    """One term's [title, abstract, body] counts as a backend returns them (JSON text or a list)."""
    if value is None:
        return None
    return json.loads(value) if isinstance(value, str) else list(value)
