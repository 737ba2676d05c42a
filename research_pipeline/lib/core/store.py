"""The relational store: one SQLAlchemy Core schema that runs on SQLite and PostgreSQL.

Every table is keyed by content hashes so that writes are upserts and re-runs are no-ops.
The schema is versioned (`schema_version`); `create_schema` is idempotent and applies
forward migrations in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from research_pipeline.lib.core.util import as_utc, utcnow

#: 2: documents.retired_reason/retired_at/removed_at, document_sources.gone_at, chunks.chunking_id.
SCHEMA_VERSION = 2

#: Static shards of the content-hash space: the first hex digit of a sha256.
#: The same keys partition embeddings and migration, so backfills, resumption and
#: verification line up.
SHARDS: tuple[str, ...] = tuple("0123456789abcdef")



class UtcDateTime(sa.types.TypeDecorator):
    """A timestamp column that always reads back as an aware UTC datetime.

    PostgreSQL stores `timestamptz`; SQLite has no time zone and hands back naive values, which
    the store wrote in UTC. One column type instead of a patch at every reader.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # noqa: ANN001, ANN201
        return None if value is None else as_utc(value).astimezone(timezone.utc)

    def process_result_value(self, value, dialect):  # noqa: ANN001, ANN201
        return None if value is None else as_utc(value)


metadata = sa.MetaData()

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("doc_id", sa.String(64), primary_key=True),  # sha256 of the source bytes / record
    sa.Column("shard", sa.String(1), nullable=False, index=True),
    sa.Column("source_kind", sa.String(16), nullable=False),  # pdf | record
    sa.Column("title", sa.Text),
    sa.Column("authors", sa.Text),  # JSON list of names
    sa.Column("year", sa.Integer),
    sa.Column("abstract", sa.Text),
    sa.Column("doi", sa.Text),
    sa.Column("arxiv_id", sa.Text),
    sa.Column("language", sa.String(16)),
    sa.Column("page_count", sa.Integer, nullable=False, default=0),
    sa.Column("text", sa.Text, nullable=False),  # full text, pages joined by "\n\f\n"
    sa.Column("page_offsets", sa.Text, nullable=False),  # JSON list: char offset where each page starts
    sa.Column("parser", sa.String(64), nullable=False),
    sa.Column("parser_version", sa.String(32), nullable=False),
    sa.Column("quality", sa.Float, nullable=False),  # 0..1, 1 = clean text on every page
    sa.Column("garbled_ratio", sa.Float, nullable=False, default=0.0),
    sa.Column("empty_pages", sa.Integer, nullable=False, default=0),
    sa.Column("ocr_pages", sa.Integer, nullable=False, default=0),
    sa.Column("extra", sa.Text),  # JSON: record metadata, PDF info dict
    sa.Column("ingested_at", UtcDateTime(), nullable=False),
    # Set while the document is out of every new generation: gone (no live source in the
    # inbox), removed (`research-pipeline remove`) or retracted (listed in the retracted file).
    sa.Column("retired_reason", sa.String(16)),
    sa.Column("retired_at", UtcDateTime()),
    sa.Column("removed_at", UtcDateTime()),  # explicit removal; it stays until restored
)

document_sources = sa.Table(
    "document_sources",
    metadata,
    sa.Column("uri", sa.Text, primary_key=True),  # where a paper was seen (path, s3 key, record id)
    sa.Column("doc_id", sa.String(64), nullable=False, index=True),
    sa.Column("size", sa.BigInteger),
    sa.Column("mtime", sa.Float),
    sa.Column("seen_at", UtcDateTime(), nullable=False),
    sa.Column("gone_at", UtcDateTime()),  # the file left the inbox (a full listing did not see it)
)

chunks = sa.Table(
    "chunks",
    metadata,
    sa.Column("chunk_id", sa.String(64), primary_key=True),  # sha256(doc_id, ordinal, content_hash)
    sa.Column("doc_id", sa.String(64), nullable=False, index=True),
    sa.Column("shard", sa.String(1), nullable=False, index=True),
    sa.Column("ordinal", sa.Integer, nullable=False),
    sa.Column("section", sa.Text, nullable=False),
    sa.Column("is_references", sa.Boolean, nullable=False, default=False),
    sa.Column("page_start", sa.Integer, nullable=False),
    sa.Column("page_end", sa.Integer, nullable=False),
    sa.Column("char_start", sa.Integer, nullable=False),
    sa.Column("char_end", sa.Integer, nullable=False),
    sa.Column("n_tokens", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False, index=True),  # sha256 of text
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("chunking_id", sa.String(16)),  # chunker version + parameters (chunking.chunking_id)
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("uri", sa.Text, primary_key=True),
    sa.Column("content_hash", sa.String(64)),  # None when the bytes could not be read
    sa.Column("reason", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger),
    sa.Column("quarantined_at", UtcDateTime(), nullable=False),
)

embeddings = sa.Table(
    "embeddings",
    metadata,
    sa.Column("content_hash", sa.String(64), primary_key=True),
    sa.Column("model_id", sa.String(200), primary_key=True),
    sa.Column("shard", sa.String(1), nullable=False, index=True),  # content_hash[0]
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32 little-endian, L2-normalised
    sa.Column("created_at", UtcDateTime(), nullable=False),
)

index_generations = sa.Table(
    "index_generations",
    metadata,
    sa.Column("gen_id", sa.String(32), primary_key=True),  # sortable: YYYYmmddTHHMMSS-xxxxxx
    sa.Column("status", sa.String(16), nullable=False),  # building|candidate|published|rejected|retired
    sa.Column("model_id", sa.String(200), nullable=False),
    sa.Column("n_documents", sa.Integer, nullable=False, default=0),
    sa.Column("n_chunks", sa.Integer, nullable=False, default=0),
    sa.Column("n_fts_rows", sa.Integer, nullable=False, default=0),
    sa.Column("n_vectors", sa.Integer, nullable=False, default=0),
    sa.Column("fts_table", sa.String(64), nullable=False),
    sa.Column("vector_key", sa.Text, nullable=False),  # object-store key of the FAISS manifest
    sa.Column("manifest", sa.Text),  # JSON
    sa.Column("checks", sa.Text),  # JSON: gate results
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("published_at", UtcDateTime()),
)

index_pointer = sa.Table(
    "index_pointer",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),  # "live"
    sa.Column("gen_id", sa.String(32), nullable=False),
    sa.Column("previous_gen_id", sa.String(32)),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

query_log = sa.Table(
    "query_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", UtcDateTime(), nullable=False),
    sa.Column("query", sa.Text, nullable=False),
    sa.Column("filters", sa.Text),  # JSON
    sa.Column("gen_id", sa.String(32)),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("n_results", sa.Integer, nullable=False),
    sa.Column("cache_hit", sa.Boolean, nullable=False, default=False),
)

migration_state = sa.Table(
    "migration_state",
    metadata,
    sa.Column("table_name", sa.String(64), primary_key=True),
    sa.Column("partition", sa.String(8), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # pending|copied|verified
    sa.Column("rows", sa.BigInteger, nullable=False, default=0),
    sa.Column("checksum", sa.String(64)),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UtcDateTime(), nullable=False),
)

#: Tables that hold the corpus, in dependency order (what a migration copies).
DATA_TABLES: tuple[sa.Table, ...] = (
    documents,
    document_sources,
    chunks,
    quarantine,
    embeddings,
    index_generations,
    index_pointer,
    query_log,
)


def shard_of(hex_hash: str) -> str:
    return hex_hash[0]


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An Engine for a SQLAlchemy URL; SQLite gets WAL and tuned pragmas, PostgreSQL psycopg 3."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ValueError(
            f"RP_DATABASE_URL is not a SQLAlchemy URL: {url!r} "
            "(expected e.g. sqlite:///path/rp.db or postgresql+psycopg://user@host/db)"
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {"timeout": 60, "check_same_thread": False})
        engine = sa.create_engine(parsed, **kwargs)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            # WAL lets searches read while an ingest writes; NORMAL sync is durable in WAL mode
            # up to the last checkpoint, which is what we need for re-runnable upserts.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.execute("PRAGMA mmap_size=268435456")
            cur.execute("PRAGMA cache_size=-65536")
            cur.close()

        return engine
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return sa.create_engine(parsed, **kwargs)
    raise ValueError(
        f"Unsupported database backend {parsed.get_backend_name()!r} in RP_DATABASE_URL; "
        "use sqlite:///... or postgresql+psycopg://..."
    )


def create_schema(engine: Engine) -> int:
    """Create every table if missing and record the schema version. Safe to call repeatedly."""
    if engine.dialect.name == "sqlite":
        url = engine.url
        if url.database and url.database != ":memory:":
            from pathlib import Path

            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    metadata.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        _add_missing_columns(conn)
        current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
        if current is None or current < SCHEMA_VERSION:
            upsert(conn, schema_version, [{"version": SCHEMA_VERSION, "applied_at": utcnow()}], ["version"])
    return SCHEMA_VERSION


def _add_missing_columns(conn: sa.Connection) -> None:
    """Forward migration: add the nullable columns of later schema versions to existing tables."""
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable:
                raise RuntimeError(
                    f"table {table.name} lacks the NOT NULL column {col.name}; this store predates a "
                    "schema change that needs a data migration"
                )
            kind = col.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f'ALTER TABLE "{table.name}" ADD COLUMN "{col.name}" {kind}'))


def upsert(
    conn: sa.Connection,
    table: sa.Table,
    rows: Sequence[Mapping[str, Any]],
    key: Sequence[str],
    update: Iterable[str] | None = None,
) -> None:
    """Insert rows; on a key conflict update the `update` columns (all non-key ones by default).

    `update=()` means insert-or-ignore.
    """
    if not rows:
        return
    dialect = conn.dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:  # pragma: no cover - guarded by make_engine
        raise ValueError(f"unsupported dialect {dialect}")
    cols = list(rows[0].keys())
    update_cols = [c for c in (cols if update is None else update) if c not in key]
    if update_cols:
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key), set_={c: stmt.excluded[c] for c in update_cols}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(key))
    # SQLite caps bound parameters per statement; keep batches well under it.
    step = max(1, 30000 // max(1, len(cols)))
    for i in range(0, len(rows), step):
        conn.execute(stmt, list(rows[i : i + step]))


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def live_generation(bind: Engine | sa.Connection) -> dict[str, Any] | None:
    """The generation searches use now, or None before the first publish: the one query for it.

    Every column of `index_generations`, plus the pointer's `previous_gen_id` and `live_since`
    (when the pointer last moved: a publish or a rollback).
    """
    gens, ptr = index_generations, index_pointer
    stmt = (
        sa.select(gens, ptr.c.previous_gen_id, ptr.c.updated_at.label("live_since"))
        .join(ptr, ptr.c.gen_id == gens.c.gen_id)
        .where(ptr.c.name == "live")
    )
    if isinstance(bind, sa.Connection):
        row = bind.execute(stmt).mappings().first()
    else:
        with bind.connect() as conn:
            row = conn.execute(stmt).mappings().first()
    return None if row is None else dict(row)


def counts(engine: Engine) -> dict[str, Any]:
    """Row counts for `research-pipeline status` and asset metadata."""
    with engine.connect() as conn:
        out: dict[str, Any] = {
            "documents": conn.execute(sa.select(sa.func.count()).select_from(documents)).scalar_one(),
            "sources": conn.execute(sa.select(sa.func.count()).select_from(document_sources)).scalar_one(),
            "chunks": conn.execute(sa.select(sa.func.count()).select_from(chunks)).scalar_one(),
            "embeddings": conn.execute(sa.select(sa.func.count()).select_from(embeddings)).scalar_one(),
            "pages": conn.execute(sa.select(sa.func.coalesce(sa.func.sum(documents.c.page_count), 0))).scalar_one(),
        }
        by_reason = conn.execute(
            sa.select(quarantine.c.reason, sa.func.count()).group_by(quarantine.c.reason)
        ).all()
        out["quarantine"] = {reason: n for reason, n in sorted(by_reason)}
        out["quarantined"] = sum(out["quarantine"].values())
        live = live_generation(conn)
        out["live_generation"] = live["gen_id"] if live else None
    return out
