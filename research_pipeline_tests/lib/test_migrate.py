"""The row migration, SQLite -> a real PostgreSQL database: equality, resumption, verification, dry run.

The source holds real abstracts (SciFact) cut into chunks with random unit vectors, plus rows of
every other table, written through the store's own schema. Expected values are derived from
the source in each test.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.migration import rows as rows_module
from research_pipeline.lib.migration import s3 as s3_module
from research_pipeline.lib.migration.codec import (
    checksum_in_database,
    checksum_of,
    digests_of,
)
from research_pipeline.lib.migration.endpoints import (
    MigrationSource,
    MigrationTarget,
    open_source_engine,
    open_target_engine,
    prepare_target,
)
from research_pipeline.lib.migration.errors import MigrationError
from research_pipeline.lib.migration.plan import dry_run
from research_pipeline.lib.migration.rows import BatchInfo, migrate_rows
from research_pipeline.lib.migration.state import State, migration_states
from research_pipeline.lib.migration.tables import (
    SPECS_BY_NAME,
    TABLE_SPECS,
    expected_states,
)
from research_pipeline.lib.migration.verify import verify
from research_pipeline_tests.shared import (
    IR,
    drop_pg_database,
    make_pg_database,
    require_shared,
)

N_DOCS = 60


def _build_source(path: Path) -> str:
    url = f"sqlite:///{path}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    rng = np.random.default_rng(7)
    now = util.utcnow()
    docs, sources, chunks, embs = [], [], [], []
    with open(require_shared(IR / "scifact" / "corpus.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for _, line in zip(range(N_DOCS), fh)]
    for i, rec in enumerate(records):
        doc_id = util.sha256_hex(json.dumps(rec, sort_keys=True))
        text = rec["text"]
        docs.append(
            dict(doc_id=doc_id, shard=doc_id[0], source_kind="record", title=rec["title"], authors='["A. Author"]',
                 year=1990 + i % 30, abstract=text[:200], doi=None, arxiv_id=None, language="en", page_count=1,
                 text=text, page_offsets="[0]", parser="jsonl", parser_version="1", quality=1.0 - i / 1000,
                 garbled_ratio=i / 7, empty_pages=0, ocr_pages=0, extra=json.dumps({"_id": rec["_id"]}),
                 ingested_at=now)
        )
        sources.append(dict(uri=f"corpus.jsonl#{rec['_id']}", doc_id=doc_id, size=len(text), mtime=1.7e9 + i / 3,
                            seen_at=now))
        step = max(1, len(text) // 3)
        for ordinal, start in enumerate(range(0, len(text), step)):
            piece = text[start : start + step]
            content_hash = util.sha256_hex(piece)
            chunks.append(
                dict(chunk_id=util.sha256_hex(f"{doc_id}|{ordinal}|{content_hash}"), doc_id=doc_id, shard=doc_id[0],
                     ordinal=ordinal, section="Abstract", is_references=ordinal == 3, page_start=1, page_end=1,
                     char_start=start, char_end=start + len(piece), n_tokens=len(piece.split()),
                     content_hash=content_hash, text=piece)
            )
            vec = rng.standard_normal(384).astype("<f4")
            embs.append(dict(content_hash=content_hash, model_id="all-MiniLM-L6-v2@256", shard=content_hash[0],
                             dim=384, vector=(vec / np.linalg.norm(vec)).astype("<f4").tobytes(), created_at=now))
    with engine.begin() as conn:
        store.upsert(conn, store.documents, docs, ["doc_id"])
        store.upsert(conn, store.document_sources, sources, ["uri"])
        store.upsert(conn, store.chunks, chunks, ["chunk_id"])
        store.upsert(conn, store.embeddings, embs, ["content_hash", "model_id"], update=())
        store.upsert(conn, store.quarantine, [
            dict(uri=f"/inbox/bad-{i}.pdf", content_hash=None if i % 2 else util.sha256_hex(str(i)),
                 reason="corrupt", message="no %PDF header", size=i, quarantined_at=now) for i in range(20)
        ], ["uri"])
        store.upsert(conn, store.index_generations, [
            dict(gen_id="20260101T000000-abcdef", status="published", model_id="all-MiniLM-L6-v2@256",
                 n_documents=N_DOCS, n_chunks=len(chunks), n_fts_rows=len(chunks), n_vectors=len(chunks),
                 fts_table="fts_20260101t000000_abcdef", vector_key="indexes/20260101T000000-abcdef/manifest.json",
                 manifest="{}", checks="{}", created_at=now, published_at=now)
        ], ["gen_id"])
        store.upsert(conn, store.index_pointer, [
            dict(name="live", gen_id="20260101T000000-abcdef", previous_gen_id=None, updated_at=now)
        ], ["name"])
        conn.execute(sa.insert(store.query_log), [
            dict(ts=now, query=f"query {i} ü", filters=None, gen_id="20260101T000000-abcdef", latency_ms=i * 1.25,
                 n_results=i, cache_hit=bool(i % 2)) for i in range(10)
        ])
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def source_url(tmp_path_factory) -> str:
    return _build_source(tmp_path_factory.mktemp("migrate_src") / "rp.db")


@pytest.fixture
def source(source_url):
    src = MigrationSource.open(source_url)
    yield src
    src.engine.dispose()


@pytest.fixture
def target(pg_server, source_url):
    url = make_pg_database("rp_migrate")
    engine = open_target_engine(url, source_url)
    yield MigrationTarget(engine)
    engine.dispose()
    drop_pg_database(url)


def _table_counts(end) -> dict[str, int]:
    with end.engine.connect() as conn:
        return {
            spec.name: conn.execute(sa.select(sa.func.count()).select_from(spec.table)).scalar_one()
            for spec in TABLE_SPECS
        }


def _migrate_all(source, target, **kwargs) -> list[dict]:
    return [migrate_rows(source, target, shard, **kwargs) for shard in store.SHARDS]


def test_all_shards_arrive_equal_and_a_second_run_copies_nothing(source, target):
    results = _migrate_all(source, target)
    assert _table_counts(target) == _table_counts(source)
    assert sum(r.rows for r in results) == sum(_table_counts(source).values())
    states = migration_states(target.engine)
    for spec in TABLE_SPECS:
        for shard in spec.shards:
            digests = digests_of(source.engine, spec, shard)
            state = states[(spec.name, shard)]
            assert state.state is State.VERIFIED
            assert state.rows == len(digests)
            assert state.checksum == checksum_of(digests.values())
    assert verify(source, target).ok

    again = _migrate_all(source, target)
    assert sum(r.rows for r in again) == 0
    assert sum(r.tables_skipped for r in again) == len([p for p in expected_states() if p[0] in
                                                           SPECS_BY_NAME])
    # The query_log sequence moved past the copied ids: the pipeline can log on the target.
    with target.engine.begin() as conn:
        conn.execute(sa.insert(store.query_log).values(ts=util.utcnow(), query="after", latency_ms=1.0,
                                                       n_results=0, cache_hit=False))
    assert _table_counts(target)["query_log"] == _table_counts(source)["query_log"] + 1


def test_a_backend_killed_mid_partition_leaves_nothing_and_a_rerun_completes(source, target, pg_server):
    shard = max(store.SHARDS, key=lambda s: len(digests_of(source.engine, SPECS_BY_NAME["chunks"], s)))
    admin = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT")
    killed = []

    def kill_once(info: BatchInfo) -> None:
        if info.table == "chunks" and not killed:
            with admin.connect() as conn:
                killed.append(conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": info.backend_pid}).scalar())

    # Where the dead connection surfaces (inside COPY or at the rollback) decides the wrapper.
    with pytest.raises((sa.exc.OperationalError, psycopg.OperationalError)):
        migrate_rows(source, target, shard, batch_rows=2, on_batch=kill_once)
    admin.dispose()
    assert killed == [True]
    with target.engine.connect() as conn:
        partial = conn.execute(sa.select(sa.func.count()).select_from(store.chunks)).scalar_one()
    assert partial == 0, "a killed copy must leave no rows of its shard"
    assert migration_states(target.engine)[("chunks", shard)].state is State.PENDING

    _migrate_all(source, target)
    assert _table_counts(target) == _table_counts(source)
    assert verify(source, target).ok


def test_verification_names_exactly_the_altered_and_missing_rows(source, target):
    _migrate_all(source, target)
    with target.engine.begin() as conn:
        altered = conn.execute(sa.select(store.chunks.c.chunk_id).order_by(store.chunks.c.chunk_id).limit(1)).scalar_one()
        conn.execute(sa.update(store.chunks).where(store.chunks.c.chunk_id == altered).values(text="tampered"))
        gone = conn.execute(sa.select(store.embeddings.c.content_hash).order_by(store.embeddings.c.content_hash.desc())
                            .limit(1)).scalar_one()
        conn.execute(sa.delete(store.embeddings).where(store.embeddings.c.content_hash == gone))
    report = verify(source, target)
    assert not report.ok
    rows = {(d.where, d.key, d.problem) for d in report.differences if d.kind == "row"}
    assert rows == {
        ("chunks", altered, "differs from source"),
        ("embeddings", f"{gone}|all-MiniLM-L6-v2@256", "missing on target"),
    }
    assert {d.where for d in report.differences if d.kind == "table"} == {"embeddings"}
    assert altered in report.summary() and gone in report.summary()

    # A forced re-run of the shards it names repairs the target.
    for shard in {d.shard for d in report.differences if d.kind == "row"}:
        migrate_rows(source, target, shard, force=True)
    assert verify(source, target).ok


def test_a_checksum_that_differs_after_the_copy_fails_the_shard(source, target, monkeypatch):
    """migrate_rows trusts only the target's own count and checksum: when they disagree it
    reads the rows back, and if no row explains it, the shard still fails by name."""
    shard = "0"
    monkeypatch.setattr(rows_module, "checksum_in_database", lambda *_a: (0, "0" * 64))
    with pytest.raises(MigrationError, match="checksum differs from source"):
        migrate_rows(source, target, shard)
    assert migration_states(target.engine)[("chunks", shard)].state is not State.VERIFIED


def test_dry_run_reports_what_would_move_and_changes_nothing(source, target, source_url):
    db_file = Path(sa.engine.make_url(source_url).database)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in db_file.parent.glob("rp.db*")}
    plan = dry_run(source, target=target)
    counts = _table_counts(source)
    assert plan.tables == counts
    assert plan.rows == sum(counts.values())
    assert plan.bytes > 0 and plan.estimated_seconds > 0
    assert not sa.inspect(target.engine).get_table_names(), "a dry run must not create anything on the target"

    migrate_rows(source, target, "0")
    partial = dry_run(source, target=target)
    assert partial.tables["query_log"] == 0  # shard 0 (which holds all of it) is already verified
    assert partial.tables["chunks"] == counts["chunks"] - len(
        digests_of(source.engine, SPECS_BY_NAME["chunks"], "0")
    )
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in db_file.parent.glob("rp.db*")}
    assert after == before, "the source SQLite files must only be read"


def _doc(doc_id: str, **values) -> dict:
    row = dict(doc_id=doc_id, shard=doc_id[0], source_kind="pdf", title="t", authors="[]", text="text",
               page_offsets="[0]", parser="p", parser_version="1", quality=1.0, page_count=1, garbled_ratio=0.0, empty_pages=0,
               ocr_pages=0, ingested_at=util.utcnow())
    return {**row, **values}


def _chunk(doc_id: str, text: str) -> dict:
    return dict(chunk_id=util.sha256_hex(doc_id + "|0"), doc_id=doc_id, shard=doc_id[0], ordinal=0, section="S",
                is_references=False, page_start=1, page_end=1, char_start=0, char_end=len(text), n_tokens=1,
                content_hash=util.sha256_hex(doc_id), text=text)


def _set_raw_text(conn, table: str, column: str, key: str, key_value, raw: bytes) -> None:
    """Store bytes that are not UTF-8 as TEXT, as another SQLite writer can (Python's driver cannot)."""
    conn.exec_driver_sql(f'UPDATE "{table}" SET "{column}" = CAST(? AS TEXT) WHERE "{key}" = ?', (raw, key_value))


def test_text_postgresql_cannot_store_from_outside_is_normalised_and_verifies(tmp_path, target):
    """NUL and lone surrogates in search queries, paper metadata and text and chunk text (anyone
    can send a query or a paper) must not stop the migration: they arrive as U+FFFD, one
    character for one, and verification compares that form."""
    url = f"sqlite:///{tmp_path / 'user_text.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    doc_ids = [util.sha256_hex(f"user text {i}") for i in range(3)]
    surrogate = "\ud800".encode("utf-8", "surrogatepass")  # an encoded lone surrogate
    with engine.begin() as conn:
        store.upsert(conn, store.documents, [
            _doc(doc_ids[0], title="nul\x00title", authors='["A\x00B"]', text="body \x00 text"),
            _doc(doc_ids[1]),
            _doc(doc_ids[2], title="plain"),
        ], ["doc_id"])
        store.upsert(conn, store.chunks, [_chunk(doc_ids[0], "chunk\x00text"), _chunk(doc_ids[1], "x")],
                     ["chunk_id"])
        conn.execute(sa.insert(store.query_log), [
            dict(id=41559, ts=util.utcnow(), query="drop\x00 table", latency_ms=1.0, n_results=0, cache_hit=False),
            dict(id=41560, ts=util.utcnow(), query="x", latency_ms=1.0, n_results=0, cache_hit=False),
        ])
        _set_raw_text(conn, "query_log", "query", "id", 41560, b"q" + surrogate + b"!")
        _set_raw_text(conn, "documents", "title", "doc_id", doc_ids[1], b"T" + surrogate)
        _set_raw_text(conn, "documents", "authors", "doc_id", doc_ids[1], b'["Caf\xe9"]')  # Latin-1, not UTF-8
        _set_raw_text(conn, "documents", "text", "doc_id", doc_ids[2], surrogate + b" body")
        _set_raw_text(conn, "chunks", "text", "doc_id", doc_ids[1], b"a" + surrogate + b"b")
    engine.dispose()

    src = MigrationSource.open(url)
    _migrate_all(src, target)
    report = verify(src, target)
    assert report.ok, report.summary()
    assert report.rows == sum(_table_counts(src).values())
    src.engine.dispose()
    d, c, q = store.documents, store.chunks, store.query_log
    with target.engine.connect() as conn:
        docs = {r.doc_id: r for r in conn.execute(sa.select(d.c.doc_id, d.c.title, d.c.authors, d.c.text))}
        chunk_text = dict(conn.execute(sa.select(c.c.doc_id, c.c.text)).all())
        queries = dict(conn.execute(sa.select(q.c.id, q.c.query)).all())
    assert queries == {41559: "drop\ufffd table", 41560: "q\ufffd!"}
    assert (docs[doc_ids[0]].title, docs[doc_ids[0]].authors, docs[doc_ids[0]].text) == (
        "nul\ufffdtitle", '["A\ufffdB"]', "body \ufffd text")
    assert (docs[doc_ids[1]].title, docs[doc_ids[1]].authors) == ("T\ufffd", '["Caf\ufffd"]')
    assert docs[doc_ids[2]].text == "\ufffd body"
    assert chunk_text == {doc_ids[0]: "chunk\ufffdtext", doc_ids[1]: "a\ufffdb"}


def test_text_postgresql_cannot_store_elsewhere_is_refused_by_name(tmp_path, target):
    """Tables the pipeline writes itself (and identifiers anywhere) are not normalised: such text
    there means a damaged source, and the error names the row and what to do."""
    url = f"sqlite:///{tmp_path / 'nul.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    now = util.utcnow()
    with engine.begin() as conn:
        store.upsert(conn, store.index_generations, [
            dict(gen_id="g1", status="published", model_id="m", n_documents=0, n_chunks=0, n_fts_rows=0,
                 n_vectors=0, fts_table="fts\x00g1", vector_key="indexes/g1/manifest.json", manifest="{}",
                 checks="{}", created_at=now, published_at=now)
        ], ["gen_id"])
    engine.dispose()
    src = MigrationSource.open(url)
    with pytest.raises(MigrationError) as err:
        migrate_rows(src, target, "0")
    src.engine.dispose()
    message = str(err.value)
    assert "index_generations row ('g1',) column fts_table contains NUL characters" in message
    assert "re-run migration_job for shard 0" in message and "re-ingest" not in message
    with target.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.index_generations)).scalar_one() == 0


def test_the_target_must_be_another_postgresql_database(source_url, tmp_path):
    with pytest.raises(MigrationError, match="not PostgreSQL"):
        open_target_engine(f"sqlite:///{tmp_path / 'x.db'}")
    pg = "postgresql+psycopg://postgres@127.0.0.1:5432/rp"
    with pytest.raises(MigrationError, match="same database"):
        open_target_engine(pg, pg)
    with pytest.raises(MigrationError, match="does not exist"):
        open_source_engine(f"sqlite:///{tmp_path / 'missing.db'}")


def test_postgresql_computes_the_same_row_digests_as_python(target):
    """The target's digests come from SQL; they must equal Python's for awkward values too."""
    prepare_target(target.engine)
    now = util.utcnow()
    doc_ids = [util.sha256_hex(str(i)) for i in range(6)]
    floats = [100.0, 1e-300, -0.0, 1.5e16, 0.1 + 0.2, 1700000000.123456]
    with target.engine.begin() as conn:
        store.upsert(conn, store.documents, [
            dict(doc_id=d, shard=d[0], source_kind="pdf", title=None if i % 2 else "Ünïcode ✓ 'quoted' V3:x",
                 text="line\nbreak\\ and tab\t" * i, page_offsets="[0]", parser="p", parser_version="1",
                 quality=floats[i], page_count=i, garbled_ratio=-floats[i], empty_pages=0, ocr_pages=0,
                 year=None if i % 3 else 1999 + i, ingested_at=now.replace(microsecond=i * 7))
            for i, d in enumerate(doc_ids)
        ], ["doc_id"])
        store.upsert(conn, store.embeddings, [
            dict(content_hash=d, model_id="m", shard=d[0], dim=2, vector=bytes(range(i * 8)), created_at=now)
            for i, d in enumerate(doc_ids)
        ], ["content_hash", "model_id"])
        store.upsert(conn, store.chunks, [
            dict(chunk_id=d, doc_id=d, shard=d[0], ordinal=i, section="S", is_references=bool(i % 2), page_start=1,
                 page_end=1, char_start=0, char_end=1, n_tokens=1, content_hash=d, text="t")
            for i, d in enumerate(doc_ids)
        ], ["chunk_id"])
    for name in ("documents", "embeddings", "chunks"):
        spec = SPECS_BY_NAME[name]
        for shard in {d[0] for d in doc_ids}:
            in_sql = digests_of(target.engine, spec, shard, in_database=True)
            assert in_sql
            assert in_sql == digests_of(target.engine, spec, shard, in_database=False), (name, shard)
            # The sum PostgreSQL makes of them equals Python's, bit for bit.
            expected = (len(in_sql), checksum_of(in_sql.values()))
            assert checksum_in_database(target.engine, spec, shard) == expected, (name, shard)


def test_transient_s3_errors_are_retried_and_others_raised(monkeypatch):
    from botocore.exceptions import ClientError

    monkeypatch.setattr(s3_module.time, "sleep", lambda _s: None)

    def error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")

    calls = []

    def flaky(answer: str) -> str:
        calls.append(answer)
        if len(calls) < 3:
            raise error(503, "ServiceUnavailable")
        return answer

    assert s3_module.with_s3_retries(flaky, "ok") == "ok" and len(calls) == 3

    def forbidden() -> None:
        calls.append("403")
        raise error(403, "AccessDenied")

    calls.clear()
    with pytest.raises(ClientError):
        s3_module.with_s3_retries(forbidden)
    assert calls == ["403"]  # not retried

    def always_down() -> None:
        calls.append("503")
        raise error(503, "SlowDown")

    calls.clear()
    with pytest.raises(ClientError):
        s3_module.with_s3_retries(always_down, attempts=4)
    assert len(calls) == 4
