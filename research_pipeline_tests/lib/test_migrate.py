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
from research_pipeline.lib.migration import migrate
from research_pipeline_tests.conftest import (
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
    engine = migrate.open_source_engine(source_url)
    yield engine
    engine.dispose()


@pytest.fixture
def target(pg_server, source_url):
    url = make_pg_database("rp_migrate")
    engine = migrate.open_target_engine(url, source_url)
    yield engine
    engine.dispose()
    drop_pg_database(url)


def _table_counts(engine) -> dict[str, int]:  # noqa: ANN001
    with engine.connect() as conn:
        return {
            spec.name: conn.execute(sa.select(sa.func.count()).select_from(spec.table)).scalar_one()
            for spec in migrate.TABLE_SPECS
        }


def _migrate_all(source, target, **kwargs) -> list[dict]:  # noqa: ANN001
    return [migrate.migrate_rows(source, target, shard, **kwargs) for shard in store.SHARDS]


def test_all_shards_arrive_equal_and_a_second_run_copies_nothing(source, target):
    results = _migrate_all(source, target)
    assert _table_counts(target) == _table_counts(source)
    assert sum(r["rows"] for r in results) == sum(_table_counts(source).values())
    states = migrate.migration_states(target)
    for spec in migrate.TABLE_SPECS:
        for shard in spec.shards:
            digests = migrate.digests_of(source, spec, shard)
            state = states[(spec.name, shard)]
            assert state["state"] == "verified"
            assert state["rows"] == len(digests)
            assert state["checksum"] == migrate.checksum_of(digests.values())
    assert migrate.verify(source, target, None, None, "").ok

    again = _migrate_all(source, target)
    assert sum(r["rows"] for r in again) == 0
    assert sum(r["tables_skipped"] for r in again) == len([p for p in migrate.expected_states() if p[0] in
                                                           migrate.SPECS_BY_NAME])
    # The query_log sequence moved past the copied ids: the pipeline can log on the target.
    with target.begin() as conn:
        conn.execute(sa.insert(store.query_log).values(ts=util.utcnow(), query="after", latency_ms=1.0,
                                                       n_results=0, cache_hit=False))
    assert _table_counts(target)["query_log"] == _table_counts(source)["query_log"] + 1


def test_a_backend_killed_mid_partition_leaves_nothing_and_a_rerun_completes(source, target, pg_server):
    shard = max(store.SHARDS, key=lambda s: len(migrate.digests_of(source, migrate.SPECS_BY_NAME["chunks"], s)))
    admin = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT")
    killed = []

    def kill_once(info: migrate.BatchInfo) -> None:
        if info.table == "chunks" and not killed:
            with admin.connect() as conn:
                killed.append(conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": info.backend_pid}).scalar())

    # Where the dead connection surfaces (inside COPY or at the rollback) decides the wrapper.
    with pytest.raises((sa.exc.OperationalError, psycopg.OperationalError)):
        migrate.migrate_rows(source, target, shard, batch_rows=2, on_batch=kill_once)
    admin.dispose()
    assert killed == [True]
    with target.connect() as conn:
        partial = conn.execute(sa.select(sa.func.count()).select_from(store.chunks)).scalar_one()
    assert partial == 0, "a killed copy must leave no rows of its shard"
    assert migrate.migration_states(target)[("chunks", shard)]["state"] == "pending"

    _migrate_all(source, target)
    assert _table_counts(target) == _table_counts(source)
    assert migrate.verify(source, target, None, None, "").ok


def test_verification_names_exactly_the_altered_and_missing_rows(source, target):
    _migrate_all(source, target)
    with target.begin() as conn:
        altered = conn.execute(sa.select(store.chunks.c.chunk_id).order_by(store.chunks.c.chunk_id).limit(1)).scalar_one()
        conn.execute(sa.update(store.chunks).where(store.chunks.c.chunk_id == altered).values(text="tampered"))
        gone = conn.execute(sa.select(store.embeddings.c.content_hash).order_by(store.embeddings.c.content_hash.desc())
                            .limit(1)).scalar_one()
        conn.execute(sa.delete(store.embeddings).where(store.embeddings.c.content_hash == gone))
    report = migrate.verify(source, target, None, None, "")
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
        migrate.migrate_rows(source, target, shard, force=True)
    assert migrate.verify(source, target, None, None, "").ok


def test_a_checksum_that_differs_after_the_copy_fails_the_shard(source, target, monkeypatch):
    """migrate_rows trusts only the target's own count and checksum: when they disagree it
    reads the rows back, and if no row explains it, the shard still fails by name."""
    shard = "0"
    monkeypatch.setattr(migrate, "checksum_in_database", lambda *_a: (0, "0" * 64))
    with pytest.raises(migrate.MigrationError, match="checksum differs from source"):
        migrate.migrate_rows(source, target, shard)
    assert migrate.migration_states(target)[("chunks", shard)]["state"] != "verified"


def test_dry_run_reports_what_would_move_and_changes_nothing(source, target, source_url):
    db_file = Path(sa.engine.make_url(source_url).database)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in db_file.parent.glob("rp.db*")}
    plan = migrate.dry_run(source, _EmptyStore(), target=target)
    counts = _table_counts(source)
    assert plan["tables"] == counts
    assert plan["rows"] == sum(counts.values())
    assert plan["bytes"] > 0 and plan["estimated_seconds"] > 0
    assert not sa.inspect(target).get_table_names(), "a dry run must not create anything on the target"

    migrate.migrate_rows(source, target, "0")
    partial = migrate.dry_run(source, _EmptyStore(), target=target)
    assert partial["tables"]["query_log"] == 0  # shard 0 (which holds all of it) is already verified
    assert partial["tables"]["chunks"] == counts["chunks"] - len(
        migrate.digests_of(source, migrate.SPECS_BY_NAME["chunks"], "0")
    )
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in db_file.parent.glob("rp.db*")}
    assert after == before, "the source SQLite files must only be read"


def test_text_postgresql_cannot_store_is_refused_by_name(tmp_path, target):
    url = f"sqlite:///{tmp_path / 'nul.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    doc_id = util.sha256_hex("nul")
    with engine.begin() as conn:
        store.upsert(conn, store.documents, [
            dict(doc_id=doc_id, shard=doc_id[0], source_kind="pdf", title="t", text="a\x00b", page_offsets="[0]",
                 parser="p", parser_version="1", quality=1.0, page_count=1, garbled_ratio=0.0, empty_pages=0,
                 ocr_pages=0, ingested_at=util.utcnow())
        ], ["doc_id"])
    engine.dispose()
    src = migrate.open_source_engine(url)
    with pytest.raises(migrate.MigrationError, match=f"documents row \\('{doc_id}',\\) column text contains NUL"):
        migrate.migrate_rows(src, target, doc_id[0])
    src.dispose()
    with target.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.documents)).scalar_one() == 0


def test_the_target_must_be_another_postgresql_database(source_url, tmp_path):
    with pytest.raises(migrate.MigrationError, match="not PostgreSQL"):
        migrate.open_target_engine(f"sqlite:///{tmp_path / 'x.db'}")
    pg = "postgresql+psycopg://postgres@127.0.0.1:5432/rp"
    with pytest.raises(migrate.MigrationError, match="same database"):
        migrate.open_target_engine(pg, pg)
    with pytest.raises(migrate.MigrationError, match="does not exist"):
        migrate.open_source_engine(f"sqlite:///{tmp_path / 'missing.db'}")


class _EmptyStore:
    """An object store with no files (these tests migrate rows only)."""

    url = "empty"

    def list(self, prefix: str = ""):
        return iter(())


def test_postgresql_computes_the_same_row_digests_as_python(target):
    """The target's digests come from SQL; they must equal Python's for awkward values too."""
    migrate.prepare_target(target)
    now = util.utcnow()
    doc_ids = [util.sha256_hex(str(i)) for i in range(6)]
    floats = [100.0, 1e-300, -0.0, 1.5e16, 0.1 + 0.2, 1700000000.123456]
    with target.begin() as conn:
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
        spec = migrate.SPECS_BY_NAME[name]
        for shard in {d[0] for d in doc_ids}:
            in_sql = migrate.digests_of(target, spec, shard, in_database=True)
            assert in_sql
            assert in_sql == migrate.digests_of(target, spec, shard, in_database=False), (name, shard)
            # The sum PostgreSQL makes of them equals Python's, bit for bit.
            expected = (len(in_sql), migrate.checksum_of(in_sql.values()))
            assert migrate.checksum_in_database(target, spec, shard) == expected, (name, shard)


def test_transient_s3_errors_are_retried_and_others_raised(monkeypatch):
    from botocore.exceptions import ClientError

    monkeypatch.setattr(migrate.time, "sleep", lambda _s: None)

    def error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")

    calls = []

    def flaky(answer: str) -> str:
        calls.append(answer)
        if len(calls) < 3:
            raise error(503, "ServiceUnavailable")
        return answer

    assert migrate._with_s3_retries(flaky, "ok") == "ok" and len(calls) == 3

    def forbidden() -> None:
        calls.append("403")
        raise error(403, "AccessDenied")

    calls.clear()
    with pytest.raises(ClientError):
        migrate._with_s3_retries(forbidden)
    assert calls == ["403"]  # not retried

    def always_down() -> None:
        calls.append("503")
        raise error(503, "SlowDown")

    calls.clear()
    with pytest.raises(ClientError):
        migrate._with_s3_retries(always_down, attempts=4)
    assert len(calls) == 4
