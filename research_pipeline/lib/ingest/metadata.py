"""Bibliographic metadata of a paper: title, authors, year, abstract, DOI, arXiv id, language.

Sources, best first: the PDF info dict when it is plausible, the largest-font lines of the
first page (pdfium character font sizes), and patterns in the first page's text. Plain
Python over an open pypdfium2 document; no Dagster.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

# "10." that no letter or digit precedes (a word boundary), written literal first so that the
# search skips ahead to each "10." instead of trying the pattern at every character.
DOI_RE = re.compile(r"(10\.(?<!\w10\.)\d{4,9}/[^\s\"<>]+)", re.IGNORECASE)
ARXIV_RE = re.compile(
    r"arXiv:\s*(\d{4}\.\d{4,5}|[a-z\-]+(?:\.[A-Z]{2})?/\d{7})(v\d+)?", re.IGNORECASE
)
YEAR_RE = re.compile(r"(?<!\d)(19[0-9]{2}|20[0-4][0-9])(?!\d)")
_DATED_RE = re.compile(
    r"(?:published|accepted|received|copyright|©|\(c\)|proceedings|journal|vol\.?|volume|draft"
    r"|jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:tember)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b"
    r"[^\n]{0,60}?(?<!\d)(19[0-9]{2}|20[0-4][0-9])(?!\d)",
    re.IGNORECASE,
)
_JUNK_TITLES = re.compile(
    r"^(untitled|title|microsoft word|doi|paper|document|slide|\s*$)|\.(docx?|tex|dvi|pdf|ps|indd)\b|^[\w\-]+$",
    re.IGNORECASE,
)
_ABSTRACT_RE = re.compile(r"(?im)^\s*(abstract|summary|a b s t r a c t|摘\s*要)\s*[:.\-—]?\s*")
_HEADING_STOP_RE = re.compile(
    r"(?im)^\s*(?:\d+\.?\s+|[IVX]+\.\s+)?(introduction|keywords|key words|index terms|categories and subject"
    r"|general terms|1\s+introduction|关键词|关键字)\b"
)


_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd\ufffe\uffff\ue000-\uf8ff]")


def clean_str(value: Any) -> str:
    """A metadata string without control/private-use characters (PostgreSQL text cannot hold NUL)."""
    return " ".join(_CONTROL_RE.sub(" ", str(value)).split())


def normalize_title(title: str | None) -> str:
    """A comparison key for titles: NFKC, casefolded, letters and digits only, single spaces."""
    if not title:
        return ""
    t = unicodedata.normalize("NFKC", title).casefold()
    t = re.sub(r"[^\w]+", " ", t)
    return " ".join(t.split())


_LETTER_RE = re.compile(r"[^\W\d_]")
_KANA_RE = re.compile("[\u3040-\u30ff]")
_HANGUL_RE = re.compile("[\uac00-\ud7af]")
_HAN_RE = re.compile("[\u4e00-\u9fff]")
_ASCII_WORD_RE = re.compile(r"[a-z]+")
_NON_SPACE_RE = re.compile(r"\S")
_ASCII_LETTER_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ASCII_RUN_RE = re.compile("[\x00-\x7f]+")
_ENGLISH_COMMON = frozenset(
    "the of and to in a is that for it as with be on by this are we which an or not from at".split()
)


def detect_language(text: str, more: str = "") -> str | None:
    """An ISO 639-1 guess: Unicode script for Chinese/Japanese/Korean, else langdetect (fixed seed).

    `more` is the text that follows `text` in the document; the English check reads it when
    `text` is too short to decide (a title page and a table of contents).
    """
    sample = text[:5000]
    # Letters: the ASCII ones counted on a byte copy, the rest (and the CJK scripts, none of
    # them ASCII) on the non-ASCII characters alone, which are few in most papers.
    ascii_bytes = sample.encode("ascii", "replace")
    ascii_letters = len(ascii_bytes) - len(ascii_bytes.translate(None, _ASCII_LETTER_BYTES))
    other = _ASCII_RUN_RE.sub("", sample)
    n_letters = ascii_letters + (len(_LETTER_RE.findall(other)) if other else 0)
    if n_letters < 20:
        return None
    if other:
        if len(_KANA_RE.findall(other)) / n_letters > 0.05:
            return "ja"
        if len(_HANGUL_RE.findall(other)) / n_letters > 0.2:
            return "ko"
        if len(_HAN_RE.findall(other)) / n_letters > 0.2:
            return "zh"
    words = _ASCII_WORD_RE.findall(sample[:3000].lower())
    if _reads_english(words):
        # Running English text is ~25% function words; other languages using Latin script
        # stay far below. This skips langdetect (the costliest step of a parse) for most papers.
        return "en"
    if more and len(words) < 50 and len(sample) < 3000:
        if _reads_english(_ASCII_WORD_RE.findall((text + more)[:3000].lower())):
            return "en"
    try:
        from langdetect import DetectorFactory, detect
        from langdetect.lang_detect_exception import LangDetectException

        # langdetect is random unless seeded; a fixed seed keeps re-ingests identical.
        DetectorFactory.seed = 0
        # 1,500 characters decide the language as well as 5,000 at a third of the cost.
        return detect(sample[:1500])
    except LangDetectException:
        return None


def _reads_english(words: list[str]) -> bool:
    return len(words) >= 50 and sum(1 for w in words if w in _ENGLISH_COMMON) / len(words) > 0.15


def _median(values: list[float]) -> float:
    # The median, not the max: a drop cap or a large superscript must not make a body line a title.
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def first_page_lines(textpage: Any) -> list[tuple[float, float, str]]:
    """(glyph height, top y, text) for each line of page 1, from pdfium's per-character boxes.

    `textpage` is page 1's open pypdfium2 text page: the parser passes the one it extracts the
    page's text from, so page 1 is loaded once. The loose character box height (font ascent
    to descent at the rendered size) is used instead of the nominal font size, which is 1.0
    for fonts scaled by the text matrix.
    """
    import ctypes

    import pypdfium2.raw as pdfium_c

    lines: list[tuple[float, float, str]] = []
    n = pdfium_c.FPDFText_CountChars(textpage)
    top = 0.0
    rect = pdfium_c.FS_RECTF()
    rect_ref = ctypes.byref(rect)
    # The title is near the top: the first 1,000 characters are enough. One call reads
    # them; per-character calls are the fallback when indexes do not line up (surrogates).
    limit = min(n, 1000)
    head = textpage.get_text_range(0, limit)
    if len(head) != limit:
        head = "".join(chr(pdfium_c.FPDFText_GetUnicode(textpage, i)) for i in range(limit))
    start = 0  # index of the line's first character in `head`
    for segment in head.split("\n"):
        text = segment.replace("\r", "") if "\r" in segment else segment
        if text:
            # Six glyphs per line give its size; boxing every glyph costs more than the parse.
            # A line without a box keeps the top of the line before it.
            sizes: list[float] = []
            for m in _NON_SPACE_RE.finditer(segment):
                if pdfium_c.FPDFText_GetLooseCharBox(textpage, start + m.start(), rect_ref):
                    if not sizes:
                        top = rect.top
                    sizes.append(round(abs(rect.top - rect.bottom), 1))
                    if len(sizes) == 6:
                        break
            lines.append((_median(sizes), top, text.strip()))
        start += len(segment) + 1
    return [line for line in lines if line[2]]


def _first_page_lines(doc: Any) -> list[tuple[float, float, str]]:
    """`first_page_lines` of an open document, loading its page 1 again."""
    page = doc[0]
    try:
        textpage = page.get_textpage()
        try:
            return first_page_lines(textpage)
        finally:
            textpage.close()
    finally:
        page.close()


def _plausible_title(t: str | None) -> bool:
    if not t:
        return False
    t = t.strip()
    letters = sum(1 for c in t if c.isalpha())
    return 8 <= len(t) <= 300 and letters >= 6 and " " in t and not _JUNK_TITLES.search(t)


def _title_from_fonts(lines: list[tuple[float, float, str]]) -> str | None:
    """The run of consecutive largest-font lines in the top part of page 1."""
    candidates = [
        ln for ln in lines[:40]
        if len(_LETTER_RE.findall(ln[2])) >= 3 and not re.match(r"(?i)(arxiv|doi|http|www\.)", ln[2])
    ]
    if not candidates:
        return None
    biggest = max(ln[0] for ln in candidates)
    if biggest <= 0:
        return None
    parts: list[str] = []
    for i, ln in enumerate(lines[:40]):
        if ln in candidates and abs(ln[0] - biggest) < 0.6:
            parts.append(ln[2])
            j = i + 1
            while j < len(lines) and abs(lines[j][0] - biggest) < 0.6 and len(parts) < 4:
                parts.append(lines[j][2])
                j += 1
            break
    title = " ".join(" ".join(parts).split())
    # Letter-spaced small caps ("R E S C I E N C E") are banners, not titles.
    if re.fullmatch(r"(?:\w )+\w", title):
        return None
    return title or None


def _title_from_text(first_page: str) -> str | None:
    for line in first_page.splitlines()[:15]:
        line = line.strip()
        if _plausible_title(line) and not re.match(r"(?i)(arxiv|doi|http|proceedings|journal|vol)", line):
            return line
    return None


def _years_and_their_lines(text: str) -> tuple[list[str], str]:
    """`YEAR_RE.findall(text)`, and the lines of `text` that hold those years, in order.

    `_DATED_RE` matches within one line and ends in a year, so it finds the same matches in
    those lines as in `text`, with far less to scan.
    """
    years: list[str] = []
    lines: list[str] = []
    line_start = -1
    for m in YEAR_RE.finditer(text):
        years.append(m.group(1))
        start = text.rfind("\n", 0, m.start()) + 1
        if start == line_start:
            continue
        end = text.find("\n", m.end())
        lines.append(text[start:] if end < 0 else text[start:end])
        line_start = start
    return years, "\n".join(lines)


def _year(first_page: str, info: dict[str, str], arxiv: str | None) -> int | None:
    head = first_page[:6000]
    printed, lines = _years_and_their_lines(head)
    dated = [int(y) for y in _DATED_RE.findall(lines)]
    creation = None
    m = re.match(r"D?:?(\d{4})", info.get("CreationDate") or "")
    if m and 1900 < int(m.group(1)) < 2100:
        creation = int(m.group(1))
    limit = creation or 2100
    if dated:
        plausible = [y for y in dated if y <= limit]
        if plausible:
            return max(plausible)
    if arxiv and re.match(r"\d{4}\.", arxiv):
        return 2000 + int(arxiv[:2])
    years = [int(y) for y in printed if int(y) <= limit]
    if years and (creation is None or max(years) < creation - 2):
        # An old paper scanned or re-typeset later: trust the years printed on it.
        counts = Counter(years)
        return max(counts, key=lambda y: (counts[y], y))
    return creation or (max(years) if years else None)


def _authors(info: dict[str, str]) -> list[str]:
    raw = (info.get("Author") or "").strip()
    if not raw or len(raw) > 500:
        return []
    names = re.split(r"\s*(?:;|,|\band\b|&)\s*", raw)
    return [clean_str(n) for n in names if sum(1 for c in n if c.isalpha()) >= 2]


def _abstract(text: str) -> str | None:
    m = _ABSTRACT_RE.search(text[:20000])
    if not m:
        return None
    rest = text[m.end(): m.end() + 4000]
    stop = _HEADING_STOP_RE.search(rest)
    if stop and stop.start() > 40:
        rest = rest[: stop.start()]
    rest = clean_str(rest)
    return rest[:2000] or None


def pdf_metadata(
    doc: Any,
    pages: list[str],
    filename: str = "",
    first_lines: list[tuple[float, float, str]] | None = None,
) -> dict[str, Any]:
    """Title, authors, year, abstract, DOI, arXiv id, language and info dict of an open PDF.

    `first_lines` is `first_page_lines` of page 1 when the caller has read it already;
    otherwise page 1 is loaded again to read it.
    """
    try:
        info = {k: clean_str(v) for k, v in doc.get_metadata_dict().items() if v and clean_str(v)}
    except Exception:  # noqa: BLE001 - a broken info dict must not lose the document
        info = {}
    first = pages[0] if pages else ""
    head = "\n".join(pages[:2])[:20000]
    if first_lines is not None:
        lines = first_lines
    else:
        try:
            lines = _first_page_lines(doc) if len(doc) else []
        except Exception:  # noqa: BLE001 - font data is a heuristic; fall back to text
            lines = []
    font_title = _title_from_fonts(lines)
    info_title = (info.get("Title") or "").strip()
    stem = normalize_title(re.sub(r"\.pdf$", "", filename, flags=re.IGNORECASE))
    title = None
    if _plausible_title(info_title) and normalize_title(info_title) != stem:
        title = " ".join(info_title.split())
    elif font_title and _plausible_title(font_title):
        title = font_title
    else:
        title = _title_from_text(first)
    doi_m = DOI_RE.search(head)
    doi = doi_m.group(1).rstrip(".,;)]}") if doi_m else None
    arxiv_m = ARXIV_RE.search(head)
    arxiv = arxiv_m.group(1) if arxiv_m else None
    text_sample = " ".join(p for p in pages[:3])
    # Further pages for the English check when the first three are short (title, contents).
    more: list[str] = []
    size = len(text_sample)
    for page in pages[3:] if size < 3000 else ():
        more.append(page)
        size += len(page) + 1
        if size >= 3000:
            break
    title = clean_str(title) if title else None
    return {
        "title": title or None,
        "authors": _authors(info),
        "year": _year(first, info, arxiv),
        "abstract": _abstract(head),
        "doi": doi,
        "arxiv_id": arxiv,
        "language": detect_language(text_sample, "".join(" " + p for p in more)),
        "page_count": len(pages),
        "info": info,
    }


def record_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """Title, year and authors of a JSONL (BEIR) record, from its fields and optional `metadata`."""
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    year = meta.get("year")
    try:
        year = int(year) if year is not None else None
    except (TypeError, ValueError):
        year = None
    authors = meta.get("authors") or []
    if isinstance(authors, str):
        authors = [a.strip() for a in re.split(r"[;,]", authors) if a.strip()]
    text = record.get("text") or ""
    doi_m = DOI_RE.search(str(meta.get("doi") or ""))
    return {
        "title": clean_str(record.get("title") or "") or None,
        "authors": [str(a) for a in authors],
        "year": year,
        "abstract": text[:2000] or None,
        "doi": doi_m.group(1) if doi_m else None,
        "arxiv_id": None,
    }
