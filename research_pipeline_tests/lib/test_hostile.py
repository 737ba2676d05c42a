"""Hostile input: malformed, encrypted, bomb and escaping files beside good papers."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.ingest.pdf import REASONS
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import FolderSource, sources_for
from research_pipeline_tests.conftest import DEMO_PAPERS, HOSTILE, require_shared

GOOD = sorted(DEMO_PAPERS.glob("*.pdf"))[:5]


def _children() -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            out.update(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return {c for c in out if Path(f"/proc/{c}").exists()}


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _outcomes(engine: sa.Engine) -> tuple[dict[str, sa.Row], dict[str, sa.Row]]:
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
    return docs, quarantine


def test_bad_inputs_in_an_inbox(engine, tmp_path):
    hostile = require_shared(HOSTILE) / "synthetic"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in GOOD:
        shutil.copy2(p, inbox / p.name)
    (inbox / "empty.pdf").write_bytes(b"")
    (inbox / "notes.pdf").write_text("these are my notes, not a PDF\n")
    good_bytes = GOOD[0].read_bytes()
    (inbox / "truncated.pdf").write_bytes(good_bytes[: len(good_bytes) // 2])
    shutil.copy2(hostile / "encrypted-user-password.pdf", inbox / "locked.pdf")
    shutil.copy2(hostile / "flate-bomb-1gib.pdf", inbox / "bomb.pdf")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(GOOD[0], outside / "secret.pdf")
    (inbox / "escape.pdf").symlink_to(outside / "secret.pdf")
    (inbox / "escape-dir").symlink_to(outside, target_is_directory=True)
    (inbox / "sub").mkdir()
    (inbox / "sub" / "inside-link.pdf").symlink_to(inbox / GOOD[1].name)  # stays inside: fine

    sources = sources_for(inbox) + [FolderSource(inbox, paths=["../outside/secret.pdf"])]
    # A generous deadline: only the flate bomb is slow, and it must end on the memory cap.
    report = ingest(engine, sources, workers=2, timeout_s=120, memory_mb=1024)

    docs, quarantine = _outcomes(engine)
    expected = {
        "empty.pdf": "empty",
        "notes.pdf": "not_pdf",
        "truncated.pdf": "corrupt",
        "locked.pdf": "encrypted",
        "bomb.pdf": "memory",
        "escape.pdf": "outside_inbox",
        "escape-dir": "outside_inbox",
        "../outside/secret.pdf": "outside_inbox",
    }
    got = {os.path.relpath(uri, inbox): row.reason for uri, row in quarantine.items()}
    assert got == expected
    for uri, row in quarantine.items():
        assert row.message and len(row.message) > 20
        if row.reason == "outside_inbox":
            assert row.content_hash is None  # never read
    for p in GOOD:
        assert str(inbox / p.name) in docs, p.name
    assert str(inbox / "sub" / "inside-link.pdf") in docs
    assert report.documents_new == len(GOOD)
    assert sum(report.quarantined.values()) == len(expected)
    # Nothing is re-parsed or re-quarantined on a second run.
    again = ingest(engine, sources, workers=2, timeout_s=120, memory_mb=1024)
    assert again.quarantined == {} and again.documents_new == 0


@pytest.mark.slow
def test_hostile_batch_beside_good_papers(sqlite_url):
    manifest = list(csv.DictReader(open(require_shared(HOSTILE) / "MANIFEST.tsv", encoding="utf-8"), delimiter="\t"))
    assert len(manifest) == 143
    engine = store.make_engine(sqlite_url)
    store.create_schema(engine)
    children_before = _children()
    rss_before = _vm_kib("VmRSS")
    seen_workers: set[int] = set()

    def watch(_msg: str) -> None:
        seen_workers.update(_children() - children_before)

    sources = [
        FolderSource(HOSTILE, paths=[row["file"] for row in manifest]),
        FolderSource(DEMO_PAPERS, paths=[p.name for p in GOOD]),
    ]
    # 1 GiB of address space: the flate bomb hits the cap after inflating half as much as at
    # 2 GiB, which keeps it well inside the 20 s deadline on a loaded machine.
    report = ingest(engine, sources, workers=2, timeout_s=20, memory_mb=1024, log=watch, log_every=5)
    rss_growth_mib = (_vm_kib("VmRSS") - rss_before) / 1024
    peak_mib = _vm_kib("VmHWM") / 1024
    print(f"\nhostile batch: {report.as_metadata()}; parent RSS growth {rss_growth_mib:.0f} MiB, peak {peak_mib:.0f} MiB")

    docs, quarantine = _outcomes(engine)
    for p in GOOD:
        assert str(DEMO_PAPERS / p.name) in docs
    for row in manifest:
        uri = str(HOSTILE / row["file"])
        assert (uri in docs) != (uri in quarantine), row["file"]
        if uri in docs:
            doc = docs[uri]
            assert doc.text.strip() and doc.garbled_ratio <= 0.5, row["file"]
            # pdfium itself failed to open it in the manifest's run: so must we.
            assert not row["pypdfium2"].startswith("error"), row["file"]
        else:
            assert quarantine[uri].reason in REASONS
            if row["pypdfium2"] == "memory":
                assert quarantine[uri].reason == "memory", row["file"]
            if row["pypdfium2"].startswith("error"):
                assert quarantine[uri].reason != "timeout", row["file"]
    assert quarantine[str(HOSTILE / "synthetic" / "empty.pdf")].reason == "empty"
    assert quarantine[str(HOSTILE / "synthetic" / "zero-pages.pdf")].reason == "empty"
    assert quarantine[str(HOSTILE / "synthetic" / "blank-5000-pages.pdf")].reason == "empty"
    assert quarantine[str(HOSTILE / "synthetic" / "encrypted-user-password.pdf")].reason == "encrypted"
    assert quarantine[str(HOSTILE / "synthetic" / "not-a-pdf-html.pdf")].reason == "not_pdf"
    # The parent streamed results: its memory stayed far below the bombs' sizes.
    assert rss_growth_mib < 1536
    # Workers ran, and none of them (or their tesseract) is left.
    assert seen_workers
    assert not (_children() - children_before)
    assert not any(Path(f"/proc/{pid}").exists() for pid in seen_workers)
    engine.dispose()
