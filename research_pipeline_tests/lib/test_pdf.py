"""PDF parsing: text cleanup, garble detection, and the worker pool's timeouts, memory cap and cleanup."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from research_pipeline.lib.ingest import cleanup, pdf, sandbox
from research_pipeline_tests.shared import (
    DEMO_PAPERS,
    HOSTILE,
    PAPERS,
    require_shared,
)


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int | None = None) -> set[int]:
    pid = pid or os.getpid()
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.update(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return {c for c in out if _alive(c)}


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            members.append(int(entry.name))
    return members


def test_ligatures_soft_hyphens_and_controls_are_cleaned():
    raw = "e\ufb03cient \ufb02ow of \ufb01les\r\nexam\ufffe\r\nple\x00 and\x07 \ue000tab\tok"
    assert cleanup.clean_text(raw) == "efficient flow of files\nexample and tab\tok"


def test_one_scan_reading_matches_page_stats_and_clean_text():
    # `read_page` skips the passes its scan shows to change nothing; `clean_text` folds its
    # passes together. Both must equal the step-by-step definition, tricky orders included.
    pages = [
        "",
        "   \n\t ",
        "plain ASCII text of a page\r\nwith CRLF line ends\r\n" * 3,
        "e\ufb03cient \ufb02ow \ufb05 \ufb1d\ufb4f of \ufb01les\r\nexam\ufffe\r\nple\x00 and\x07 \ue000tab\tok",
        "soft\ufffe \t\nhyphen\x02\nand\ufffe\x03\nkept\fform feed\x0b\x1c\x85 done",
        "(cid:12) glyphs (cid:7)(cid:8) and (ci\ufffed:5) and (ci\x03d:6) and (cid:\ufb01)",
        "Grandes Client\xe8les \xc0 \xd7 \xa9 \x85 caf\xe9 " * 10,
        "O ^ r c W O R Z T b W Q c N Q a W T Q W d Q c W s W P S Z W T O R Z T Q R S O " * 20,
        "a b c d e f g h i j " * 30,
    ]
    for raw in pages:
        stats, text = cleanup.read_page(raw)
        assert stats == cleanup.page_stats(raw), raw
        assert text == cleanup.clean_text(raw) == cleanup._clean_text_stepwise(raw), raw


def test_dehyphenation_joins_broken_words_and_keeps_real_hyphens():
    pages = ["an exam-\nple of a well-\nknown effect", "this well-known effect is an example"]
    out = cleanup.dehyphenate(pages)
    assert out[0] == "an example of a well-known effect"
    assert out[1] == pages[1]
    # Capitalised continuations are not line-break hyphenation (e.g. "Navier-\nStokes").
    assert cleanup.dehyphenate(["Navier-\nStokes"]) == ["Navier-\nStokes"]


def test_hyphenated_words_are_those_of_the_full_word_scan_of_the_lower_cased_text():
    for text in ["well-known a-b-c x--y -lead trail- (state-of-the-art)\u2003co-op\nnon-\nlinear",
                 "caf\xe9-cr\xe8me 9-5 _-_ a- -b \xa0ab-cd\xa0",
                 "Well-Known \u03a3-\u03a3 \u0391\u03a3-b \u0130-x \u212a-K", ""]:
        expected = {w for w in cleanup._WORD_RE.findall(text.lower()) if "-" in w}
        assert cleanup._hyphenated_words(text) == expected


def test_page_stats_separates_clean_and_junk_text():
    clean = "The present LISP free storage control program, the garbage collector, has a limitation. " * 5
    junk = "a³`¹\x95·3½&´3¹\"¹\x86¾T·&¿£À\x8eÀ\x15Á&ÂÄÃ\x9fÅ'Æ\x88Ç?È&¶º\x88¼\x8cÉËÊÌÈÍº\x8e³=Î" * 5
    assert not cleanup.page_stats(clean).garbled
    assert cleanup.page_stats(junk).garbled
    spaced = " ".join("O ^ r c W O R Z T b W Q c N Q a W T Q W d Q c W s W P S Z W T O R Z T Q R S O".split()) * 20
    assert cleanup.page_stats(spaced).garbled
    assert cleanup.page_stats("").chars == 0


def test_quality_score_bounds():
    assert pdf.quality_score([100, 100], 0, 0, 0) == 1.0
    assert pdf.quality_score([100, 0], 0, 1, 0) == 0.75
    assert pdf.quality_score([0], 0, 1, 0) == 0.0
    assert 0 < pdf.quality_score([100], 0, 0, 1) < 1


def test_parse_demo_paper_offsets_and_pages():
    path = sorted(DEMO_PAPERS.glob("*.pdf"))[0]
    r = pdf.parse_pdf(path, ocr=False)
    assert r.ok and r.page_count == len(r.pages) >= 1
    text = r.text
    for i, off in enumerate(r.page_offsets):
        assert text[off: off + len(r.pages[i])] == r.pages[i]
    assert "\f" not in "".join(r.pages)
    assert r.quality > 0.9


def test_empty_password_encrypted_paper_parses():
    path = require_shared(PAPERS) / "papers-we-love" / "systematic-review-in-software-engineering.pdf"
    assert b"/Encrypt" in path.read_bytes()
    r = pdf.parse_pdf(path, ocr=False)
    assert r.ok and r.page_count > 10 and len(r.text) > 10000


@pytest.mark.parametrize(
    "name, reason",
    [
        ("synthetic/empty.pdf", "empty"),
        ("synthetic/zero-pages.pdf", "empty"),
        ("synthetic/not-a-pdf-html.pdf", "not_pdf"),
        ("synthetic/not-a-pdf-png.pdf", "not_pdf"),
        ("synthetic/truncated.pdf", "corrupt"),
        ("synthetic/encrypted-user-password.pdf", "encrypted"),
        ("synthetic/blank-5000-pages.pdf", "empty"),
    ],
)
def test_bad_files_get_their_reason(name, reason):
    r = pdf.parse_pdf(require_shared(HOSTILE) / name, ocr=False)
    assert r.reason == reason, r.message
    assert r.message


def test_image_only_page_needs_ocr_without_ocr_and_is_read_with_it():
    path = require_shared(PAPERS) / "papers-we-love" / "the_lisp_ii_garbage_collector.pdf"
    assert pdf.parse_pdf(path, ocr=False).reason == "needs_ocr"
    if not pdf.tesseract_available():
        pytest.skip("tesseract binary not installed")
    r = pdf.parse_pdf(path, ocr=True)
    assert r.ok and r.ocr_pages == r.page_count == 2
    assert "garbage collector" in r.text.lower()


def test_pool_kills_a_file_past_its_timeout_and_leaves_no_process():
    # The 64 MiB text bomb takes seconds of pdfium work on its single page.
    bomb = require_shared(HOSTILE) / "synthetic" / "text-bomb-64mib.pdf"
    good = sorted(DEMO_PAPERS.glob("*.pdf"))[0]
    before = _children()
    with sandbox.ParsePool(workers=2, timeout_s=0.5, file_timeout_s=0.5, ocr=False) as pool:
        results = {}
        seen_pids: set[int] = set()
        for key, res in pool.imap_unordered([("bomb", str(bomb))]):
            results[key] = res
            seen_pids.update(pool.pids())
        pool.timeout_s = pool.file_timeout_s = 60
        for key, res in pool.imap_unordered([("good", str(good))]):
            results[key] = res
            seen_pids.update(pool.pids())
    assert results["bomb"].reason == "timeout", results["bomb"].message
    assert "at page 1;" in results["bomb"].message  # its single page: read from the progress record
    assert results["good"].ok
    assert seen_pids
    assert not any(_alive(p) for p in seen_pids)
    assert _children() <= before


def test_timeout_during_ocr_kills_tesseract_too():
    if not pdf.tesseract_available():
        pytest.skip("tesseract binary not installed")
    scan = require_shared(PAPERS) / "papers-we-love" / "1985-Flajolet-Probabilistic-counting.pdf"
    good = sorted(DEMO_PAPERS.glob("*.pdf"))[0]
    seen: set[int] = set()
    stop = threading.Event()
    with sandbox.ParsePool(workers=1, timeout_s=60, ocr=True) as pool:
        list(pool.imap_unordered([("warm", str(good))]))  # the worker is started and imported

        def watch() -> None:
            # Record every process in the worker's process group: the worker and its tesseract.
            while not stop.is_set():
                for pgid in pool.pids():
                    seen.update(_group_members(pgid))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        # One page of OCR takes about a second of CPU, so a quarter second without progress fires.
        pool.timeout_s = 0.25
        try:
            [(_key, res)] = list(pool.imap_unordered([("scan", str(scan))]))
        finally:
            stop.set()
            watcher.join()
    assert res.reason == "timeout", res.message
    assert seen
    print(f"processes seen in the worker's group: {len(seen)}")
    assert not any(_alive(p) for p in seen)


def test_memory_cap_turns_a_flate_bomb_into_memory():
    bomb = require_shared(HOSTILE) / "synthetic" / "flate-bomb-1gib.pdf"
    with sandbox.ParsePool(workers=1, timeout_s=120, memory_mb=1024, ocr=False) as pool:
        [(_, res)] = list(pool.imap_unordered([("bomb", str(bomb))]))
    assert res.reason == "memory", res.message


def test_pool_closes_idle_workers_on_exit():
    path = sorted(DEMO_PAPERS.glob("*.pdf"))[0]
    with sandbox.ParsePool(workers=2, ocr=False) as pool:
        list(pool.imap_unordered([(1, str(path)), (2, str(path))]))
        pids = pool.pids()
        assert pids and all(_alive(p) for p in pids)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_progress_record_is_shared_and_ignores_a_torn_write():
    fd, parent_side = sandbox._ProgressRecord.create()
    worker_side = sandbox._ProgressRecord(fd)
    os.close(fd)
    try:
        assert parent_side.read() is None
        before = time.monotonic()
        worker_side.write(7)
        page, started = parent_side.read()
        assert page == 7 and before <= started <= time.monotonic()
        worker_side._slots[0] += 1  # a write under way (odd sequence number): not read
        assert parent_side.read() is None
    finally:
        worker_side.close()
        parent_side.close()


def test_pool_starts_the_next_file_before_the_caller_sees_a_result():
    papers = sorted(DEMO_PAPERS.glob("*.pdf"))[:4]
    pulled: list[int] = []
    at_result: list[tuple[int, list]] = []
    waits = 0

    def jobs():
        for i, p in enumerate(papers):
            pulled.append(i)
            yield i, str(p)

    def before_wait() -> float:
        nonlocal waits
        waits += 1
        return 0.01

    with sandbox.ParsePool(workers=1, ocr=False) as pool:
        for key, res in pool.imap_unordered(jobs(), before_wait=before_wait):
            assert res.ok
            at_result.append((key, [w.job for w in pool._workers]))
            # The job after the next one is pulled only now, while the worker parses.
            assert len(pulled) == min(key + 2, len(papers))
    # Each result arrives with the worker already on the next file.
    assert at_result == [(0, [1]), (1, [2]), (2, [3]), (3, [None])]
    assert waits >= len(papers)
