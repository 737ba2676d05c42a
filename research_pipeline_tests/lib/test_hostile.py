"""Hostile input: malformed, encrypted, bomb and escaping files beside good papers."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import FolderSource, sources_for
from research_pipeline_tests.shared import DEMO_PAPERS, HOSTILE, on_log, require_shared

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
    for row in quarantine.values():
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


#: What "opens with real text" means in the manifest: pdfium read at least this many characters
#: (a paragraph). Shorter texts are qpdf's one-word test pages ("potato") and fuzzers' debris,
#: which the pipeline may keep or quarantine as too little text.
REAL_TEXT_CHARS = 200
#: Files whose manifest line alone does not say what they must become, each with its outcome
#: and why (looked at by hand; the test checks the outcome).
NOT_BY_THE_MANIFEST = {
    "pdfjs/poppler-90-0-fuzzed.pdf": (
        "garbled", "fuzzed content streams: most of pdfium's 1,266 characters are PDF operators and junk bytes"),
    "synthetic/text-bomb-64mib.pdf": (
        "memory", ("pdfium needs ~870 MiB of RSS for its 64 MiB of 'AAA' (measured), over this test's 1 GiB "
                   "address-space cap; the manifest's run allowed 2 GB")),
}
#: The parent only streams results: its peak RSS during the batch (the flate bomb inflates to
#: 1 GiB and the text bomb to 64 MiB in the children) rises at most this far above its start.
PARENT_PEAK_GROWTH_MIB = 256


def _expected(outcome: str) -> tuple[str, int, int]:
    """("ok", pages, chars), ("error", 0, 0) or ("memory", 0, 0) from a manifest cell like `ok(1,6)`."""
    m = re.fullmatch(r"ok\((\d+),(\d+)\)", outcome)
    if m:
        return "ok", int(m.group(1)), int(m.group(2))
    if outcome.startswith("error"):
        return "error", 0, 0
    return outcome, 0, 0


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so the peak is this test's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_hostile_batch_beside_good_papers(sqlite_url):
    with open(require_shared(HOSTILE) / "MANIFEST.tsv", encoding="utf-8") as fh:
        manifest = list(csv.DictReader(fh, delimiter="\t"))
    assert len(manifest) == 143
    engine = store.make_engine(sqlite_url)
    store.create_schema(engine)
    children_before = _children()
    assert _reset_peak_rss(), "cannot reset VmHWM: /proc/self/clear_refs is not writable"
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
    with on_log("research_pipeline.lib.ingest.pipeline", watch):
        report = ingest(engine, sources, workers=2, timeout_s=20, memory_mb=1024, log_every=5)
    peak_mib = _vm_kib("VmHWM") / 1024
    growth_mib = peak_mib - rss_before / 1024
    print(f"\nhostile batch: {report.as_metadata()}; parent RSS before {rss_before / 1024:.0f} MiB, "
          f"peak {peak_mib:.0f} MiB (+{growth_mib:.0f})")

    docs, quarantine = _outcomes(engine)
    for p in GOOD:
        assert str(DEMO_PAPERS / p.name) in docs
    wrong: list[str] = []
    for row in manifest:
        uri = str(HOSTILE / row["file"])
        assert (uri in docs) != (uri in quarantine), row["file"]  # exactly one trace per file
        outcome, pages, chars = _expected(row["pypdfium2"])
        got = "document" if uri in docs else quarantine[uri].reason
        if row["file"] in NOT_BY_THE_MANIFEST:
            want, why = NOT_BY_THE_MANIFEST[row["file"]]
            if got != want:
                wrong.append(f"{row['file']}: expected {want} ({why}), got {got}")
            continue
        if outcome == "ok" and chars >= REAL_TEXT_CHARS and got != "document":
            wrong.append(f"{row['file']}: pdfium read {chars} characters on {pages} pages, we quarantined it ({got})")
        if outcome == "error" and got == "document":
            wrong.append(f"{row['file']}: pdfium could not open it ({row['pypdfium2']}), we made a document")
        if outcome == "error" and got == "timeout":
            wrong.append(f"{row['file']}: pdfium fails fast ({row['pypdfium2']}), we timed out")
        if outcome == "memory" and got != "memory":
            wrong.append(f"{row['file']}: pdfium ran out of memory, we said {got}")
        if outcome == "ok" and chars == 0 and got == "document" and not docs[uri].ocr_pages:
            wrong.append(f"{row['file']}: pdfium read no text, yet our document has text without OCR")
    assert not wrong, "\n".join(wrong)
    assert quarantine[str(HOSTILE / "synthetic" / "empty.pdf")].reason == "empty"
    assert quarantine[str(HOSTILE / "synthetic" / "zero-pages.pdf")].reason == "empty"
    assert quarantine[str(HOSTILE / "synthetic" / "blank-5000-pages.pdf")].reason == "empty"
    assert quarantine[str(HOSTILE / "synthetic" / "encrypted-user-password.pdf")].reason == "encrypted"
    assert quarantine[str(HOSTILE / "synthetic" / "not-a-pdf-html.pdf")].reason == "not_pdf"
    # The parent streamed results: its peak memory stayed far below the bombs' sizes.
    assert growth_mib < PARENT_PEAK_GROWTH_MIB, f"parent peak RSS {peak_mib:.0f} MiB, +{growth_mib:.0f} MiB"
    # Workers ran, and none of them (or their tesseract) is left.
    assert seen_workers
    assert not (_children() - children_before)
    assert not any(Path(f"/proc/{pid}").exists() for pid in seen_workers)
    engine.dispose()
