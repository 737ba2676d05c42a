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

import math
import mmap
import os
import pickle
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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
# PARSER_VERSION, the installed pypdfium2's version, is read on first use (`__getattr__` below):
# importing importlib.metadata would cost every worker process ~20 ms at start for nothing.
#: Separator between pages in documents.text.
PAGE_SEPARATOR = "\n\f\n"
#: A document whose garbled characters exceed this share of all its characters is quarantined.
GARBLED_DOC_THRESHOLD = 0.5
#: A page is garbled when this share of its non-space characters is junk (see `page_stats`).
GARBLED_PAGE_THRESHOLD = 0.12
OCR_DPI = 200
#: Files up to this size are read into memory for pdfium (faster); larger ones it reads itself.
IN_MEMORY_MAX_BYTES = 64 * 1024 * 1024

LIGATURES = {
    "\ufb00": "ff",
    "\ufb01": "fi",
    "\ufb02": "fl",
    "\ufb03": "ffi",
    "\ufb04": "ffl",
    "\ufb05": "st",
    "\ufb06": "st",
}
# Characters dropped from extracted text: C0/C1 controls except tab/newline, pdfium's soft
# hyphen marker (U+FFFE), U+FFFF, the replacement character and the private-use area. They
# carry no meaning for search, and PostgreSQL text cannot hold NUL.
_DROP_CLASS = "\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd\ufffe\uffff\ue000-\uf8ff"
_CID_RE = re.compile(r"\(cid:\d+\)")
# A word broken at a line end. It starts where a word starts, and its first part never gives
# back letters (a hyphen must follow the whole run): the same matches as `(\w+)-...`, without
# retrying the pattern at every letter of every word.
_HYPHEN_BREAK_RE = re.compile(r"(?<!\w)(\w++)-[ \t]*\n[ \t]*([a-z]\w*)")
_WORD_RE = re.compile(r"\w+(?:-\w+)*")
_LINE_END_HYPHEN_RE = re.compile(r"-[ \t]*\n[ \t]*[a-z]")

# One pass drops the soft-hyphen markers with the break after them, and every other dropped
# character except the form feed (which becomes a newline): a character class with a tail
# that only a soft-hyphen marker can take scans as fast as the bare class.
_SOFT_HYPHEN_AND_DROP_RE = re.compile(
    "[" + _DROP_CLASS.replace("\x0b-\x1f", "\x0b\x0d-\x1f") + "](?:(?<=[\ufffe\x02])[ \t]*\n?)?"
)
# The ligatures, and NFKC of the rest of the Alphabetic Presentation Forms block (U+FB00-FB4F).
# NFKC is applied only to this block: elsewhere it would rewrite math (x² -> x2) and CJK
# punctuation, which changes meaning.
_PRESENTATION_FORMS = {
    chr(c): LIGATURES.get(chr(c)) or unicodedata.normalize("NFKC", chr(c)) for c in range(0xFB00, 0xFB50)
}
_PRESENTATION_RE = re.compile("[\ufb00-\ufb4f]")


@dataclass
class PageStats:
    """Junk measurements of one page's raw text."""

    chars: int  # non-space characters
    bad: int  # junk characters among them
    garbled: bool


# Junk characters: replacement/non-characters, private use, C0/C1 controls, and the Latin-1
# symbols (not letters) that Type 3 fonts without a ToUnicode map decode to.
_JUNK_CLASS = "\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\xa1-\xa9\xab-\xb4\xb6-\xb9\xbb-\xbf\xd7\xf7\ufffd-\uffff\ue000-\uf8ff"
_LATIN1_LETTER_CLASS = "\xc0-\xd6\xd8-\xf6\xf8-\xff"
# What `clean_text` drops or rewrites that is not junk, but for \r and \f (newlines, found with
# `in`): \v, \x1c-\x1f, NEL and the presentation forms.
_CLEANED_NOT_JUNK_CLASS = "\x0b\x1c-\x1f\x85\ufb00-\ufb4f"
# One scan of a page finds every character that `page_stats` counts or `clean_text` changes
# (`(cid:N)` glyphs, rare, are looked for apart). No two kinds share a character, so what the
# page holds of each is read from the few matches. A bare character class scans over twice
# as fast as one in an alternation.
_PAGE_SCAN_RE = re.compile("[" + _JUNK_CLASS + _LATIN1_LETTER_CLASS + _CLEANED_NOT_JUNK_CLASS + "]")
_NOT_JUNK_RE = re.compile("[" + _LATIN1_LETTER_CLASS + _CLEANED_NOT_JUNK_CLASS + "]")
_LATIN1_LETTER_RE = re.compile("[" + _LATIN1_LETTER_CLASS + "]")
# Dropped characters other than \r and \f (which become newlines).
_DROPPED_RE = re.compile("[" + _DROP_CLASS.replace("\x0b-\x1f", "\x0b\x0e-\x1f") + "]")
_LETTER_RE = re.compile(r"[^\W\d_]")
_SPACE_BYTES = b" \n\r\t\f\v"
# bytes.translate table: ASCII letters -> 1, every other byte -> 0.
_ASCII_LETTER_BYTES = bytes(1 if chr(i).isascii() and chr(i).isalpha() else 0 for i in range(256))


def page_stats(raw: str) -> PageStats:
    """Measure how much of a page's raw extracted text is junk.

    Junk: replacement/private-use/control characters, unmapped `(cid:N)` glyphs, and Latin-1
    symbols outside letters (the signature of Type 3 fonts without a ToUnicode map). A page
    is also garbled when Latin text arrives as single letters separated by spaces, which is
    what a substitution-cipher font map produces. Calibrated on shared/data/papers (see
    docs/PARSING.md): clean pages stay below 0.10, garbled ones are above 0.14.
    """
    return _scan_page(raw)[0]


def _scan_page(raw: str) -> tuple[PageStats, str | None]:
    """`page_stats`, and the characters of `_PAGE_SCAN_RE` the page holds (None: no text).

    This runs on every page, so it avoids per-character Python: one regular-expression scan,
    and the ASCII measures (spaces, single letters) on an ASCII copy, with `bytes.translate`
    and integer bit operations.
    """
    # One byte per character, every non-ASCII character as "?" (neither a space nor a letter).
    ascii_bytes = raw.encode("ascii", "replace")
    n = len(ascii_bytes.translate(None, _SPACE_BYTES))  # other whitespace (NBSP, ...) counts as text
    if n <= 0:
        return PageStats(0, 0, False), None
    chars = "".join(_PAGE_SCAN_RE.findall(raw))
    # Every character of a (cid:N) is junk; none of them is one of `chars`.
    bad = sum(len(m) for m in _CID_RE.findall(raw)) if "(cid:" in raw else 0
    latin1_letters = 0
    if chars:
        latin1_letters = len(_LATIN1_LETTER_RE.findall(chars))
        bad += len(chars) - len(_NOT_JUNK_RE.findall(chars))
    garbled = n >= 20 and bad / n > GARBLED_PAGE_THRESHOLD
    # The costlier measures run only when the cheap count leaves room for them to fire.
    if not garbled and n >= 20 and latin1_letters > 0.15 * 20:
        garbled = latin1_letters / max(1, len(_LETTER_RE.findall(raw))) > 0.15
    if not garbled and n >= 200:
        # Single letters: ASCII letters between two non-letters. As an integer with one byte
        # per character (1: a letter), they are the bytes that neither neighbour shares.
        letters = int.from_bytes(ascii_bytes.translate(_ASCII_LETTER_BYTES), "big")
        singles = (letters & ~(letters << 8) & ~(letters >> 8)).bit_count()
        if singles >= 180:
            n_words = (letters & ~(letters >> 8)).bit_count()  # letters after a non-letter
            ascii_letters = letters.bit_count()
            n_letters = len(_LETTER_RE.findall(raw))
            garbled = ascii_letters > 0.9 * n_letters and n_words >= 200 and singles / n_words > 0.9
    if garbled:
        bad = n
    return PageStats(n, min(bad, n), garbled), chars


def clean_text(raw: str) -> str:
    """Normalise one page of extracted text: newlines, ligatures, soft hyphens, junk characters."""
    return _clean(raw, None)


def _read_page(raw: str) -> tuple[PageStats, str]:
    """`page_stats(raw)` and `clean_text(raw)`, skipping the passes that the scan shows to change nothing."""
    stats, found = _scan_page(raw)
    return stats, _clean(raw, found)


def _clean(raw: str, found: str | None) -> str:
    """`clean_text`; `found`, the page's characters of `_PAGE_SCAN_RE` (None: unknown), lets it
    skip the passes that cannot change anything."""
    text = _newlines(raw)
    # pdfium marks a soft hyphen at a line end with U+FFFE (sometimes U+0002) and keeps the break.
    if found is None or _DROPPED_RE.search(found):
        text = _SOFT_HYPHEN_AND_DROP_RE.sub("", text)
    if "(cid:" in text:
        # Rare: `(cid:N)` is removed before the other junk, so a glyph that only junk split
        # apart stays. The step-by-step order decides it.
        return _clean_text_stepwise(raw)
    if found is None or _PRESENTATION_RE.search(found):
        text = _PRESENTATION_RE.sub(_presentation_form, text)
    return text.replace("\f", "\n") if "\f" in text else text


def _newlines(raw: str) -> str:
    """CRLF and CR as LF; pdfium ends lines with CRLF, so the second pass is rarely needed."""
    if "\r" not in raw:
        return raw
    text = raw.replace("\r\n", "\n")
    return text.replace("\r", "\n") if "\r" in text else text


def _presentation_form(m: re.Match) -> str:
    return _PRESENTATION_FORMS[m.group(0)]


_SOFT_HYPHEN_RE = re.compile("[\ufffe\x02][ \t]*\n?")
_DROP_RE = re.compile("[" + _DROP_CLASS + "]")


def _clean_text_stepwise(raw: str) -> str:
    """`clean_text` one step at a time, in the order that defines it."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    text = _SOFT_HYPHEN_RE.sub("", text)
    text = _PRESENTATION_RE.sub(_presentation_form, text)
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
    broken = [bool(_LINE_END_HYPHEN_RE.search(p)) for p in pages]
    if not any(broken):
        return pages
    # The vocabulary is the document's words (`_WORD_RE` on the lower-cased pages). Only its
    # hyphenated words are collected; whether a joined form is a word is searched for, and
    # only when its hyphenated form is one (rare), instead of collecting every word.
    text = "\n".join(pages)
    hyphenated_words = _hyphenated_words(text)
    lowered: list[str] = []  # the lower-cased pages, when a search needs them
    is_word: dict[str, bool] = {}

    def join(m: re.Match) -> str:
        left, right = m.group(1), m.group(2)
        hyphenated = f"{left}-{right}".lower()
        if hyphenated in hyphenated_words:
            joined = (left + right).lower()
            if joined not in is_word:
                if not lowered:
                    lowered.append("\n".join(p.lower() for p in pages))
                is_word[joined] = _is_word_of(joined, lowered[0])
            if not is_word[joined]:
                return f"{left}-{right}"
        return left + right

    return [_HYPHEN_BREAK_RE.sub(join, p) if b else p for p, b in zip(pages, broken)]


_HYPHEN_TO_SPACE_RE = re.compile(r"-\S*")


def _hyphenated_words(text: str) -> set[str]:
    """The words of `_WORD_RE.findall(text.lower())` that contain a hyphen, without finding
    (or lower-casing) every word.

    Words never span whitespace, so they come from the whitespace-delimited chunks that hold
    a hyphen. A literal-led scan finds each such chunk from its first hyphen to its end, and
    the same scan over the reversed text finds it from its last hyphen back to its start;
    the two lists pair up in reverse order (one match per chunk in each). Lower-casing keeps
    whitespace and hyphens where they are, and its context (a final sigma) ends at
    whitespace, so the chunks can be lower-cased alone.
    """
    tails = _HYPHEN_TO_SPACE_RE.findall(text)
    if not tails:
        return set()
    heads = _HYPHEN_TO_SPACE_RE.findall(text[::-1])
    chunks = []
    for tail, head in zip(tails, reversed(heads)):
        head = head[::-1]
        chunks.append(head[: head.find("-")] + tail)
    return {w for w in _WORD_RE.findall(" ".join(chunks).lower()) if "-" in w}


def _is_word_of(word: str, text: str) -> bool:
    """Whether `_WORD_RE.findall(text)` has `word` (no hyphen): an occurrence that no letter
    or "letter-" precedes and that no letter or "-letter" follows."""
    if not _LETTERS_RE.fullmatch(word):
        return False
    letter = _LETTER_OR_DIGIT_RE.match
    i = text.find(word)
    while i >= 0:
        j = i + len(word)
        if (not (i and (letter(text, i - 1) or (text[i - 1] == "-" and i > 1 and letter(text, i - 2))))
                and not (letter(text, j) or (text[j: j + 1] == "-" and letter(text, j + 1)))):
            return True
        i = text.find(word, i + 1)
    return False


_LETTERS_RE = re.compile(r"\w+")
_LETTER_OR_DIGIT_RE = re.compile(r"\w")  # what `\w` matches, one character


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

    from research_pipeline.lib.ingest import metadata as md

    started = time.monotonic()
    path = Path(path)
    data: bytes | None = None
    with open(path, "rb") as fh:
        head = fh.read(1024)
        if b"%PDF-" in head and os.fstat(fh.fileno()).st_size <= IN_MEMORY_MAX_BYTES:
            # pdfium parses a file in memory a little faster than through its own file reads.
            fh.seek(0)
            data = fh.read()
    if not head:
        return fail("empty", f"{path.name} is 0 bytes; replace it with the real PDF")
    if b"%PDF-" not in head:
        kind = "HTML" if b"<html" in head.lower() else "PNG" if head.startswith(b"\x89PNG") else "not a PDF"
        return fail("not_pdf", f"{path.name} has no %PDF- header in its first 1024 bytes ({kind}); "
                    "convert it to PDF or remove it from the inbox")
    try:
        doc = pdfium.PdfDocument(data if data is not None else str(path))
    except pdfium.PdfiumError as exc:
        if data is None:
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
        first_lines: list[tuple[float, float, str]] = []
        for i in range(n_pages):
            if progress:
                progress(i)
            page = doc[i]
            try:
                textpage = page.get_textpage()
                raw = textpage.get_text_range()
                if i == 0:
                    # The title's font sizes, read while page 1 is loaded (loading it costs more).
                    try:
                        first_lines = md.first_page_lines(textpage)
                    except Exception:  # noqa: BLE001 - font data is a heuristic; fall back to text
                        first_lines = []
                textpage.close()
                stats, text = _read_page(raw)
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
        meta = md.pdf_metadata(doc, pages, path.name, first_lines)
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


def __getattr__(name: str) -> Any:
    if name == "PARSER_VERSION":
        from importlib import metadata

        version = globals()["PARSER_VERSION"] = metadata.version("pypdfium2")
        return version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Worker processes


def _worker_main(read_fd: int, write_fd: int, memory_mb: int, ocr: bool, ocr_dpi: int,
                 progress_fd: int = -1) -> None:
    """Serve parse jobs from the parent: receive (job_id, path), report progress, send the result."""
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
    record = _ProgressRecord(progress_fd) if progress_fd >= 0 else None
    while True:
        try:
            job = inbox.recv()
        except EOFError:
            job = None
        if job is None:
            # Nothing is buffered (every send is a write) and nothing needs tearing down: exit
            # now rather than after the interpreter's shutdown, which the parent would wait for.
            os._exit(0)
        job_id, path = job
        try:
            result = parse_pdf(path, ocr=ocr, ocr_dpi=ocr_dpi, progress=record.write if record else None)
        except MemoryError:
            result = fail("memory", f"{Path(path).name} needs more than {memory_mb} MiB to parse")
        except Exception as exc:  # noqa: BLE001 - any parser failure is a corrupt file, not a crash
            result = fail("corrupt", f"{Path(path).name}: {type(exc).__name__}: {exc}")
        outbox.send(("done", job_id, result))


class _ProgressRecord:
    """The page a worker is on and when it started it, in memory shared with the parent.

    The worker writes it at every page; the parent reads it only when a deadline comes up, so
    a page costs neither side a message. A sequence number (odd while a write is under way)
    keeps the parent from reading half of a write.
    """

    SIZE = 24  # sequence, page, time.monotonic_ns() of the page's start: three int64

    def __init__(self, fd: int):
        self._map = mmap.mmap(fd, self.SIZE)
        self._slots = memoryview(self._map).cast("q")

    @classmethod
    def create(cls) -> tuple[int, _ProgressRecord]:
        """A new record and the file descriptor that shares it with a child process."""
        try:
            fd = os.memfd_create("rp-parse-progress")
        except (AttributeError, OSError):  # not Linux: an unlinked temporary file
            import tempfile

            with tempfile.TemporaryFile() as fh:
                fd = os.dup(fh.fileno())
        os.ftruncate(fd, cls.SIZE)
        return fd, cls(fd)

    def write(self, page: int) -> None:
        slots = self._slots
        slots[0] += 1
        slots[1] = page
        slots[2] = time.monotonic_ns()
        slots[0] += 1

    def read(self) -> tuple[int, float] | None:
        """(page, time.monotonic() at its start) of the latest write, or None before any."""
        slots = self._slots
        for _ in range(1000):
            seq = slots[0]
            if seq & 1:
                continue
            page, started_ns = slots[1], slots[2]
            if slots[0] == seq:
                return (page, started_ns / 1e9) if seq else None
        return None  # the worker stopped in the middle of a write

    def close(self) -> None:
        self._slots.release()
        self._map.close()


class _Worker:
    """One worker process in its own process group, with its pipes and current job."""

    def __init__(self, memory_mb: int, ocr: bool, ocr_dpi: int):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        progress_fd, self.progress = _ProgressRecord.create()
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from research_pipeline.lib.ingest.pdf import _worker_main; "
             "_worker_main(*map(int, sys.argv[1:3]), int(sys.argv[3]), sys.argv[4] == '1', int(sys.argv[5]), "
             "int(sys.argv[6]))",
             str(to_child_r), str(from_child_w), str(memory_mb), "1" if ocr else "0", str(ocr_dpi),
             str(progress_fd)],
            pass_fds=(to_child_r, from_child_w, progress_fd),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=os.getcwd(),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        os.close(to_child_r)
        os.close(from_child_w)
        os.close(progress_fd)
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

    def read_progress(self) -> None:
        """Update `page` and `last_progress` from what the worker has written for this job."""
        latest = self.progress.read()
        if latest is not None and latest[1] >= self.started:  # not a write of its previous job
            self.page, self.last_progress = latest

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
        self.progress.close()

    def ask_to_stop(self) -> None:
        try:
            self.send_conn.send(None)
        except (OSError, ValueError):
            pass

    def stop(self, deadline: float | None = None) -> None:
        """Ask the worker to exit (unless asked already, with `deadline` the time to wait
        until), then make sure its whole process group is gone."""
        if deadline is None:
            self.ask_to_stop()
            deadline = time.monotonic() + 2
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _death_result(worker: _Worker, memory_mb: int) -> ParseResult:
    rc = worker.proc.wait()
    worker.read_progress()
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
        # All workers are asked first, so that they exit at the same time.
        for w in self._workers:
            w.ask_to_stop()
        deadline = time.monotonic() + 2
        for w in self._workers:
            w.stop(deadline)
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

    def imap_unordered(
        self,
        jobs: Iterable[tuple[Any, str]],
        before_wait: Callable[[], float | None] | None = None,
    ) -> Iterator[tuple[Any, ParseResult]]:
        """Parse (key, path) jobs, yielding (key, result) as each file finishes.

        At most `workers` files are in flight, and one job more is pulled ahead: a worker that
        finishes starts its next file at once, while the caller commits the result and the
        next job is pulled (the caller's work per file then costs no worker time).
        `before_wait` is called each time the pool is about to wait for its workers and
        returns the most seconds it may wait before the next call (None: no limit), e.g.
        to commit the results held back for a batch.
        """
        pending = iter(jobs)
        exhausted = False
        ahead: list[tuple[Any, str]] = []
        idle: list[_Worker] = [w for w in self._workers if w.job is None]
        busy: list[_Worker] = [w for w in self._workers if w.job is not None]
        # A worker sends one message, its result; page progress is in its `_ProgressRecord`.
        poller = select.poll()
        for w in busy:
            poller.register(w.recv_conn.fileno(), select.POLLIN)

        def pull() -> bool:
            """Have the next job in hand; False when there is none left."""
            nonlocal exhausted
            if not ahead and not exhausted:
                try:
                    ahead.append(next(pending))
                except StopIteration:
                    exhausted = True
            return bool(ahead)

        def dispatch() -> None:
            while len(busy) < self.n_workers and pull():
                key, path = ahead.pop()
                w = idle.pop() if idle else self._new_worker()
                w.start(key, str(path))
                busy.append(w)
                poller.register(w.recv_conn.fileno(), select.POLLIN)

        while True:
            dispatch()
            pull()
            if not busy:
                return
            wait_limit = before_wait() if before_wait is not None else None
            now = time.monotonic()
            deadline = min(
                min(w.last_progress + self.timeout_s, w.started + self.file_timeout_s) for w in busy
            )
            wait_s = max(0.0, deadline - now if wait_limit is None else min(deadline - now, wait_limit))
            # Milliseconds, rounded up as multiprocessing's `wait` does; POLLHUP (a dead worker) too.
            ready = {fd for fd, _event in poller.poll(math.ceil(wait_s * 1000))}
            finished: list[tuple[_Worker, ParseResult, bool]] = []
            for w in busy:
                if w.recv_conn.fileno() not in ready:
                    continue
                try:
                    _kind, _job_id, result = w.recv_conn.recv()
                    finished.append((w, result, True))
                except (EOFError, OSError, pickle.UnpicklingError):
                    finished.append((w, _death_result(w, self.memory_mb), False))
            now = time.monotonic()
            done_workers = {id(w) for w, _, _ in finished}
            for w in busy:
                if id(w) in done_workers:
                    continue
                w.read_progress()
                if now >= w.last_progress + self.timeout_s or now >= w.started + self.file_timeout_s:
                    where = f"page {w.page + 1}" if w.page >= 0 else "opening"
                    limit = self.timeout_s if now >= w.last_progress + self.timeout_s else self.file_timeout_s
                    finished.append((w, fail("timeout", f"{Path(w.path or '').name}: no progress within "
                                             f"{limit:.0f} s at {where}; the worker was killed. Raise "
                                             "timeout_s if the file is genuine"), False))
            results = []
            for w, result, alive in finished:
                results.append((w.job, result))
                busy.remove(w)
                poller.unregister(w.recv_conn.fileno())
                if alive:
                    w.job = None
                    idle.append(w)
                else:
                    self._replace(w)
            dispatch()
            yield from results
