"""PDF text extraction: pypdfium2 per page, in killable child processes, with OCR and quality scoring.

Every file is parsed in a worker process of its own process group, under an address-space
limit (RLIMIT_AS) and a wall-clock deadline enforced by the parent, so a hostile file can
hang, explode or crash a worker but never the ingest. The parent kills the whole process
group (the worker and any `tesseract` it started) on a timeout, and closes every worker
when it is done, so no process is ever left behind.

A parse ends as a `ParseResult` whose `reason` is None for a document, or one of
`REASONS` for a quarantined file.
"""

from __future__ import annotations

import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata as _importlib_metadata
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

#: Why a file is not a document. Exactly these strings are stored in quarantine.reason.
REASONS: tuple[str, ...] = (
    "encrypted",
    "needs_ocr",
    "garbled",
    "timeout",
    "memory",
    "corrupt",
    "not_pdf",
    "empty",
    "outside_inbox",
)

PARSER = "pypdfium2"
PARSER_VERSION = _importlib_metadata.version("pypdfium2")
#: Separator between pages in documents.text.
PAGE_SEPARATOR = "\n\f\n"
#: A document whose garbled characters exceed this share of all its characters is quarantined.
GARBLED_DOC_THRESHOLD = 0.5
#: A page is garbled when this share of its non-space characters is junk (see `page_stats`).
GARBLED_PAGE_THRESHOLD = 0.12
OCR_DPI = 200

LIGATURES = {
    "\ufb00": "ff",
    "\ufb01": "fi",
    "\ufb02": "fl",
    "\ufb03": "ffi",
    "\ufb04": "ffl",
    "\ufb05": "st",
    "\ufb06": "st",
}
_LIGATURE_RE = re.compile("[" + "".join(LIGATURES) + "]")
# NFKC is applied only to the Alphabetic Presentation Forms block: elsewhere it would rewrite
# math (x² -> x2) and CJK punctuation, which changes meaning.
_PRESENTATION_RE = re.compile("[\ufb07-\ufb4f]")
# Characters dropped from extracted text: C0/C1 controls except tab/newline, pdfium's soft
# hyphen marker (U+FFFE), U+FFFF, the replacement character and the private-use area. They
# carry no meaning for search, and PostgreSQL text cannot hold NUL.
_DROP_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd\ufffe\uffff\ue000-\uf8ff]")
_CID_RE = re.compile(r"\(cid:\d+\)")
_HYPHEN_BREAK_RE = re.compile(r"(\w+)-[ \t]*\n[ \t]*([a-z]\w*)")
_WORD_RE = re.compile(r"\w+(?:-\w+)*")
_LINE_END_HYPHEN_RE = re.compile(r"-[ \t]*\n[ \t]*[a-z]")


@dataclass
class PageStats:
    """Junk measurements of one page's raw text."""

    chars: int  # non-space characters
    bad: int  # junk characters among them
    garbled: bool


# Junk characters: replacement/non-characters, private use, C0/C1 controls, and the Latin-1
# symbols (not letters) that Type 3 fonts without a ToUnicode map decode to.
_JUNK_RE = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\xa1-\xa9\xab-\xb4\xb6-\xb9\xbb-\xbf\xd7\xf7\ufffd-\uffff\ue000-\uf8ff]")
_LETTER_RE = re.compile(r"[^\W\d_]")
_LATIN1_LETTER_RE = re.compile("[\xc0-\xd6\xd8-\xf6\xf8-\xff]")
_ASCII_WORD_RE = re.compile(r"[A-Za-z]+")
_ASCII_LETTER_RE = re.compile(r"[A-Za-z]")
_SINGLE_LETTER_RE = re.compile(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])")


def page_stats(raw: str) -> PageStats:
    """Measure how much of a page's raw extracted text is junk.

    Junk: replacement/private-use/control characters, unmapped `(cid:N)` glyphs, and Latin-1
    symbols outside letters (the signature of Type 3 fonts without a ToUnicode map). A page
    is also garbled when Latin text arrives as single letters separated by spaces, which is
    what a substitution-cipher font map produces. Calibrated on shared/data/papers (see
    docs/PARSING.md): clean pages stay below 0.10, garbled ones are above 0.14. Regular
    expressions rather than a per-character loop: this runs on every page.
    """
    # str.count runs in C; other whitespace (NBSP, ...) is rare enough to count as text.
    n = len(raw) - sum(raw.count(c) for c in " \n\r\t\f\v")
    if n <= 0:
        return PageStats(0, 0, False)
    bad = len(_JUNK_RE.findall(raw)) + sum(len(m) for m in _CID_RE.findall(raw))
    garbled = n >= 20 and bad / n > GARBLED_PAGE_THRESHOLD
    # The costlier measures run only when the cheap count leaves room for them to fire.
    latin1_letters = len(_LATIN1_LETTER_RE.findall(raw))
    if not garbled and n >= 20 and latin1_letters > 0.15 * 20:
        garbled = latin1_letters / max(1, len(_LETTER_RE.findall(raw))) > 0.15
    if not garbled and n >= 200:
        singles = len(_SINGLE_LETTER_RE.findall(raw))
        if singles >= 180:
            n_words = len(_ASCII_WORD_RE.findall(raw))
            ascii_letters = len(_ASCII_LETTER_RE.findall(raw))
            n_letters = len(_LETTER_RE.findall(raw))
            garbled = ascii_letters > 0.9 * n_letters and n_words >= 200 and singles / n_words > 0.9
    if garbled:
        bad = n
    return PageStats(n, min(bad, n), garbled)


def clean_text(raw: str) -> str:
    """Normalise one page of extracted text: newlines, ligatures, soft hyphens, junk characters."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    # pdfium marks a soft hyphen at a line end with U+FFFE (sometimes U+0002) and keeps the break.
    text = re.sub("[\ufffe\x02][ \t]*\n?", "", text)
    text = _LIGATURE_RE.sub(lambda m: LIGATURES[m.group(0)], text)
    text = _PRESENTATION_RE.sub(lambda m: unicodedata.normalize("NFKC", m.group(0)), text)
    text = _CID_RE.sub("", text)
    text = text.replace("\f", "\n")
    return _DROP_RE.sub("", text)


def dehyphenate(pages: list[str]) -> list[str]:
    """Join words broken at a line end ("exam-\\nple" -> "example") and keep real hyphens.

    The document's own vocabulary decides: when the hyphenated form ("well-known") occurs
    elsewhere in the document and the joined form does not, the hyphen is real and only the
    line break goes; otherwise the word was split by typesetting and is joined.
    """
    # A literal-led search finds the few pages with a hyphen at a line end; the word-capturing
    # pattern is only run on those.
    if not any(_LINE_END_HYPHEN_RE.search(p) for p in pages):
        return pages
    vocab: set[str] = set()
    for page in pages:
        vocab.update(_WORD_RE.findall(page.lower()))

    def join(m: re.Match) -> str:
        left, right = m.group(1), m.group(2)
        joined = (left + right).lower()
        hyphenated = f"{left}-{right}".lower()
        if hyphenated in vocab and joined not in vocab:
            return f"{left}-{right}"
        return left + right

    return [_HYPHEN_BREAK_RE.sub(join, p) if _LINE_END_HYPHEN_RE.search(p) else p for p in pages]


@dataclass
class ParseResult:
    """The outcome of parsing one file: a document's pages and scores, or a quarantine reason."""

    reason: str | None = None
    message: str = ""
    pages: list[str] = field(default_factory=list)
    page_count: int = 0
    ocr_pages: int = 0
    empty_pages: int = 0
    garbled_ratio: float = 0.0
    quality: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def text(self) -> str:
        return PAGE_SEPARATOR.join(self.pages)

    @property
    def page_offsets(self) -> list[int]:
        offsets, pos = [], 0
        for page in self.pages:
            offsets.append(pos)
            pos += len(page) + len(PAGE_SEPARATOR)
        return offsets


def fail(reason: str, message: str) -> ParseResult:
    assert reason in REASONS, reason
    return ParseResult(reason=reason, message=message)


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


def quality_score(page_chars: list[int], bad_chars: int, empty_pages: int, ocr_pages: int) -> float:
    """A 0..1 score: 1 = every page has clean extracted text.

    The clean-character share, scaled down by the share of empty pages (half weight: figures
    and blank pages are normal) and by the share of OCR pages (OCR is good, not exact).
    """
    n_pages = max(1, len(page_chars))
    total = sum(page_chars)
    clean = 1.0 - (bad_chars / total if total else 1.0)
    score = clean * (1.0 - 0.5 * empty_pages / n_pages) * (1.0 - 0.2 * ocr_pages / n_pages)
    return round(max(0.0, min(1.0, score)), 4)


def _has_images(page: Any) -> bool:
    import pypdfium2.raw as pdfium_c

    for _obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=3):
        return True
    return False


def _ocr_page(page: Any, dpi: int) -> str:
    import pytesseract

    # pytesseract passes this process's environment to `tesseract`; with OpenMP's default
    # thread count it fights the other worker for the cores and runs several times slower.
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    image = page.render(scale=dpi / 72, grayscale=True).to_pil()
    return pytesseract.image_to_string(image, lang="eng")


def parse_pdf(
    path: str | os.PathLike,
    ocr: bool = True,
    ocr_dpi: int = OCR_DPI,
    progress: Callable[[int], None] | None = None,
) -> ParseResult:
    """Extract the text of one PDF in this process. Use `ParsePool` to parse untrusted files."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    from research_pipeline.lib import metadata as md

    started = time.monotonic()
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if not head:
        return fail("empty", f"{path.name} is 0 bytes; replace it with the real PDF")
    if b"%PDF-" not in head:
        kind = "HTML" if b"<html" in head.lower() else "PNG" if head.startswith(b"\x89PNG") else "not a PDF"
        return fail("not_pdf", f"{path.name} has no %PDF- header in its first 1024 bytes ({kind}); "
                    "convert it to PDF or remove it from the inbox")
    try:
        doc = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        data = path.read_bytes()
        if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD and b"/Encrypt" in data:
            return fail("encrypted", f"{path.name} needs a password (the empty one was tried); "
                        "save an unprotected copy into the inbox")
        if re.search(rb"/Count\s+0\b", data) and not re.search(rb"/Count\s+[1-9]", data):
            return fail("empty", f"{path.name} has zero pages")
        return fail("corrupt", f"{path.name} cannot be opened by pdfium ({exc}); "
                    "re-export or repair it (e.g. `qpdf in.pdf out.pdf`)")
    try:
        n_pages = len(doc)
        if n_pages == 0:
            return fail("empty", f"{path.name} has zero pages")
        can_ocr = ocr and tesseract_available()
        pages: list[str] = []
        page_chars: list[int] = []
        bad_chars = 0
        empty_pages = ocr_pages = 0
        image_only_pages = 0
        for i in range(n_pages):
            if progress:
                progress(i)
            page = doc[i]
            try:
                textpage = page.get_textpage()
                raw = textpage.get_text_range()
                textpage.close()
                stats = page_stats(raw)
                text = clean_text(raw)
                if not text.strip() and _has_images(page):
                    image_only_pages += 1
                    if can_ocr:
                        text = clean_text(_ocr_page(page, ocr_dpi))
                        stats = page_stats(text)
                        if text.strip():
                            ocr_pages += 1
            finally:
                page.close()
            if not text.strip():
                empty_pages += 1
                text = ""
            pages.append(text)
            page_chars.append(stats.chars)
            bad_chars += stats.bad
        total_chars = sum(page_chars)
        if total_chars == 0:
            if image_only_pages and not can_ocr:
                return fail("needs_ocr", f"{path.name}: {image_only_pages} of {n_pages} pages are images "
                            "without a text layer; install tesseract (apt-get install tesseract-ocr) and re-run")
            return fail("empty", f"{path.name}: no text on any of its {n_pages} pages")
        garbled_ratio = bad_chars / total_chars
        if garbled_ratio > GARBLED_DOC_THRESHOLD:
            return fail("garbled", f"{path.name}: {garbled_ratio:.0%} of the extracted characters are junk "
                        "(fonts without a Unicode map); re-export with embedded ToUnicode maps or OCR it")
        pages = dehyphenate(pages)
        meta = md.pdf_metadata(doc, pages, path.name)
        return ParseResult(
            pages=pages,
            page_count=n_pages,
            ocr_pages=ocr_pages,
            empty_pages=empty_pages,
            garbled_ratio=round(garbled_ratio, 4),
            quality=quality_score(page_chars, bad_chars, empty_pages, ocr_pages),
            metadata=meta,
            seconds=time.monotonic() - started,
        )
    finally:
        doc.close()


# ---------------------------------------------------------------------------------------------
# Worker processes


def _worker_main(read_fd: int, write_fd: int, memory_mb: int, ocr: bool, ocr_dpi: int) -> None:
    """Serve parse jobs from the parent: receive (job_id, path), send progress and the result."""
    try:
        import ctypes

        # Die with the parent (PR_SET_PDEATHSIG = 1), so a SIGKILLed ingest leaves no worker.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Tesseract's OpenMP threads fight the other worker for the same cores and run 6x slower.
    os.environ["OMP_THREAD_LIMIT"] = "1"
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    while True:
        try:
            job = inbox.recv()
        except EOFError:
            return
        if job is None:
            return
        job_id, path = job
        try:
            result = parse_pdf(path, ocr=ocr, ocr_dpi=ocr_dpi, progress=lambda i: outbox.send(("page", job_id, i)))
        except MemoryError:
            result = fail("memory", f"{Path(path).name} needs more than {memory_mb} MiB to parse")
        except Exception as exc:  # noqa: BLE001 - any parser failure is a corrupt file, not a crash
            result = fail("corrupt", f"{Path(path).name}: {type(exc).__name__}: {exc}")
        outbox.send(("done", job_id, result))


class _Worker:
    """One worker process in its own process group, with its pipes and current job."""

    def __init__(self, memory_mb: int, ocr: bool, ocr_dpi: int):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from research_pipeline.lib.pdf import _worker_main; "
             "_worker_main(*map(int, sys.argv[1:3]), int(sys.argv[3]), sys.argv[4] == '1', int(sys.argv[5]))",
             str(to_child_r), str(from_child_w), str(memory_mb), "1" if ocr else "0", str(ocr_dpi)],
            pass_fds=(to_child_r, from_child_w),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=os.getcwd(),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        self.job: Any = None
        self.path: str | None = None
        self.started = 0.0
        self.last_progress = 0.0
        self.page = -1

    def start(self, job_key: Any, path: str) -> None:
        self.job, self.path, self.page = job_key, path, -1
        self.started = self.last_progress = time.monotonic()
        self.send_conn.send((id(job_key), path))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.close_pipes()

    def close_pipes(self) -> None:
        for conn in (self.send_conn, self.recv_conn):
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        """Ask the worker to exit, then make sure its whole process group is gone."""
        try:
            self.send_conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _death_result(worker: _Worker, memory_mb: int) -> ParseResult:
    rc = worker.proc.wait()
    name = Path(worker.path or "").name
    where = f"page {worker.page + 1}" if worker.page >= 0 else "opening"
    # pdfium aborts (SIGABRT) when an allocation fails under RLIMIT_AS, and the kernel's OOM
    # killer sends SIGKILL; a segfault is a parser crash on broken input.
    if rc in (-signal.SIGABRT, -signal.SIGKILL):
        return fail("memory", f"{name}: the parser ran out of its {memory_mb} MiB at {where}; "
                    "raise memory_mb if the file is genuine")
    return fail("corrupt", f"{name}: the parser crashed at {where} (exit {rc}); re-export or repair the file")


class ParsePool:
    """A bounded pool of parse workers that enforces per-file timeouts and memory limits.

    `timeout_s` bounds the time a worker may go without finishing a page (text extraction or
    OCR of one page); `file_timeout_s` (default 10x) bounds a whole file. Use as a context
    manager: leaving it stops every worker and its process group.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 60,
        memory_mb: int = 2048,
        ocr: bool = True,
        ocr_dpi: int = OCR_DPI,
        file_timeout_s: float | None = None,
    ):
        self.n_workers = max(1, int(workers))
        self.timeout_s = timeout_s
        self.file_timeout_s = file_timeout_s or timeout_s * 10
        self.memory_mb = memory_mb
        self.ocr = ocr
        self.ocr_dpi = ocr_dpi
        self._workers: list[_Worker] = []

    def __enter__(self) -> ParsePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _new_worker(self) -> _Worker:
        w = _Worker(self.memory_mb, self.ocr, self.ocr_dpi)
        self._workers.append(w)
        return w

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)

    def imap_unordered(self, jobs: Iterable[tuple[Any, str]]) -> Iterator[tuple[Any, ParseResult]]:
        """Parse (key, path) jobs, yielding (key, result) as each file finishes.

        Jobs are pulled lazily, so at most `workers` files are in flight and the caller can
        commit each result before the next is produced.
        """
        pending = iter(jobs)
        exhausted = False
        idle: list[_Worker] = [w for w in self._workers if w.job is None]
        busy: list[_Worker] = [w for w in self._workers if w.job is not None]
        while True:
            while not exhausted and len(busy) < self.n_workers:
                try:
                    key, path = next(pending)
                except StopIteration:
                    exhausted = True
                    break
                w = idle.pop() if idle else self._new_worker()
                w.start(key, str(path))
                busy.append(w)
            if not busy:
                return
            now = time.monotonic()
            deadline = min(
                min(w.last_progress + self.timeout_s, w.started + self.file_timeout_s) for w in busy
            )
            ready = wait([w.recv_conn for w in busy], timeout=max(0.0, deadline - now))
            finished: list[tuple[_Worker, ParseResult, bool]] = []
            for w in busy:
                if w.recv_conn not in ready:
                    continue
                try:
                    while w.recv_conn.poll():
                        kind, _job_id, payload = w.recv_conn.recv()
                        if kind == "page":
                            w.page = payload
                            w.last_progress = time.monotonic()
                        else:
                            finished.append((w, payload, True))
                            break
                except (EOFError, OSError, pickle.UnpicklingError):
                    finished.append((w, _death_result(w, self.memory_mb), False))
            now = time.monotonic()
            done_workers = {id(w) for w, _, _ in finished}
            for w in busy:
                if id(w) in done_workers:
                    continue
                if now >= w.last_progress + self.timeout_s or now >= w.started + self.file_timeout_s:
                    where = f"page {w.page + 1}" if w.page >= 0 else "opening"
                    limit = self.timeout_s if now >= w.last_progress + self.timeout_s else self.file_timeout_s
                    finished.append((w, fail("timeout", f"{Path(w.path or '').name}: no progress within "
                                             f"{limit:.0f} s at {where}; the worker was killed. Raise "
                                             "timeout_s if the file is genuine"), False))
            for w, result, alive in finished:
                key = w.job
                busy.remove(w)
                if alive:
                    w.job = None
                    idle.append(w)
                else:
                    self._replace(w)
                yield key, result
