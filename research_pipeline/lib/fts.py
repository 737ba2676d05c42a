"""Full-text (BM25) index over chunks: SQLite FTS5 or a PostgreSQL tsvector table.

Both backends index three weighted fields per chunk — the paper's title, its abstract and the
chunk body — so any chunk of a paper can match the paper's title. Both score with the same
BM25 formula (the one FTS5's ``bm25()`` implements: per-term IDF, field-weighted term
frequency, k1=1.2, b=0.75 over the whole row length); SQLite computes it in FTS5, PostgreSQL in
SQL over the tsvector's positions. Both stem with the original Porter algorithm and keep
stopwords in documents, so on ASCII text they see the same terms and rank alike.

User text never reaches a query parser: `query_terms` reduces it to plain word tokens, and the
match expression is built from those alone (quoted terms joined by OR in FTS5, a bound
``to_tsquery`` of alphanumeric lexemes joined by ``|`` in PostgreSQL). An OR of terms is BM25's
bag-of-words semantics; an AND (``websearch_to_tsquery``) drops every paper that misses one
query word and costs recall.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Engine

#: Field weights title > abstract > body (tuned on SciFact train, see docs/SEARCH.md).
FIELD_WEIGHTS: dict[str, float] = {"title": 2.0, "abstract": 1.0, "body": 1.0}

#: BM25 constants: FTS5's built-in values, used on both backends so they rank alike.
K1 = 1.2
B = 0.75

#: Terms kept from one query; a 10 KB paste is cut to its first distinct words.
MAX_QUERY_TERMS = 64
#: Characters of user text looked at; the rest cannot change a 64-term query.
MAX_QUERY_CHARS = 4096

#: FTS5 tokenizer: Porter stemming over unicode61 with diacritics folded (measured in SEARCH.md).
SQLITE_TOKENIZER = "porter unicode61 remove_diacritics 2"
#: The PostgreSQL text search configuration built to match it: the original Porter stemmer
#: (PostgreSQL's snowball 'porter'), no stopword list, hyphenated words split into parts.
PG_CONFIG = "rp_porter"

_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,47}$")
_TOKEN_RE = re.compile(r"[^\W_]+")

#: Words that carry no topic: dropped from queries on both backends. They would otherwise make
#: an OR query match nearly every row and cost latency for little ranking gain.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves""".split()
)


def check_table_name(table: str) -> str:
    """`table` if it is a plain SQL identifier (letters, digits, underscore; at most 48 chars)."""
    if not isinstance(table, str) or not _TABLE_RE.match(table):
        raise ValueError(
            f"invalid full-text table name {table!r}: use letters, digits and '_' "
            "(at most 48 characters, not starting with a digit)"
        )
    return table


def query_terms(query: object) -> list[str]:
    """The distinct lower-cased word tokens of any user text, stopwords dropped, in order.

    Operators, quotes, punctuation, emoji and control characters are separators, so the
    result is safe to put into any match syntax.
    """
    if not isinstance(query, str):
        return []
    text = unicodedata.normalize("NFKC", query[:MAX_QUERY_CHARS]).lower()
    seen: dict[str, None] = {}
    for tok in _TOKEN_RE.findall(text):
        if tok in STOPWORDS or tok in seen:
            continue
        seen[tok] = None
        if len(seen) >= MAX_QUERY_TERMS:
            break
    return list(seen)


def _stats_table(table: str) -> str:
    return f"{table}_df"


def drop_fts(engine: Engine, table: str) -> None:
    """Drop the full-text table `table` (and its statistics on PostgreSQL) if it exists."""
    check_table_name(table)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{_stats_table(table)}"'))


def build_fts(engine: Engine, table: str) -> int:
    """Build the full-text table `table` from the current chunks joined to documents.

    The table is dropped and rebuilt inside one transaction, so a crash leaves either no table
    or a complete one and a re-run after a partial build starts clean. Returns the row count.
    """
    check_table_name(table)
    if engine.dialect.name == "sqlite":
        return _build_sqlite(engine, table)
    if engine.dialect.name == "postgresql":
        return _build_postgres(engine, table)
    raise ValueError(f"full-text search needs SQLite or PostgreSQL, not {engine.dialect.name}")


# The abstract is indexed once per paper (on its first chunk): when a record's abstract is also
# its text, repeating it on every chunk would count the same words twice.
_SOURCE_SELECT = """
    SELECT c.chunk_id, coalesce(d.title, ''),
           CASE WHEN c.ordinal = 0 AND coalesce(d.abstract, '') <> c.text
                THEN coalesce(d.abstract, '') ELSE '' END,
           c.text
    FROM chunks c JOIN documents d ON d.doc_id = c.doc_id
"""


def _build_sqlite(engine: Engine, table: str) -> int:
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        conn.execute(
            sa.text(
                f'CREATE VIRTUAL TABLE "{table}" USING fts5('
                f"chunk_id UNINDEXED, title, abstract, body, tokenize = '{SQLITE_TOKENIZER}')"
            )
        )
        conn.execute(sa.text(f'INSERT INTO "{table}" (chunk_id, title, abstract, body) {_SOURCE_SELECT}'))
        # One b-tree segment: fewer segments to merge per query.
        conn.execute(sa.text(f"INSERT INTO \"{table}\" (\"{table}\") VALUES ('optimize')"))
        return conn.execute(sa.text(f'SELECT count(*) FROM "{table}"')).scalar_one()


def _ensure_pg_config(conn: sa.Connection) -> None:
    """Create the `PG_CONFIG` text search configuration once per database."""
    # Concurrent builds must not race on CREATE; the lock ends with the transaction.
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": PG_CONFIG})
    exists = conn.execute(sa.text("SELECT 1 FROM pg_ts_config WHERE cfgname = :name"), {"name": PG_CONFIG}).first()
    if exists:
        return
    conn.execute(sa.text(f"CREATE TEXT SEARCH DICTIONARY {PG_CONFIG}_stem (TEMPLATE = snowball, Language = porter)"))
    conn.execute(sa.text(f"CREATE TEXT SEARCH CONFIGURATION {PG_CONFIG} (COPY = simple)"))
    conn.execute(
        sa.text(
            f"ALTER TEXT SEARCH CONFIGURATION {PG_CONFIG} ALTER MAPPING FOR "
            f"asciiword, word, numword, hword_asciipart, hword_part, hword_numpart WITH {PG_CONFIG}_stem"
        )
    )
    # FTS5 indexes the parts of a hyphenated word, never the whole compound.
    conn.execute(sa.text(f"ALTER TEXT SEARCH CONFIGURATION {PG_CONFIG} DROP MAPPING FOR asciihword, hword, numhword"))


def _build_postgres(engine: Engine, table: str) -> int:
    stats = _stats_table(table)
    with engine.begin() as conn:
        _ensure_pg_config(conn)
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{table}"'))
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{stats}"'))
        # dl is the row length in words, stopwords included, as FTS5 counts it: the highest
        # position in the concatenated tsvector (concatenation shifts later fields' positions).
        conn.execute(
            sa.text(f'CREATE TABLE "{table}" (chunk_id varchar(64) PRIMARY KEY, tsv tsvector NOT NULL, dl integer NOT NULL)')
        )
        conn.execute(
            sa.text(
                f"""
                INSERT INTO "{table}" (chunk_id, tsv, dl)
                SELECT s.chunk_id, s.tsv,
                       coalesce((SELECT max(p) FROM unnest(s.tsv) u, unnest(u.positions) p), 0)
                FROM (
                    SELECT src.chunk_id,
                           setweight(to_tsvector('{PG_CONFIG}', src.title), 'A')
                           || setweight(to_tsvector('{PG_CONFIG}', src.abstract), 'B')
                           || setweight(to_tsvector('{PG_CONFIG}', src.body), 'C') AS tsv
                    FROM ({_SOURCE_SELECT}) AS src (chunk_id, title, abstract, body)
                ) s
                """
            )
        )
        conn.execute(sa.text(f'CREATE INDEX "{table}_gin" ON "{table}" USING gin (tsv)'))
        # Document frequency per lexeme, the IDF input of BM25.
        conn.execute(
            sa.text(
                f'CREATE TABLE "{stats}" AS SELECT word AS lexeme, ndoc FROM ts_stat(\'SELECT tsv FROM "{table}"\')'
            )
        )
        conn.execute(sa.text(f'ALTER TABLE "{stats}" ADD PRIMARY KEY (lexeme)'))
        n = conn.execute(sa.text(f'SELECT count(*) FROM "{table}"')).scalar_one()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'ANALYZE "{table}"'))
    return n


def fts_search(
    engine: Engine, table: str, query: str, k: int = 100, weights: Mapping[str, float] | None = None
) -> list[tuple[str, float]]:
    """The `k` best chunks for `query` by BM25 as (chunk_id, score), higher is better.

    `weights` overrides `FIELD_WEIGHTS` (keys title, abstract, body). Never raises on user
    text; a query with no searchable terms gives [].
    """
    w = {**FIELD_WEIGHTS, **(weights or {})}
    w = {key: float(w[key]) for key in ("title", "abstract", "body")}
    check_table_name(table)
    terms = query_terms(query)
    k = int(k)
    if not terms or k <= 0:
        return []
    if engine.dialect.name == "sqlite":
        return _search_sqlite(engine, table, terms, k, w)
    return _search_postgres(engine, table, terms, k, w)


def _search_sqlite(engine: Engine, table: str, terms: list[str], k: int, w: dict[str, float]) -> list[tuple[str, float]]:
    match = " OR ".join(f'"{t}"' for t in terms)
    sql = sa.text(
        f'SELECT chunk_id, bm25("{table}", 0.0, {w["title"]}, {w["abstract"]}, {w["body"]}) AS s '
        f'FROM "{table}" WHERE "{table}" MATCH :q ORDER BY s LIMIT :k'
    )
    with engine.connect() as conn:
        rows = conn.execute(sql, {"q": match, "k": k}).all()
    # FTS5's bm25() is negated so that ascending order is best-first.
    return [(cid, -float(s)) for cid, s in rows]


def _search_postgres(engine: Engine, table: str, terms: list[str], k: int, w: dict[str, float]) -> list[tuple[str, float]]:
    stats = _stats_table(table)
    # Terms are alphanumeric tokens, so joining them with '|' is a valid tsquery; it is still
    # passed as a bound parameter, never spliced into the SQL.
    sql = sa.text(
        f"""
        WITH q AS (SELECT to_tsquery('{PG_CONFIG}', :q) AS tsq),
        lex AS (SELECT DISTINCT unnest(tsvector_to_array(to_tsvector('{PG_CONFIG}', :raw))) AS lexeme),
        corpus AS (SELECT count(*)::float8 AS n, greatest(avg(dl), 1)::float8 AS avgdl FROM "{table}"),
        idf AS (
            SELECT lex.lexeme,
                   greatest(ln((corpus.n - s.ndoc + 0.5) / (s.ndoc + 0.5)), 1e-6) AS idf
            FROM lex JOIN "{stats}" s ON s.lexeme = lex.lexeme, corpus
        ),
        hits AS (
            SELECT t.chunk_id, t.dl, u.lexeme,
                   (SELECT sum(CASE wt WHEN 'A' THEN :wa WHEN 'B' THEN :wb ELSE :wc END)
                    FROM unnest(u.weights) wt) AS tf
            FROM "{table}" t, q, unnest(t.tsv) u
            WHERE t.tsv @@ q.tsq
        )
        SELECT h.chunk_id,
               sum(i.idf * h.tf * ({K1} + 1) / (h.tf + {K1} * (1 - {B} + {B} * h.dl / corpus.avgdl))) AS score
        FROM hits h JOIN idf i ON i.lexeme = h.lexeme, corpus
        GROUP BY h.chunk_id
        ORDER BY score DESC, h.chunk_id
        LIMIT :k
        """
    )
    params = {"q": " | ".join(terms), "raw": " ".join(terms), "k": k, "wa": w["title"], "wb": w["abstract"], "wc": w["body"]}
    with engine.connect() as conn:
        rows = conn.execute(sql, params).all()
    return [(cid, float(s)) for cid, s in rows]
