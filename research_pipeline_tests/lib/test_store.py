"""The storage layer on both backends: idempotent schema, upserts, clear errors."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store, util


def _doc(doc_id: str, title: str) -> dict:
    return {
        "doc_id": doc_id,
        "shard": store.shard_of(doc_id),
        "source_kind": "pdf",
        "title": title,
        "page_count": 1,
        "text": "body",
        "page_offsets": "[0]",
        "parser": "pypdfium2",
        "parser_version": "test",
        "quality": 1.0,
        "garbled_ratio": 0.0,
        "empty_pages": 0,
        "ocr_pages": 0,
        "ingested_at": util.utcnow(),
    }


def test_create_schema_is_idempotent_and_versioned(db_url):
    engine = store.make_engine(db_url)
    assert store.create_schema(engine) == store.SCHEMA_VERSION
    assert store.create_schema(engine) == store.SCHEMA_VERSION
    with engine.connect() as conn:
        versions = conn.execute(sa.select(store.schema_version.c.version)).scalars().all()
        tables = set(sa.inspect(conn).get_table_names())
    assert versions == [store.SCHEMA_VERSION]
    assert {t.name for t in store.metadata.sorted_tables} <= tables
    engine.dispose()


def test_upsert_updates_on_conflict_and_ignores_when_asked(engine):
    doc_id = util.sha256_hex(b"paper")
    with engine.begin() as conn:
        store.upsert(conn, store.documents, [_doc(doc_id, "first")], ["doc_id"])
        store.upsert(conn, store.documents, [_doc(doc_id, "second")], ["doc_id"])
        store.upsert(conn, store.documents, [_doc(doc_id, "ignored")], ["doc_id"], update=())
    with engine.connect() as conn:
        titles = conn.execute(sa.select(store.documents.c.title)).scalars().all()
    assert titles == ["second"]


def test_upsert_batches_beyond_the_parameter_limit(engine):
    rows = [
        {"uri": f"file:///p/{i}.pdf", "doc_id": util.sha256_hex(str(i)), "size": i, "mtime": 0.0, "seen_at": util.utcnow()}
        for i in range(12_000)
    ]
    with engine.begin() as conn:
        store.upsert(conn, store.document_sources, rows, ["uri"])
        store.upsert(conn, store.document_sources, rows, ["uri"])
    assert store.counts(engine)["sources"] == len(rows)


def test_counts_on_an_empty_store(engine):
    c = store.counts(engine)
    assert (c["documents"], c["chunks"], c["quarantined"], c["live_generation"]) == (0, 0, 0, None)


def test_sqlite_runs_in_wal_mode(sqlite_url):
    engine = store.make_engine(sqlite_url)
    store.create_schema(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


@pytest.mark.parametrize(
    "url, field",
    [("not a url", "RP_DATABASE_URL"), ("mysql://root@localhost/x", "RP_DATABASE_URL")],
)
def test_bad_database_url_names_the_setting(url, field):
    with pytest.raises(ValueError, match=field):
        store.make_engine(url)
