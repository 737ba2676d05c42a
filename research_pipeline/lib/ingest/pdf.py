"""PDF text extraction in this process: pypdfium2 per page, OCR of image-only pages, quality scoring.

`parse_pdf` reads one file and ends as a `ParseResult` whose `reason` is None for a document,
or one of `REASONS` for a quarantined file. It trusts the file not to hang or exhaust memory:
untrusted files are parsed through `sandbox.ParsePool`, which runs it in killable child
processes. Page text is cleaned by `cleanup`.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from research_pipeline.lib.ingest.cleanup import (
    clean_text,
    dehyphenate,
    page_stats,
    read_page,
)

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
    "broken_link",  # a symlink to nothing
    "link_loop",  # a symlink that leads back to itself
    "unreadable",  # cannot be opened or listed, or not a regular file (a FIFO, a device)
)

PARSER = "pypdfium2"
# PARSER_VERSION, the installed pypdfium2's version, is read on first use (`__getattr__` below):
# importing importlib.metadata would cost every worker process ~20 ms at start for nothing.
#: Separator between pages in documents.text.
PAGE_SEPARATOR = "\n\f\n"
#: A document whose garbled characters exceed this share of all its characters is quarantined.
GARBLED_DOC_THRESHOLD = 0.5
OCR_DPI = 200
#: Files up to this size are read into memory for pdfium (faster); larger ones it reads itself.
IN_MEMORY_MAX_BYTES = 64 * 1024 * 1024


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

    # Imported only when a page needs OCR: the configuration module is costly to load in a worker.
    from research_pipeline.config import set_process_default

    # pytesseract passes this process's environment to `tesseract`; with OpenMP's default
    # thread count it fights the other worker for the cores and runs several times slower.
    set_process_default("OMP_THREAD_LIMIT", "1")
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
    from research_pipeline.lib.ingest import page_lines

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
        first_lines: page_lines.PageLines | list[page_lines.PageLine] = []
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
                        first_lines = page_lines.first_page_lines(textpage)
                    except Exception:  # noqa: BLE001 - font data is a heuristic; fall back to text
                        first_lines = []
                textpage.close()
                stats, text = read_page(raw)
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
