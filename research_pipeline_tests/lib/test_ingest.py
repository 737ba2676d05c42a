"""Ingestion into real SQLite and PostgreSQL: documents, duplicates, quarantine, re-runs, kill -9, JSONL."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.ingest.pdf import (
    PAGE_SEPARATOR,
    REASONS,
    tesseract_available,
)
from research_pipeline.lib.ingest.pipeline import IngestReport, ingest
from research_pipeline.lib.ingest.sources import (
    FolderSource,
    JsonlSource,
    canonical_json,
    sources_for,
)
from research_pipeline_tests.shared import (
    DEMO_PAPERS,
    IR,
    PAPERS,
    REPO,
    on_log,
    require_shared,
)

PWL = "papers-we-love"
SUBSET = [
    f"{PWL}/systematic-review-in-software-engineering.pdf",  # encrypted with the empty password
    f"{PWL}/the_lisp_ii_garbage_collector.pdf",  # image-only: OCR
    f"{PWL}/therac.pdf",  # garbled text layer
    f"{PWL}/paxos-made-simple.pdf",
    f"{PWL}/bitcoin.pdf",
    "CUMCM-Paper-And-SourceCode/2010C论文.pdf",  # Chinese
    "MinerU/demo1.pdf",
]


def table_rows(engine: sa.Engine, table: sa.Table, drop: tuple[str, ...] = ()) -> list[tuple]:
    cols = [c for c in table.c if c.name not in drop]
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(*cols).order_by(*table.primary_key.columns))]


def snapshot(engine: sa.Engine, timestamps: bool = True) -> dict[str, list[tuple]]:
    """Every ingest table, row for row (optionally without the wall-clock columns)."""
    return {
        "documents": table_rows(engine, store.documents, () if timestamps else ("ingested_at",)),
        "document_sources": table_rows(engine, store.document_sources, () if timestamps else ("seen_at",)),
        "quarantine": table_rows(engine, store.quarantine, () if timestamps else ("quarantined_at",)),
    }


def make_inbox(tmp_path: Path, files: list[str]) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for rel in files:
        shutil.copy2(require_shared(PAPERS) / rel, inbox / Path(rel).name)
    return inbox


def test_subset_on_both_backends(engine, tmp_path):
    inbox = make_inbox(tmp_path, SUBSET)
    (inbox / "nested").mkdir()
    # The same bytes under a second name, in a subfolder, with an upper-case extension.
    shutil.copy2(inbox / "bitcoin.pdf", inbox / "nested" / "BITCOIN-copy.PDF")
    logs: list[str] = []
    with on_log("research_pipeline.lib.ingest.pipeline", logs.append):
        report = ingest(engine, sources_for(inbox), workers=2, timeout_s=60, log_every=3)

    assert isinstance(report, IngestReport)
    assert report.documents_new == 6  # 8 files: one garbled, one duplicate
    assert report.documents_unchanged == 1  # the duplicate
    assert report.sources_recorded == 7
    assert report.quarantined == {"garbled": 1}
    assert logs and "ingest done" in logs[-1]
    with engine.connect() as conn:
        docs = {r.doc_id: r for r in conn.execute(sa.select(store.documents))}
        sources = {r.uri: r.doc_id for r in conn.execute(sa.select(store.document_sources))}
        quarantine = {r.uri: r for r in conn.execute(sa.select(store.quarantine))}
    assert len(docs) == 6
    for uri, doc_id in sources.items():
        assert doc_id == util.sha256_hex(Path(uri).read_bytes())
    assert sources[str(inbox / "bitcoin.pdf")] == sources[str(inbox / "nested" / "BITCOIN-copy.PDF")]
    assert quarantine[str(inbox / "therac.pdf")].reason == "garbled"
    assert quarantine[str(inbox / "therac.pdf")].content_hash == util.sha256_hex((inbox / "therac.pdf").read_bytes())
    by_name = {Path(u).name: docs[d] for u, d in sources.items()}
    for doc in docs.values():
        assert doc.text.strip()
        offsets = json.loads(doc.page_offsets)
        assert len(offsets) == doc.page_count
        pages = doc.text.split(PAGE_SEPARATOR)
        assert [doc.text[o: o + len(p)] for o, p in zip(offsets, pages)] == pages
        assert 0 <= doc.quality <= 1
        assert doc.shard == doc.doc_id[0]
    assert by_name["systematic-review-in-software-engineering.pdf"].page_count > 10
    assert by_name["2010C论文.pdf"].language == "zh"
    assert by_name["paxos-made-simple.pdf"].title == "Paxos Made Simple"
    lisp = by_name["the_lisp_ii_garbage_collector.pdf"]
    if tesseract_available():
        assert lisp.ocr_pages == lisp.page_count == 2
        assert report.ocr_pages == 2
    # A re-run finds nothing to do and changes no row, timestamps included.
    before = snapshot(engine)
    again = ingest(engine, sources_for(inbox), workers=2)
    assert again.documents_new == 0 and again.sources_recorded == 0 and again.quarantined == {}
    assert again.documents_unchanged == 7  # 7 known sources skipped by (uri, size, mtime); therac by hash
    assert snapshot(engine) == before


def test_fixed_file_leaves_quarantine_and_changed_file_is_reparsed(engine, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = sorted(DEMO_PAPERS.glob("*.pdf"))
    (inbox / "a.pdf").write_bytes(b"<html>not yet</html>")
    shutil.copy2(good[0], inbox / "b.pdf")
    first = ingest(engine, sources_for(inbox))
    assert first.quarantined == {"not_pdf": 1} and first.documents_new == 1

    # Unchanged bad bytes under a new mtime: hashed, recognised, not parsed again.
    os.utime(inbox / "a.pdf", (time.time() + 5, time.time() + 5))
    assert ingest(engine, sources_for(inbox)).quarantined == {}

    shutil.copy2(good[1], inbox / "a.pdf")  # the fix
    shutil.copy2(good[2], inbox / "b.pdf")  # a new version of a good paper
    second = ingest(engine, sources_for(inbox))
    assert second.released == 1
    assert second.documents_new == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.quarantine)).scalar_one() == 0
        sources = dict(conn.execute(sa.select(store.document_sources.c.uri, store.document_sources.c.doc_id)).all())
        n_docs = conn.execute(sa.select(sa.func.count()).select_from(store.documents)).scalar_one()
    assert sources[str(inbox / "a.pdf")] == util.sha256_hex(good[1].read_bytes())
    assert sources[str(inbox / "b.pdf")] == util.sha256_hex(good[2].read_bytes())
    # The old version of b.pdf stays a document: nothing ingested is ever lost.
    assert n_docs == 3


def test_batched_commits_write_what_one_transaction_per_document_writes(tmp_path, monkeypatch):
    from research_pipeline.lib.ingest import pipeline as ingest_module

    inbox = tmp_path / "inbox"
    (inbox / "nested").mkdir(parents=True)
    papers = sorted(DEMO_PAPERS.glob("*.pdf"))[:8]
    for p in papers:
        shutil.copy2(p, inbox / p.name)
    shutil.copy2(papers[0], inbox / "nested" / "copy.pdf")  # the same bytes twice
    (inbox / "broken.pdf").write_bytes(papers[1].read_bytes()[:2000])
    (inbox / "notes.pdf").write_text("not a PDF")
    runs = {}
    for batch in (1, ingest_module.DOC_BATCH):
        monkeypatch.setattr(ingest_module, "DOC_BATCH", batch)
        engine = store.make_engine(f"sqlite:///{tmp_path / f'batch{batch}.db'}")
        store.create_schema(engine)
        report = ingest(engine, sources_for(inbox), workers=2)
        numbers = {k: v for k, v in report.as_metadata().items() if k not in ("seconds", "pages_per_s")}
        runs[batch] = (numbers, snapshot(engine, timestamps=False))
        engine.dispose()
    assert runs[1] == runs[ingest_module.DOC_BATCH]
    assert runs[1][0]["documents_new"] == 8 and runs[1][0]["quarantined"] == 2


def test_jsonl_records(engine, tmp_path):
    corpus = require_shared(IR) / "scifact" / "corpus.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()[:40]
    folder = tmp_path / "beir"
    folder.mkdir()
    extra = [
        lines[0].replace('"_id": "', '"_id": "dup-'),  # same content, another _id: another document
        lines[1],  # the same _id twice in one file: one source row, one document
        '{"_id": "blank", "title": "", "text": "  "}',
        "{not json",
    ]
    (folder / "corpus.jsonl").write_text("\n".join(lines + extra) + "\n", encoding="utf-8")
    srcs = sources_for(folder)
    assert [type(s) for s in srcs] == [FolderSource, JsonlSource]
    report = ingest(engine, srcs)
    assert report.documents_new == 41  # 40 records + the copy with another _id (another canonical JSON)
    assert report.quarantined == {"corrupt": 1, "empty": 1}
    rec = json.loads(lines[3])
    doc_id = util.sha256_hex(canonical_json(rec))
    with engine.connect() as conn:
        row = conn.execute(sa.select(store.documents).where(store.documents.c.doc_id == doc_id)).one()
    assert row.source_kind == "record" and row.title == rec["title"] and row.text == rec["text"]
    assert row.page_count == 1 and json.loads(row.page_offsets) == [0]
    item = next(i for i in JsonlSource(folder / "corpus.jsonl") if i.record and i.record["_id"] == rec["_id"])
    assert util.sha256_hex(item.read_bytes()) == doc_id
    before = snapshot(engine)
    again = ingest(engine, sources_for(folder))
    assert again.documents_new == 0 and again.documents_unchanged == 42 and again.quarantined == {}
    assert snapshot(engine) == before


def _worker_pids_with_marker(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    pids.append(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return pids


KILL_SCRIPT = """
import logging, sys, time
from research_pipeline.lib.core import store
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import sources_for
engine = store.make_engine(sys.argv[1])
store.create_schema(engine)
# Slow the walk down so the parent can kill this process mid-way with documents committed.
class Slow(logging.Handler):
    def emit(self, record):
        time.sleep(0.3)
log = logging.getLogger("research_pipeline.lib.ingest.pipeline")
log.addHandler(Slow())
log.setLevel(logging.INFO)
ingest(engine, sources_for(sys.argv[2]), workers=2, log_every=1)
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_mid_ingest_then_rerun_matches_uninterrupted(backend, request, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in sorted(DEMO_PAPERS.glob("*.pdf"))[:14]:
        shutil.copy2(p, inbox / p.name)
    if backend == "sqlite":
        killed_url, clean_url = f"sqlite:///{tmp_path / 'killed.db'}", f"sqlite:///{tmp_path / 'clean.db'}"
    else:
        request.getfixturevalue("pg_server")
        from research_pipeline_tests.shared import drop_pg_database, make_pg_database

        killed_url, clean_url = make_pg_database(), make_pg_database()
        request.addfinalizer(lambda: (drop_pg_database(killed_url), drop_pg_database(clean_url)))
    killed = store.make_engine(killed_url)
    store.create_schema(killed)
    marker = f"RP_TEST_KILL_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(REPO), marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, killed_url, str(inbox)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        n = 0
        while time.monotonic() < deadline and proc.poll() is None:
            with killed.connect() as conn:
                n = conn.execute(sa.select(sa.func.count()).select_from(store.documents)).scalar_one()
            if n >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "ingest finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with killed.connect() as conn:
        committed = conn.execute(sa.select(sa.func.count()).select_from(store.documents)).scalar_one()
    assert 3 <= committed < 14
    # The workers die with their parent (PR_SET_PDEATHSIG); give the kernel a moment.
    deadline = time.monotonic() + 10
    while _worker_pids_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _worker_pids_with_marker(marker) == []

    resumed = ingest(killed, sources_for(inbox))
    assert resumed.documents_new == 14 - committed
    clean = store.make_engine(clean_url)
    store.create_schema(clean)
    ingest(clean, sources_for(inbox))
    assert snapshot(killed, timestamps=False) == snapshot(clean, timestamps=False)
    killed.dispose()
    clean.dispose()


# ---------------------------------------------------------------------------------------------
# The whole shared corpus, once, on SQLite.


def _manifest() -> list[dict[str, str]]:
    with open(require_shared(PAPERS) / "MANIFEST.tsv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


#: Files whose text layer the manifest calls `text` but whose extracted text is junk: every page
#: of data-compression.pdf is >60% control characters, and functional-reactive-animation.pdf
#: comes out as single shifted letters ("O ^ r c W O R Z T"). And one it calls `text_garbled`
#: whose text is clean Chinese on every page. See docs/PARSING.md.
REALLY_GARBLED = {f"{PWL}/data-compression.pdf", f"{PWL}/functional-reactive-animation.pdf"}
REALLY_CLEAN = {"CUMCM-Paper-And-SourceCode/2022C古代玻璃论文.pdf"}


@pytest.mark.slow
def test_full_corpus_against_manifest_then_rerun(tmp_path):
    """All 164 shared papers in one SQLite store, checked file by file; then a re-run is a no-op.

    One test rather than a shared fixture: the ingest costs minutes and must run exactly once.
    """
    engine = store.make_engine(f"sqlite:///{tmp_path / 'rp.db'}")
    store.create_schema(engine)
    report = ingest(engine, sources_for(require_shared(PAPERS)), workers=2, timeout_s=120)
    rows = _manifest()
    assert len(rows) == 164
    with engine.connect() as conn:
        docs = {
            r.uri: r
            for r in conn.execute(
                sa.select(store.document_sources.c.uri, store.documents).join(
                    store.documents, store.documents.c.doc_id == store.document_sources.c.doc_id
                )
            )
        }
        quarantine = {r.uri: r for r in conn.execute(sa.select(store.quarantine))}
    print(f"\nfull corpus: {report.as_metadata()}")
    for row in rows:
        uri = str(PAPERS / row["file"])
        assert (uri in docs) != (uri in quarantine), row["file"]
        layer = row["text_layer"]
        if row["file"] in REALLY_GARBLED or (layer == "text_garbled" and row["file"] not in REALLY_CLEAN):
            assert quarantine[uri].reason == "garbled", row["file"]
            continue
        if layer == "image_only":
            if tesseract_available():
                assert docs[uri].ocr_pages > 0 and docs[uri].text.strip(), row["file"]
            else:
                assert quarantine[uri].reason == "needs_ocr", row["file"]
            continue
        doc = docs.get(uri)
        assert doc is not None, (row["file"], quarantine.get(uri))
        assert doc.page_count == int(row["pages"]), row["file"]
        assert doc.ocr_pages == 0
        # The manifest counted characters of its own extraction; ours must be of the same order.
        assert len(doc.text) > 0.5 * int(row["text_chars"]), row["file"]
        assert doc.garbled_ratio <= 0.5 and doc.quality > 0.5
    assert set(report.quarantined) <= set(REASONS)
    assert report.documents_new == len(docs)

    before = snapshot(engine)
    again = ingest(engine, sources_for(require_shared(PAPERS)), workers=2)
    assert again.documents_new == 0 and again.sources_recorded == 0 and again.quarantined == {}
    assert snapshot(engine) == before
    engine.dispose()
