"""Full-text (BM25) index over chunks: SQLite FTS5 or a PostgreSQL GIN-indexed table.

Both backends index three weighted fields per chunk — the paper's title, its abstract and the
chunk body — so any chunk of a paper can match the paper's title, and both rank with the BM25
formula of FTS5's ``bm25()`` (per-term IDF, field-weighted term frequency, k1=1.2, b=0.75
over the whole row length).

One analyzer for both: `analyze` (NFKC, lower case, diacritics folded, runs of letters and
digits, the original Porter stemmer) turns text into terms in Python, and each backend indexes
those terms verbatim — FTS5 with its ``ascii`` tokenizer over space-separated terms (it cannot
split them further), PostgreSQL as given lexemes. No backend tokenizer decides what a word is,
so both see the same terms, the same document frequencies and row lengths, and return the same
top-k: scores are rounded to 1e-9 (summation order differs in the last bits) and ties go to
the lower row id, which both assign in chunk_id order.

Above `EXHAUSTIVE_ROWS` rows a query runs in two stages (`fts_search`): rows are found by its
rare terms, and its common terms' share of the score is added to the best of those from the
rows' term counts, so FTS5 no longer scores half the table for a query with everyday words.

User text never reaches a query parser: `query_terms` reduces it to analyzed terms, and the
match expression is built from those alone (quoted terms joined by OR in FTS5, a tsquery of
quoted lexemes joined by ``|`` in PostgreSQL). An OR of terms is BM25's bag-of-words
semantics; an AND (``websearch_to_tsquery``) drops every paper that misses one query word.
"""

from __future__ import annotations

import json
import math
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import Stemmer
from sqlalchemy.engine import Engine

#: Field weights title > abstract > body (tuned on SciFact train, see docs/SEARCH.md).
FIELD_WEIGHTS: dict[str, float] = {"title": 2.0, "abstract": 1.0, "body": 1.0}
FIELDS = ("title", "abstract", "body")

#: BM25 constants: FTS5's built-in values, used on both backends so they rank alike.
K1 = 1.2
B = 0.75
#: Query terms in more than this share of rows are "common": rows are found by the other
#: terms, and the common terms' share of the score is added to the best `CANDIDATES` of those
#: (measured on SciFact train, docs/SEARCH.md). Without it an OR query over a claim's words
#: scores about half of all rows.
COMMON_DF = 0.1
CANDIDATES = 300
#: Smaller tables score every matching row: it costs a few ms there and is exact.
EXHAUSTIVE_ROWS = 20_000
#: Scores are compared at this many decimals, so last-bit differences never reorder results.
SCORE_DECIMALS = 9

#: Terms kept from one query; a 10 KB paste is cut to its first distinct words.
MAX_QUERY_TERMS = 64
#: Characters of user text looked at; the rest cannot change a 64-term query.
MAX_QUERY_CHARS = 4096
#: Longer runs of letters are not words (base64, unsegmented CJK lines); PostgreSQL would
#: refuse lexemes past 2 KB.
MAX_TERM_CHARS = 64

#: Version of what `build_fts` writes; caches of built indexes key on it.
INDEX_FORMAT = 3

_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
_TOKEN_RE = re.compile(r"[^\W_]+")
_BATCH = 2000

#: Words that carry no topic: dropped from queries (documents keep them, they count in row
#: length). They would otherwise make an OR query match nearly every row.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves""".split()
)

# PyStemmer objects are not thread-safe: one per thread (each keeps its own stem cache).
_local = threading.local()


def _stem_words(words: list[str]) -> list[str]:
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = Stemmer.Stemmer("porter", 100_000)
    # Porter reduces a lone "s" to nothing; an empty term would be no term at all.
    return [stem or word for stem, word in zip(stemmer.stemWords(words), words)]


def _words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits of `text`, diacritics folded, junk runs dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    if not text.isascii():
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return [w for w in _TOKEN_RE.findall(text) if len(w) <= MAX_TERM_CHARS]


def analyze(text: str | None) -> list[str]:
    """The terms of `text` as both backends index them, in order (stopwords kept)."""
    return _stem_words(_words(text)) if text else []


def query_words(query: object) -> list[str]:
    """The distinct words of any user text, unstemmed, stopwords dropped, in order (snippets)."""
    if not isinstance(query, str):
        return []
    seen: dict[str, None] = {}
    for word in _words(query[:MAX_QUERY_CHARS]):
        if word not in STOPWORDS:
            seen[word] = None
    return list(seen)


def query_terms(query: object) -> list[str]:
    """The distinct analyzed terms of any user text, stopwords dropped, in order.

    Operators, quotes, punctuation, emoji and control characters are separators, so the
    result is safe to put into any match syntax.
    """
    terms = dict.fromkeys(_stem_words(query_words(query)))
    return list(terms)[:MAX_QUERY_TERMS]


def check_table_name(table: str) -> str:
    """`table` if it is a plain SQL identifier (letters, digits, underscore; at most 41 chars)."""
    if not isinstance(table, str) or not _TABLE_RE.match(table):
        raise ValueError(
            f"invalid full-text table name {table!r}: use letters, digits and '_' "
            "(at most 41 characters, not starting with a digit)"
        )
    return table


def _aux_tables(table: str) -> dict[str, str]:
    """Tables beside the full-text table `table`: per-row term counts, document frequencies, totals."""
    return {"rows": f"{table}_rows", "df": f"{table}_df", "meta": f"{table}_meta"}


def drop_fts(engine: Engine, table: str) -> None:
    """Drop the full-text table `table` and the tables beside it, where they exist."""
    check_table_name(table)
    with engine.begin() as conn:
        for name in (table, *_aux_tables(table).values()):
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))


# The abstract is indexed once per paper (on its first chunk): when a record's abstract is also
# its text, repeating it on every chunk would count the same words twice.
_SOURCE_SELECT = """
    SELECT c.chunk_id, coalesce(d.title, ''),
           CASE WHEN c.ordinal = 0 AND coalesce(d.abstract, '') <> c.text
                THEN coalesce(d.abstract, '') ELSE '' END,
           c.text
    FROM chunks c JOIN documents d ON d.doc_id = c.doc_id
    WHERE c.chunk_id > :after
    ORDER BY c.chunk_id
    LIMIT :limit
"""


def _analyzed_rows(conn: sa.Connection) -> Iterator[tuple[int, str, list[list[str]]]]:
    """(row id, chunk_id, [title, abstract, body terms]) for every chunk, in chunk_id order.

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


def build_fts(engine: Engine, table: str) -> int:
    """Build the full-text table `table` from the current chunks joined to documents.

    The tables are dropped and rebuilt inside one transaction, so a crash leaves either no
    index or a complete one and a re-run after a partial build starts clean. Returns the row
    count.
    """
    check_table_name(table)
    if engine.dialect.name == "sqlite":
        return _build_sqlite(engine, table)
    if engine.dialect.name == "postgresql":
        return _build_postgres(engine, table)
    raise ValueError(f"full-text search needs SQLite or PostgreSQL, not {engine.dialect.name}")


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


def _build_tables(engine: Engine, table: str, create: list[str], insert_rows) -> int:  # noqa: ANN001
    """The build both backends share: analyze every chunk once, write the backend's rows through
    `insert_rows(conn, batch)` with batch = [(rid, chunk_id, fields, counts, dl)], then the
    document frequencies and totals every query reads."""
    aux = _aux_tables(table)
    df: Counter[str] = Counter()
    n = tokens = 0
    with engine.begin() as conn:
        for name in (table, *aux.values()):
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
        for statement in create:
            conn.execute(sa.text(statement))
        for batch in _batches(_analyzed_rows(conn)):
            rows = []
            for rid, cid, fields in batch:
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


def _tf_json(counts: dict[str, list[int]]) -> str:
    return json.dumps(counts, separators=(",", ":"), ensure_ascii=False)


def _build_sqlite(engine: Engine, table: str) -> int:
    rows_table = _aux_tables(table)["rows"]

    def insert(conn: sa.Connection, rows: list) -> None:  # noqa: ANN001
        conn.execute(
            sa.text(f'INSERT INTO "{table}" (rowid, title, abstract, body) VALUES (:rid, :t, :a, :b)'),
            [{"rid": rid, "t": " ".join(f[0]), "a": " ".join(f[1]), "b": " ".join(f[2])} for rid, _, f, _, _ in rows],
        )
        conn.execute(
            sa.text(f'INSERT INTO "{rows_table}" (rid, chunk_id, dl, tf) VALUES (:rid, :cid, :dl, :tf)'),
            [{"rid": rid, "cid": cid, "dl": dl, "tf": _tf_json(counts)} for rid, cid, _, counts, dl in rows],
        )

    n = _build_tables(
        engine,
        table,
        [
            # Contentless: the chunks table holds the text; FTS5 keeps the inverted index and
            # row lengths, which is all bm25() reads.
            f"CREATE VIRTUAL TABLE \"{table}\" USING fts5(title, abstract, body, content='', tokenize='ascii')",
            f'CREATE TABLE "{rows_table}" (rid INTEGER PRIMARY KEY, chunk_id TEXT NOT NULL, dl INTEGER NOT NULL, tf TEXT NOT NULL)',
        ],
        insert,
    )
    with engine.begin() as conn:
        # One b-tree segment: fewer segments to merge per query.
        conn.execute(sa.text(f"INSERT INTO \"{table}\" (\"{table}\") VALUES ('optimize')"))
    return n


def _build_postgres(engine: Engine, table: str) -> int:
    def insert(conn: sa.Connection, rows: list) -> None:  # noqa: ANN001
        conn.execute(
            sa.text(
                f'INSERT INTO "{table}" (rid, chunk_id, lexemes, tf, dl) '
                "VALUES (:rid, :cid, array_to_tsvector(CAST(:lex AS text[])), CAST(:tf AS jsonb), :dl)"
            ),
            [{"rid": rid, "cid": cid, "lex": sorted(counts), "tf": _tf_json(counts), "dl": dl}
             for rid, cid, _, counts, dl in rows],
        )

    # lexemes (GIN) finds the rows with any query term; tf holds each term's count per field
    # (weights apply at query time); dl is the row length in terms, as FTS5 counts it.
    n = _build_tables(
        engine,
        table,
        [
            f'CREATE TABLE "{table}" (rid bigint PRIMARY KEY, chunk_id varchar(64) NOT NULL, '
            "lexemes tsvector NOT NULL, tf jsonb NOT NULL, dl integer NOT NULL)",
        ],
        insert,
    )
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE INDEX "{table}_gin" ON "{table}" USING gin (lexemes)'))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'ANALYZE "{table}"'))
    return n


def fts_search(
    engine: Engine,
    table: str,
    query: str,
    k: int = 100,
    weights: Mapping[str, float] | None = None,
    common_df: float | None = None,
) -> list[tuple[str, float]]:
    """The `k` best chunks for `query` by BM25 as (chunk_id, score), higher is better.

    `weights` overrides `FIELD_WEIGHTS` (keys title, abstract, body). `common_df` overrides
    `COMMON_DF` (1.0: score every matching row; by default tables under `EXHAUSTIVE_ROWS` rows
    are searched that way). Never raises on user text; a query with no searchable terms gives [].
    """
    w = {**FIELD_WEIGHTS, **(weights or {})}
    w = {key: float(w[key]) for key in FIELDS}
    check_table_name(table)
    terms = query_terms(query)
    k = int(k)
    if not terms or k <= 0:
        return []
    backend = _SQLite if engine.dialect.name == "sqlite" else _Postgres
    aux = _aux_tables(table)
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
        stats = _Stats(n=int(n), avgdl=float(tokens) / float(n), idf={t: _idf(int(n), int(ndoc[t])) for t in present})
        if common_df is None:
            common_df = COMMON_DF if n >= EXHAUSTIVE_ROWS else 1.0
        limit = float(common_df) * n
        common = [t for t in present if ndoc[t] > limit]
        rare = [t for t in present if ndoc[t] <= limit]
        if not rare:  # every term is common: match on the rarest
            rarest = min(common, key=lambda t: (ndoc[t], t))
            rare, common = [rarest], [t for t in common if t != rarest]
        if not common:
            return _top(backend.top(conn, table, rare, stats, w, k + _TIE_MARGIN), k)
        # Two stages: the rows with a rare term, best first by the rare terms' share of the
        # score; then the common terms' share added from the rows' term counts.
        candidates = backend.top(conn, table, rare, stats, w, max(k, CANDIDATES) + _TIE_MARGIN)
        counts = backend.counts(conn, table, [rid for _, rid, _ in candidates], common)
    rescored = []
    for cid, rid, score in candidates:
        dl, row_counts = counts[rid]
        for term, c in zip(common, row_counts):
            if c:
                score += _term_score(stats, term, w["title"] * c[0] + w["abstract"] * c[1] + w["body"] * c[2], dl)
        rescored.append((cid, rid, score))
    return _top(rescored, k)


@dataclass(frozen=True)
class _Stats:
    """What BM25 needs of the whole table: row count, mean row length, IDF of the query terms."""

    n: int
    avgdl: float
    idf: dict[str, float]


def _idf(n: int, ndoc: int) -> float:
    """FTS5's IDF: log((N - n + 0.5) / (n + 0.5)), floored at 1e-6 for very common terms."""
    idf = math.log((n - ndoc + 0.5) / (ndoc + 0.5))
    return idf if idf > 0.0 else 1e-6


def _term_score(stats: _Stats, term: str, f: float, dl: int) -> float:
    """One term's BM25 share, written as FTS5's bm25() evaluates it (f: field-weighted count)."""
    return stats.idf[term] * ((f * (K1 + 1.0)) / (f + K1 * (1 - B + B * dl / stats.avgdl)))


#: Extra rows read past `k`, so that near-ties at the cut are settled by `_top`, not the backend.
_TIE_MARGIN = 16


def _top(rows: list[tuple[str, int, float]], k: int) -> list[tuple[str, float]]:
    """The `k` best (chunk_id, score) of (chunk_id, row id, raw score) rows, scores rounded to
    `SCORE_DECIMALS` and ties broken by row id: the same order on both backends."""
    ranked = sorted(((round(float(s), SCORE_DECIMALS), rid, cid) for cid, rid, s in rows), key=lambda r: (-r[0], r[1]))
    return [(cid, score) for score, _, cid in ranked[:k]]


def _parse_counts(value: Any) -> list[int] | None:
    if value is None:
        return None
    return json.loads(value) if isinstance(value, str) else list(value)


class _SQLite:
    """FTS5: bm25() over the rare terms' OR; term counts from the rows table's JSON."""

    @staticmethod
    def top(conn: sa.Connection, table: str, terms: list[str], stats: _Stats, w: dict[str, float], n: int):  # noqa: ANN205
        rows_table = _aux_tables(table)["rows"]
        match = " OR ".join(f'"{t}"' for t in terms)
        # FTS5's bm25() is negated so that ascending order is best-first.
        sql = sa.text(
            f"SELECT r.chunk_id, f.rid, -f.s FROM ("
            f'SELECT rowid AS rid, bm25("{table}", {w["title"]}, {w["abstract"]}, {w["body"]}) AS s '
            f'FROM "{table}" WHERE "{table}" MATCH :q ORDER BY s, rid LIMIT :n'
            f') f JOIN "{rows_table}" r ON r.rid = f.rid'
        )
        return [tuple(r) for r in conn.execute(sql, {"q": match, "n": n})]

    @staticmethod
    def counts(conn: sa.Connection, table: str, rids: list[int], terms: list[str]) -> dict[int, tuple[int, list]]:
        # Terms are letters and digits: '$."term"' is a plain JSON path; it is bound anyway.
        cols = ", ".join(f"json_extract(tf, :p{i})" for i in range(len(terms)))
        sql = sa.text(f'SELECT rid, dl, {cols} FROM "{_aux_tables(table)["rows"]}" WHERE rid IN :rids')
        params = {f"p{i}": f'$."{t}"' for i, t in enumerate(terms)}
        rows = conn.execute(sql.bindparams(sa.bindparam("rids", expanding=True)), {**params, "rids": rids})
        return {r[0]: (r[1], [_parse_counts(v) for v in r[2:]]) for r in rows}


class _Postgres:
    """GIN on the lexemes finds the rows; BM25 in SQL from the rows' jsonb term counts."""

    @staticmethod
    def top(conn: sa.Connection, table: str, terms: list[str], stats: _Stats, w: dict[str, float], n: int):  # noqa: ANN205
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

    @staticmethod
    def counts(conn: sa.Connection, table: str, rids: list[int], terms: list[str]) -> dict[int, tuple[int, list]]:
        cols = ", ".join(f"tf -> :p{i}" for i in range(len(terms)))
        sql = sa.text(f'SELECT rid, dl, {cols} FROM "{table}" WHERE rid = ANY(CAST(:rids AS bigint[]))')
        rows = conn.execute(sql, {**{f"p{i}": t for i, t in enumerate(terms)}, "rids": rids})
        return {r[0]: (r[1], [_parse_counts(v) for v in r[2:]]) for r in rows}

