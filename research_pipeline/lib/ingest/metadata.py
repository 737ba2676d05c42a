"""Bibliographic metadata of a paper, read from the paper itself: title, authors, year, ids, language.

Page 1 is read as lines with their rendered font sizes and positions (`page_lines`), the lines
near the title rebuilt glyph by glyph. Title: the largest-font block that is no banner,
stamp or affiliation, joined across its lines. Authors: the person names on the lines
between the title and the abstract, as given and family names (`authors`). Year: the latest
date that page 1 prints for the paper (date, venue, copyright line, arXiv stamp), none if it
prints none. DOI and arXiv id by pattern. The info dict only where page 1 confirms it. Plain
Python over an open pypdfium2 document; no Dagster.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from research_pipeline.lib.ingest.authors import (
    authors_from_info,
    authors_from_lines,
    only_names,
    person_names,
)
from research_pipeline.lib.ingest.page_lines import (
    STAMP_RE,
    PageLine,
    PageLines,
    body_size,
    clean_str,
    find_title_block,
    letters,
    load_first_page_lines,
    running_text,
)

# "10." that no letter or digit precedes (a word boundary), written literal first so that the
# search skips ahead to each "10." instead of trying the pattern at every character.
DOI_RE = re.compile(r"(10\.(?<!\w10\.)\d{4,9}/[^\s\"<>]+)", re.IGNORECASE)
ARXIV_RE = re.compile(
    r"arXiv:\s*(\d{4}\.\d{4,5}|[a-z\-]+(?:\.[A-Z]{2})?/\d{7})(v\d+)?", re.IGNORECASE
)
YEAR_RE = re.compile(r"(?<!\d)(19[0-9]{2}|20[0-4][0-9])(?!\d)")
_JUNK_TITLES = re.compile(
    r"^(untitled|title|microsoft word|doi|paper|document|slide|proceedings template|\s*$)"
    r"|\.(docx?|tex|dvi|pdf|ps|indd)\b|^[\w\-]+$",
    re.IGNORECASE,
)
_ABSTRACT_RE = re.compile(r"(?im)^\s*(abstract|summary|a b s t r a c t|摘\s*要)\s*[:.\-—]?\s*")
_HEADING_STOP_RE = re.compile(
    r"(?im)^\s*(?:\d+\.?\s+|[IVX]+\.\s+)?(introduction|keywords|key words|index terms|categories and subject"
    r"|general terms|1\s+introduction|关键词|关键字)\b"
)


def normalize_title(title: str | None) -> str:
    """A comparison key for titles: NFKC, casefolded, letters and digits only, single spaces."""
    if not title:
        return ""
    t = unicodedata.normalize("NFKC", title).casefold()
    t = re.sub(r"[^\w]+", " ", t)
    return " ".join(t.split())


_KANA_RE = re.compile("[\u3040-\u30ff]")
_HANGUL_RE = re.compile("[\uac00-\ud7af]")
_HAN_RE = re.compile("[\u4e00-\u9fff]")
_ASCII_WORD_RE = re.compile(r"[a-z]+")
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
    n_letters = ascii_letters + (letters(other) if other else 0)
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


# ---------------------------------------------------------------------------------------------
# Title: the title block's lines joined, or the info dict's title, or the first plausible line

_PREFIX_STAMP_RE = re.compile(r"(?i)^\s*(?:\[?\s*hal-\d+\s*,?\s*v\d+\s*\]?|arxiv:\S+(?:\s+\[[^\]]*\])?)\s*")
_TRAILING_MARKS_RE = re.compile(r"[\s*∗†‡§¶⋆]+$")


def _title_from_lines(lines: list[PageLine], block: list[int]) -> str | None:
    if not block:
        return None
    parts = [lines[i].clean for i in block]
    # Names set in the title's font on its last line ("... Image Recognition Karen Simonyan").
    last = lines[block[-1]]
    if len(last.parts) > 1 and only_names(last.parts[-1]) and not only_names(last.parts[0]):
        parts[-1] = " ".join(last.parts[:-1])
    title = ""
    for part in parts:
        title = title + part if title.endswith("-") else f"{title} {part}"
    title = _TRAILING_MARKS_RE.sub("", _PREFIX_STAMP_RE.sub("", " ".join(title.split())))
    subtitle = _subtitle(lines, block)
    if subtitle:
        title = f"{title}{'' if title[-1:] in ':?.!—-' else ':'} {subtitle}"
    return title or None


def _subtitle(lines: list[PageLine], block: list[int]) -> str | None:
    """The line right under the title in a smaller size that is no name, stamp or number, set
    larger than the line after it ("You Want it When?", "An Overlooked Paradigm in ...")."""
    j = block[-1] + 1
    if j >= len(lines):
        return None
    title, sub = lines[block[-1]], lines[j]
    after = lines[j + 1] if j + 1 < len(lines) else None
    if not (0.7 * title.size <= sub.size < 0.95 * title.size and 0 < title.top - sub.top <= 2.2 * title.size):
        return None
    if STAMP_RE.search(sub.text) or letters(sub.text) < 6 or person_names([sub.clean]):
        return None
    if after is None or after.size >= sub.size - 0.3:
        return None
    if re.search(r"\d", sub.clean):
        return None
    return _TRAILING_MARKS_RE.sub("", sub.clean)


def _plausible_title(t: str | None) -> bool:
    if not t:
        return False
    t = t.strip()
    letters = sum(1 for c in t if c.isalpha())
    return 8 <= len(t) <= 300 and letters >= 6 and " " in t and not _JUNK_TITLES.search(t)


def _title_from_text(first_page: str) -> str | None:
    for line in first_page.splitlines()[:15]:
        line = line.strip()
        if _plausible_title(line) and not re.match(r"(?i)(arxiv|doi|http|proceedings|journal|vol)", line):
            return line
    return None


# ---------------------------------------------------------------------------------------------
# Year: printed on page 1 (a date line, a venue line, a copyright line, the arXiv stamp)

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?"
          r"|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_Y = r"(?<![\d/])(19\d\d|20[0-4]\d)(?![\d/])"
_ARXIV_STAMP_RE = re.compile(r"arXiv:\s*\S+\s*(?:\[[^\]]*\])?\s*\d{1,2}\s+" + _MONTH + r"\s+" + _Y)
# A © that the font maps to "c" or "q" ("q 2005 Elsevier B.V.") counts before a capitalised word.
_COPYRIGHT_RE = re.compile(
    r"(?i)(?:©|\(c\)|copyright\b)[^\n]{0,40}?" + _Y + r"|(?<![\w.])[cq]\s?" + _Y + r"(?=\s+[A-Z])"
)
_DATE_RE = re.compile(
    r"(?<![A-Za-z])" + _MONTH + r"(?:\s*\d{1,2}(?:st|nd|rd|th)?(?:\s*[-–]\s*\d{1,2})?)?,?\s+" + _Y
    + r"|(?<!\d)\d{1,2}(?:\s*[-–]\s*\d{1,2})?\s+" + _MONTH + r",?\s+" + _Y
)
_VENUE_RE = re.compile(
    r"(?i)\b(?:proceedings|conference|symposium|workshop|journal|jl\.|transactions|magazine|communications"
    r"|surveys|review|letters|vol\.?|volume|issue|published in|publication date|report|to appear in|appears? in"
    r"|appeared in|date:)[^\n]{0,80}?" + _Y
)
_PAREN_YEAR_RE = re.compile(r"\(" + _Y + r"\)")
_LONE_YEAR_RE = re.compile(r"^\s*" + _Y + r"\s*$")
_NOT_THE_PAPERS_DATE_RE = re.compile(
    r"(?i)\b(?:downloaded|uploaded|retrieved|accessed|printed|last modified|generated|re-?keyed|re-?typed"
    r"|re-?typeset|transcribed|converted)\b|\d{1,2}:\d{2}")
# A venue's short year: "Submitted to ML'08", "ICFP '02".
_SHORT_YEAR_RE = re.compile(r"\b[A-Z][A-Za-z]{1,9}\s?['’](\d\d)\b")


def printed_year(lines: list[PageLine] | list[str], info: dict[str, str] | None = None,
                 body: float | None = None) -> int | None:
    """The year page 1 dates the paper by, or None when it prints none.

    Candidates: the arXiv stamp's date and copyright lines anywhere; dates, venue lines
    ("Journal of Hydrology 310 (2005)", "Published in the Proceedings of OSDI 2012"), a year
    alone on a line and a citation header ("Lee, J. & Hammer, J. (2011).") outside running
    text. The latest wins (a revision, the published version); years in sentences, download
    and print stamps, and years after the file's creation date do not count.
    """
    info = info or {}
    page_lines = [ln if isinstance(ln, PageLine) else PageLine(0.0, 0.0, ln) for ln in lines]
    if body is None:
        body = body_size(page_lines) if any(ln.size for ln in page_lines) else 0.0
    m = re.match(r"D?:?(\d{4})", info.get("CreationDate") or "")
    # PDF is from 1993: an earlier creation year is a broken clock ("D:19102..." for 2002).
    limit = int(m.group(1)) + 1 if m and 1993 <= int(m.group(1)) < 2100 else 2100
    years: list[int] = []
    for ln in page_lines:
        text = ln.text
        if not (YEAR_RE.search(text) or "'" in text or "’" in text) or _NOT_THE_PAPERS_DATE_RE.search(text):
            continue
        found = _ARXIV_STAMP_RE.findall(text) + _COPYRIGHT_RE.findall(text)
        if not running_text(ln, body):
            found += _DATE_RE.findall(text) + _VENUE_RE.findall(text) + _PAREN_YEAR_RE.findall(text)
            found += _LONE_YEAR_RE.findall(text)
            found += [str(1900 + int(y) if int(y) > 50 else 2000 + int(y)) for y in _SHORT_YEAR_RE.findall(text)]
        for y in found:
            for value in (y if isinstance(y, tuple) else (y,)):
                if value and int(value) <= limit:
                    years.append(int(value))
    return max(years) if years else None


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


def _info_title(info: dict[str, str], filename: str, first_page: str) -> str | None:
    """The info dict's title when it is plausible, not the file's name, and printed on page 1."""
    title = " ".join((info.get("Title") or "").split())
    stem = normalize_title(re.sub(r"\.pdf$", "", filename, flags=re.IGNORECASE))
    if not _plausible_title(title) or normalize_title(title) == stem:
        return None
    return title if normalize_title(title) in normalize_title(first_page) else None


def pdf_metadata(
    doc: Any,
    pages: list[str],
    filename: str = "",
    first_lines: PageLines | list[PageLine] | None = None,
) -> dict[str, Any]:
    """Title, authors, year, abstract, DOI, arXiv id, language and info dict of an open PDF.

    `first_lines` is `first_page_lines` of page 1 when the caller has read it already;
    otherwise page 1 is loaded again to read it. `authors` are display names ("Given
    Family"); `author_names` the same people as {"given", "family"}.
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
            lines = load_first_page_lines(doc) if len(doc) else []
        except Exception:  # noqa: BLE001 - font data is a heuristic; fall back to text
            lines = []
    known = isinstance(lines, PageLines) and lines.title_block is not None
    block = lines.title_block if known else find_title_block(lines)
    body = lines.body if known else body_size(lines)
    people = authors_from_lines(lines, block, lines.author_lines if known else None)
    if not people and len(block) > 1:
        # No names under the title: its last line, set in the title's font, may be the author.
        names = only_names(lines[block[-1]].clean)
        if names:
            block, people = block[:-1], names
    font_title = _title_from_lines(lines, block)
    info_title = _info_title(info, filename, first)
    if info_title and (not font_title or normalize_title(font_title) in normalize_title(info_title)):
        # The info title is printed on the page and holds the font title: it is the whole title.
        title = info_title
    elif font_title and letters(font_title) >= 6:
        title = font_title
    else:
        title = info_title or _title_from_text(first)
    people = people or authors_from_info(info, first)
    doi_m = DOI_RE.search(head)
    doi = doi_m.group(1).rstrip(".,;)]}") if doi_m else None
    arxiv_m = ARXIV_RE.search(head)
    arxiv = arxiv_m.group(1) if arxiv_m else None
    year = printed_year(lines, info, body) if lines else printed_year(first.splitlines(), info)
    if year is None and arxiv and re.match(r"\d{4}\.", arxiv):
        year = 2000 + int(arxiv[:2])
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
        "authors": [clean_str(" ".join(p.values())) for p in people],
        "author_names": [{k: clean_str(v) for k, v in p.items()} for p in people],
        "year": year,
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
