"""Document lifecycle on both backends: the inbox is the truth for what new generations hold.

Real demo papers are copied into a temporary inbox, ingested with the real parser, then
deleted, replaced, duplicated and put back; the store must keep every row and mark what is
retired. Hostile names and text (links, FIFOs, NUL, lone surrogates, bytes that are not UTF-8)
must become rows, never a failed write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.ingest import lifecycle
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import FolderSource, inbox_files, sources_for
from research_pipeline.lib.search.querylog import QueryLog
from research_pipeline_tests.shared import DEMO_PAPERS

PAPERS = sorted(DEMO_PAPERS.glob("*.pdf"))[:4]
A, B, C, D = PAPERS


def _run(engine, inbox: Path, **kw):
    return ingest(engine, sources_for(inbox), workers=1, ocr=False, **kw)


def _docs(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["doc_id"]: dict(r) for r in conn.execute(
            sa.select(store.documents.c.doc_id, store.documents.c.retired_reason, store.documents.c.retired_at,
                      store.documents.c.title, store.documents.c.doi)).mappings()}


def _sources(engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["uri"]: dict(r) for r in conn.execute(sa.select(store.document_sources)).mappings()}


def _live(engine) -> set[str]:
    return {d for d, row in _docs(engine).items() if row["retired_reason"] is None}


def test_removed_and_replaced_files_retire_their_documents(engine, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in (A, B, C):
        shutil.copy2(p, inbox / p.name)
    shutil.copy2(B, inbox / "copy-of-b.pdf")  # the same paper under two names
    first = _run(engine, inbox)
    ids = {p: util.sha256_file(p) for p in PAPERS}
    assert first.documents_new == 3 and first.live_documents == 3
    assert _live(engine) == {ids[A], ids[B], ids[C]}

    (inbox / A.name).unlink()  # removed
    (inbox / B.name).unlink()  # one of its two names
    shutil.copyfile(D, inbox / C.name)  # new bytes under an old name
    second = _run(engine, inbox)
    docs = _docs(engine)
    assert set(docs) == {ids[A], ids[B], ids[C], ids[D]}  # nothing is deleted
    assert _live(engine) == {ids[B], ids[D]}
    assert docs[ids[A]]["retired_reason"] == docs[ids[C]]["retired_reason"] == "gone"
    assert docs[ids[A]]["retired_at"] is not None
    assert second.retired == 2 and second.live_documents == 2
    srcs = _sources(engine)
    assert srcs[str(inbox / A.name)]["gone_at"] is not None  # kept, marked
    assert srcs[str(inbox / C.name)]["doc_id"] == ids[D] and srcs[str(inbox / C.name)]["gone_at"] is None

    (inbox / "copy-of-b.pdf").unlink()  # now both names are gone
    shutil.copy2(A, inbox / A.name)  # and A is back, bytes and mtime as before
    third = _run(engine, inbox)
    assert _live(engine) == {ids[A], ids[D]}
    assert third.restored == 1 and third.retired == 1
    assert third.documents_new == 0  # A was known: not parsed again
    assert _sources(engine)[str(inbox / A.name)]["gone_at"] is None

    # A re-run with nothing changed changes nothing.
    again = _run(engine, inbox)
    assert (again.retired, again.restored, again.sources_gone) == (0, 0, 0)


def test_partial_listings_and_other_inboxes_never_retire(engine, tmp_path):
    inbox, other = tmp_path / "inbox", tmp_path / "other"
    inbox.mkdir()
    other.mkdir()
    shutil.copy2(A, inbox / A.name)
    shutil.copy2(B, inbox / B.name)
    shutil.copy2(C, other / C.name)
    _run(engine, inbox)
    _run(engine, other)
    # Only some paths: what they do not name is not gone.
    report = ingest(engine, [FolderSource(inbox, paths=[A.name])], workers=1, ocr=False)
    assert report.sources_gone == 0 and len(_live(engine)) == 3
    # A complete listing of one inbox says nothing about the other.
    (inbox / B.name).unlink()
    report = _run(engine, inbox)
    assert report.sources_gone == 1
    assert _live(engine) == {util.sha256_file(A), util.sha256_file(C)}


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_records_leave_with_their_line_or_their_file(engine, tmp_path, monkeypatch, relative):
    (tmp_path / "inbox" / "beir").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    inbox = Path("inbox") if relative else tmp_path / "inbox"  # RP_INBOX may be relative
    corpus = inbox / "beir" / "corpus.jsonl"
    records = [{"_id": f"r{i}", "title": f"Record {i}", "text": f"Text of record number {i}."} for i in range(3)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _run(engine, inbox).live_documents == 3
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    assert _run(engine, inbox).live_documents == 2
    corpus.unlink()
    report = _run(engine, inbox)
    assert report.live_documents == 0 and report.sources_gone == 2
    assert len(_docs(engine)) == 3


def test_remove_restore_and_retracted_list(engine, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in (A, B):
        shutil.copy2(p, inbox / p.name)
    corpus = inbox / "corpus.jsonl"
    corpus.write_text(
        json.dumps({"_id": "doi-paper", "title": "A retracted study", "text": "Its results did not hold.",
                    "metadata": {"doi": "10.1234/Retracted.5678"}}) + "\n"
        + json.dumps({"_id": "fine", "title": "A sound study", "text": "Its results hold."}) + "\n"
    )
    _run(engine, inbox)
    ida, idb = util.sha256_file(A), util.sha256_file(B)
    [doi_doc] = lifecycle.find_documents(engine, "https://doi.org/10.1234/retracted.5678")
    assert len(_live(engine)) == 4

    removed = lifecycle.remove(engine, str(inbox / A.name))
    assert [r["doc_id"] for r in removed] == [ida] and removed[0]["retired_reason"] == "removed"
    lifecycle.remove(engine, idb)
    assert _live(engine) == set(_docs(engine)) - {ida, idb}
    # A removal outlasts ingests of the file that is still in the inbox.
    _run(engine, inbox)
    assert ida not in _live(engine)
    with pytest.raises(LookupError, match="no document matches"):
        lifecycle.remove(engine, str(inbox / "never-there.pdf"))
    lifecycle.restore(engine, ida)
    assert ida in _live(engine)

    retracted = tmp_path / "retracted.txt"
    retracted.write_text(f"# retracted papers\ndoi:10.1234/RETRACTED.5678\n{idb}  # also removed\n")
    report = _run(engine, inbox, retracted_file=retracted)
    docs = _docs(engine)
    assert docs[doi_doc]["retired_reason"] == "retracted"
    assert docs[idb]["retired_reason"] == "removed"  # removal is the stronger reason
    assert report.live_documents == 2
    # No file given: the recorded retractions stay.
    _run(engine, inbox)
    assert _docs(engine)[doi_doc]["retired_reason"] == "retracted"
    # An emptied list restores.
    retracted.write_text("")
    _run(engine, inbox, retracted_file=retracted)
    assert _docs(engine)[doi_doc]["retired_reason"] is None
    retracted.write_text("10.1234/ok\nnot an identifier\n")
    with pytest.raises(ValueError, match="line 2: 'not an identifier'"):
        lifecycle.read_retracted(retracted)
    with pytest.raises(FileNotFoundError, match="RP_RETRACTED_FILE"):
        lifecycle.read_retracted(tmp_path / "missing.txt")


def test_links_fifos_and_hidden_files(engine, tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / ".drafts").mkdir(parents=True)
    (inbox / "sub").mkdir()
    shutil.copy2(A, inbox / A.name)
    shutil.copy2(B, inbox / ".drafts" / "draft.pdf")  # hidden: not part of the inbox
    (inbox / ".~lock.pdf").write_bytes(b"editor lock")
    (inbox / "dangling.pdf").symlink_to(inbox / "nowhere.pdf")
    (inbox / "loop-a.pdf").symlink_to(inbox / "loop-b.pdf")
    (inbox / "loop-b.pdf").symlink_to(inbox / "loop-a.pdf")
    os.mkfifo(inbox / "sub" / "pipe.pdf")  # opening it would block forever
    report = _run(engine, inbox)
    with engine.connect() as conn:
        quarantine = {os.path.relpath(r.uri, inbox): r for r in conn.execute(sa.select(store.quarantine))}
    assert {k: r.reason for k, r in quarantine.items()} == {
        "dangling.pdf": "broken_link",
        "loop-a.pdf": "link_loop",
        "loop-b.pdf": "link_loop",
        "sub/pipe.pdf": "unreadable",
    }
    assert "nowhere.pdf" in quarantine["dangling.pdf"].message
    assert report.documents_new == 1
    # The sensor reads the same listing: the hidden draft triggers nothing and is never ingested.
    listed = {f.rel(inbox) for f in inbox_files(inbox)}
    assert listed == {A.name, "dangling.pdf", "loop-a.pdf", "loop-b.pdf", "sub/pipe.pdf"}
    from research_pipeline.defs.ingest.sensors import inbox_listing

    assert {rel for rel, _, _ in inbox_listing(inbox)} == listed
    # Fixing the link releases it; deleting the others clears their rows.
    (inbox / "dangling.pdf").unlink()
    (inbox / "dangling.pdf").symlink_to(inbox / A.name)
    for name in ("loop-a.pdf", "loop-b.pdf", "sub/pipe.pdf"):
        (inbox / name).unlink()
    report = _run(engine, inbox)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.quarantine)).scalar_one() == 0
    assert str(inbox / "dangling.pdf") in _sources(engine)


def test_unstorable_text_from_users_is_stored(engine, tmp_path):
    """NUL and lone surrogates in records, a file name that is not UTF-8 and a search query
    holding both are written (PostgreSQL rejects NUL, both drivers lone surrogates)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    name = os.fsdecode(b"paper-\xff\xfe.pdf")
    shutil.copy2(A, inbox / name)
    hostile = "bad\x00text \ud800 and \udfff"
    (inbox / "corpus.jsonl").write_text(json.dumps({
        "_id": "id\x00\ud800", "title": hostile, "text": hostile * 3,
        "metadata": {"authors": [hostile], "year": "19\x0099", "note": hostile},
    }) + "\n" + json.dumps({"_id": "odd-types", "title": "Odd", "text": "t", "metadata": {"authors": {"a": 1}}}) + "\n")
    report = _run(engine, inbox)
    assert report.documents_new >= 2
    with engine.connect() as conn:
        rec = conn.execute(sa.select(store.documents).where(store.documents.c.source_kind == "record",
                                                            store.documents.c.title.like("bad%"))).mappings().one()
        uris = set(conn.execute(sa.select(store.document_sources.c.uri)).scalars())
    for value in (rec["title"], rec["text"], rec["authors"], rec["extra"]):
        assert "\x00" not in value and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    assert rec["title"].startswith("bad") and rec["text"].startswith("bad")
    assert str(inbox / "paper-\\xff\\xfe.pdf") in uris
    # A second run finds everything known.
    assert _run(engine, inbox).documents_new == 0

    with QueryLog(engine) as qlog:
        qlog.log("neural\x00 nets \ud83d", {"year": "20\x0020 \udc80"}, latency_ms=1.0, n_results=1)
    with engine.connect() as conn:
        row = conn.execute(sa.select(store.query_log)).mappings().one()
    assert row["query"] == "neural\ufffd nets \ufffd" and "\x00" not in row["filters"]


def test_schema_forward_migration_adds_the_lifecycle_columns(engine):
    added = {"documents": ("retired_reason", "retired_at", "removed_at"), "document_sources": ("gone_at",),
             "chunks": ("chunking_id",)}
    with engine.begin() as conn:
        for table, cols in added.items():
            for col in cols:
                conn.execute(sa.text(f'ALTER TABLE "{table}" DROP COLUMN "{col}"'))
        conn.execute(sa.delete(store.schema_version))
    assert store.create_schema(engine) == store.SCHEMA_VERSION == 2
    inspector = sa.inspect(engine)
    for table, cols in added.items():
        assert set(cols) <= {c["name"] for c in inspector.get_columns(table)}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.max(store.schema_version.c.version))).scalar() == 2
    store.create_schema(engine)  # idempotent


def _probe(engine, doc_id: str) -> str:
    """A query only this document answers well: the words of one of its chunks."""
    c = store.chunks
    with engine.connect() as conn:
        texts = conn.execute(sa.select(c.c.text).where(c.c.doc_id == doc_id).order_by(c.c.ordinal)).scalars().all()
    return max(texts[:4], key=len)[:300]


def _found(searcher, query: str) -> set[str]:
    return {h.doc_id for mode in ("hybrid", "bm25", "dense") for h in searcher.search(query, k=10, mode=mode)}


def test_removed_replaced_and_quarantined_papers_never_answer_searches(engine, tmp_path, embedder):
    from research_pipeline.lib.core.objectstore import LocalObjectStore
    from research_pipeline.lib.ingest.chunking import chunk_documents
    from research_pipeline.lib.release import build, searchers

    obj = LocalObjectStore(tmp_path / "objects")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in (A, B, C):
        shutil.copy2(p, inbox / p.name)
    ids = {p: util.sha256_file(p) for p in PAPERS}

    def reindex(gen_id: str):
        _run(engine, inbox)
        chunk_documents(engine, embedder.count_tokens)
        gen = build.build_generation(engine, obj, embedder, gen_id=gen_id)
        return gen, searchers.open_searcher(engine, obj, embedder, gen_id=gen_id)

    _, first = reindex("20260101T000000-aaaaaa")
    probes = {p: _probe(engine, ids[p]) for p in (A, B, C)}
    for p in (A, B, C):
        assert ids[p] in _found(first, probes[p])

    (inbox / A.name).unlink()
    shutil.copyfile(D, inbox / C.name)
    (inbox / B.name).write_text("not a PDF any more\n")  # quarantined (not_pdf)
    gen2, second = reindex("20260101T000001-bbbbbb")
    assert gen2["n_documents"] == 1
    probes[D] = _probe(engine, ids[D])
    assert ids[D] in _found(second, probes[D])
    for p in (A, B, C):
        found = _found(second, probes[p])
        assert not found & {ids[A], ids[B], ids[C]}, p.name
    # The store still holds them, marked; the older generation still answers with them.
    docs = _docs(engine)
    assert {docs[ids[p]]["retired_reason"] for p in (A, B, C)} == {"gone"}
    assert ids[A] in _found(first, probes[A])


def test_remove_command(monkeypatch, tmp_path, sqlite_url, capsys):
    from research_pipeline import cli

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy2(A, inbox / A.name)
    shutil.copy2(B, inbox / B.name)
    monkeypatch.setenv("RP_HOME", str(tmp_path / "rp"))
    monkeypatch.setenv("RP_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("RP_INBOX", str(inbox))
    engine = store.make_engine(sqlite_url)
    store.create_schema(engine)
    _run(engine, inbox)
    # A path relative to the inbox names the paper; --undo brings it back.
    assert cli.main(["remove", A.name, "--json"]) == 0
    [doc] = json.loads(capsys.readouterr().out)
    assert doc["doc_id"] == util.sha256_file(A) and doc["retired_reason"] == "removed"
    assert _live(engine) == {util.sha256_file(B)}
    assert cli.main(["remove", "--undo", util.sha256_file(A)]) == 0
    assert "1 document(s) restored" in capsys.readouterr().out
    assert len(_live(engine)) == 2
    assert cli.main(["remove", "no-such-paper.pdf"]) == 2
    assert "no document matches 'no-such-paper.pdf'" in capsys.readouterr().err
    engine.dispose()
