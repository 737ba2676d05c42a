"""Bibliographic metadata of a paper, read from the paper itself: title, authors, year, ids, language.

Page 1 is read as lines with their rendered font sizes and positions (pdfium), the lines
near the title rebuilt glyph by glyph. Title: the largest-font block that is no banner,
stamp or affiliation, joined across its lines. Authors: the person names on the lines
between the title and the abstract, as given and family names. Year: the latest date that
page 1 prints for the paper (date, venue, copyright line, arXiv stamp), none if it prints
none. DOI and arXiv id by pattern. The info dict only where page 1 confirms it. Plain
Python over an open pypdfium2 document; no Dagster.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Any, NamedTuple

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
_CJK_RE = re.compile("[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")
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


# ---------------------------------------------------------------------------------------------
# Page 1 as lines with their rendered font sizes and positions

class Glyph(NamedTuple):
    """One character of a line and its loose box (PDF points, y up)."""

    char: str
    left: float
    bottom: float
    right: float
    top: float
    generated: bool = False  # a space pdfium inserted (from a gap), not one the PDF holds


class PageLine(NamedTuple):
    """One line of page 1: rendered font size, position, pdfium's text and the rebuilt text."""

    size: float  # font size x text-matrix scale, median of glyphs spread along the line
    top: float
    text: str  # pdfium's text of the line, stripped
    bottom: float = 0.0
    left: float = 0.0
    right: float = 0.0
    # The line rebuilt from its glyph boxes: superscripts and footnote marks dropped, spaces
    # that are no gap removed, one part per run of glyphs that a wide gap separates. Empty for
    # the lines far from the title, which are not rebuilt.
    parts: tuple[str, ...] = ()

    @property
    def clean(self) -> str:
        return " ".join(self.parts) if self.parts else self.text


class PageLines(list):
    """`PageLine`s of page 1, with what `first_page_lines` found on them: the body font size,
    the title's lines and the lines under it up to the abstract (indexes)."""

    body: float = 0.0
    title_block: list[int] | None = None
    author_lines: list[int] | None = None


_MARKS = frozenset("*∗†‡§¶⋆★♯♮♭✝✉")
_SPACING_ACCENTS = frozenset("¨ˇ´`˜^¸˚˙˝¯˘˛")
_SAMPLES = 3  # glyphs whose size is read per line: three spread along it outvote a small-caps run
_REBUILD_MAX_LINES = 40
_REBUILD_MAX_CHARS = 120


def first_page_lines(textpage: Any) -> PageLines:
    """The lines of page 1 with their rendered font sizes and positions, from pdfium.

    `textpage` is page 1's open pypdfium2 text page: the parser passes the one it extracts the
    page's text from, so page 1 is loaded once. A line's size is the nominal font size times
    the text matrix's vertical scale (nominal sizes are 1.0 for fonts scaled by the matrix),
    the median of three glyphs spread along the line (one for a long line); where that is no
    size (Type 3 fonts scale by their own matrix) the loose glyph box height stands in. The
    title's lines and the lines below it up to the abstract are also rebuilt glyph by glyph
    (`PageLine.parts`), and what was found is kept on the returned `PageLines`.
    """
    import ctypes

    import pypdfium2.raw as pdfium_c

    helper, textpage = textpage, getattr(textpage, "raw", textpage)  # the raw handle: no conversion per call
    n = pdfium_c.FPDFText_CountChars(textpage)
    text = helper.get_text_range(0, n) if n else ""
    if len(text) != n:
        text = "".join(chr(pdfium_c.FPDFText_GetUnicode(textpage, i)) for i in range(n))
    rect = pdfium_c.FS_RECTF()
    rect_ref = ctypes.byref(rect)
    matrix = pdfium_c.FS_MATRIX()
    matrix_ref = ctypes.byref(matrix)
    lines: list[PageLine] = []
    spans: list[tuple[int, int]] = []
    boxed_sizes = 0
    start = 0
    for segment in text.split("\n"):
        stripped = segment.strip()
        if stripped:
            first = len(segment) - len(segment.lstrip())
            # Long lines are body text, whose size one glyph tells; short ones may be a title.
            samples = _SAMPLES if len(stripped) <= 80 else 1
            sizes = []
            for k in range(samples):
                at = first + (2 * k + 1) * len(stripped) // (2 * samples)
                while segment[at].isspace():
                    at += 1
                pdfium_c.FPDFText_GetMatrix(textpage, start + at, matrix_ref)
                sizes.append(pdfium_c.FPDFText_GetFontSize(textpage, start + at) * math.hypot(matrix.c, matrix.d))
            pdfium_c.FPDFText_GetLooseCharBox(textpage, start + first, rect_ref)
            top, bottom, left = rect.top, rect.bottom, rect.left
            size = _median(sizes)
            if size < 2.0:
                size = abs(top - bottom)
                boxed_sizes += 1
            # The right edge is estimated (half an em a character): it only tells columns apart.
            right = left + 0.5 * size * len(stripped)
            lines.append(PageLine(round(size, 1), round(top, 1), stripped, round(bottom, 1), round(left, 1),
                                  round(right, 1)))
            spans.append((start, start + len(segment)))
        start += len(segment) + 1
    if boxed_sizes and boxed_sizes < len(lines):
        # A page mixing both measures would compare unlike sizes: use the boxes throughout.
        lines = [_boxed(textpage, ln, span, rect, rect_ref, pdfium_c) for ln, span in zip(lines, spans)]
    page = PageLines(lines)
    page.body = body_size(lines)
    page.title_block = _title_block(lines)
    page.author_lines = _author_lines(lines, page.title_block, page.body)
    chosen = page.title_block + page.author_lines if page.title_block else list(range(min(len(lines), 12)))
    chosen = [i for i in chosen if len(lines[i].text) <= _REBUILD_MAX_CHARS]
    for i in chosen[:_REBUILD_MAX_LINES]:
        a, b = spans[i]
        glyphs_of_line = []
        for k in range(a, b):
            ch = text[k]
            if ch.isspace():
                glyphs_of_line.append(Glyph(" ", 0.0, 0.0, 0.0, 0.0, bool(pdfium_c.FPDFText_IsGenerated(textpage, k))))
            elif pdfium_c.FPDFText_GetLooseCharBox(textpage, k, rect_ref):
                glyphs_of_line.append(Glyph(ch, rect.left, rect.bottom, rect.right, rect.top))
        right = max((g.right for g in glyphs_of_line), default=lines[i].right)
        page[i] = page[i]._replace(parts=rebuild_line(glyphs_of_line), right=round(right, 1))
    # Again with the rebuilt lines' measured right edges: they tell the columns apart better.
    page.author_lines = _author_lines(page, page.title_block, page.body)
    return page


def _boxed(textpage: Any, line: PageLine, span: tuple[int, int], rect: Any, rect_ref: Any, pdfium_c: Any) -> PageLine:
    """`line` with its size read from loose glyph box heights (the median of its first 12)."""
    heights = []
    for k in range(span[0], min(span[1], span[0] + 12)):
        if pdfium_c.FPDFText_GetLooseCharBox(textpage, k, rect_ref) and rect.top > rect.bottom:
            heights.append(rect.top - rect.bottom)
    return line._replace(size=round(_median(heights), 1)) if heights else line


def rebuild_line(glyphs: list[Glyph]) -> tuple[str, ...]:
    """A line's text from its glyph boxes, split where a wide gap separates two runs.

    Superscripts (smaller glyphs raised off the baseline: affiliation letters, footnote
    numbers) and footnote marks are dropped; a space that pdfium inserted with no gap behind
    it inside a capitalised or small-caps word ("CHAR ACTER") is removed; spacing accents
    that pdfium sets apart from their letter are dropped ("Babao ¨ glu"); a letter-spaced run
    ("R E S C I E N C E") is closed up.
    """
    boxed = [g for g in glyphs if g.char != " " and g.top > g.bottom]
    if not boxed:
        return ()
    height = _median([g.top - g.bottom for g in boxed])
    base = _median([g.bottom for g in boxed])
    parts: list[list[tuple[str, float]]] = [[]]  # per part: (word, gap before it)
    word = ""
    gap_before = 0.0
    prev: Glyph | None = None
    pending_space = ""  # a space since the last glyph: "real" (in the PDF) or "generated"
    accent = False  # a spacing accent dropped since the last glyph ("Babao ¨ glu")
    for g in glyphs:
        if g.char == " ":
            pending_space = pending_space or ("generated" if g.generated else "real")
            continue
        if g.char in _MARKS or g.char in _SPACING_ACCENTS:
            accent = accent or g.char in _SPACING_ACCENTS
            continue
        h = g.top - g.bottom
        if h > 0 and h < 0.8 * height and g.bottom > base + 0.2 * height:
            continue  # superscript
        if prev is not None and h > 0:
            gap = g.left - prev.right
            if gap > 1.5 * height:
                if word:
                    parts[-1].append((word, gap_before))
                parts.append([])
                word, gap_before = "", 0.0
            elif pending_space == "real" or (
                pending_space and (gap > 0.08 * height or not (accent or _cut(prev, g)))
            ):
                if word:
                    parts[-1].append((word, gap_before))
                word, gap_before = "", gap
        elif prev is not None and pending_space:
            if word:
                parts[-1].append((word, gap_before))
            word, gap_before = "", 0.3 * height
        word += g.char
        pending_space, accent = "", False
        if h > 0:
            prev = g
    if word:
        parts[-1].append((word, gap_before))
    return tuple(t for t in (" ".join(_CONTROL_RE.sub(" ", _join_words(p)).split()) for p in parts) if t)


def _cut(a: Glyph, b: Glyph) -> bool:
    """True when a space pdfium inserted between two touching glyphs cuts a word: the glyph size
    changes (small caps) or both are capitals ("CHAR ACTER", kerned apart). Between lowercase
    glyphs of one size it is a word break in a font whose boxes fill the gap."""
    ha, hb = a.top - a.bottom, b.top - b.bottom
    return abs(ha - hb) > 0.1 * max(ha, hb) or (a.char.isupper() and b.char.isupper())


def _join_words(words: list[tuple[str, float]]) -> str:
    singles = sum(1 for w, _ in words if len(w) == 1)
    if len(words) >= 4 and singles >= 0.8 * len(words):
        # Letter-spaced: the gaps between letters are the common ones, words have wider gaps.
        common = _median([gap for _, gap in words[1:]])
        out = words[0][0]
        for w, gap in words[1:]:
            out += (" " + w) if gap > 1.6 * common else w
        return out
    return " ".join(w for w, _ in words)


def _first_page_lines(doc: Any) -> PageLines:
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


# ---------------------------------------------------------------------------------------------
# Title: the largest-font block on page 1 that is no banner, stamp or affiliation

_AUTHOR_WINDOW_PT = 320.0  # how far below the title the author block may reach
_AUTHOR_MAX_LINES = 32
_STAMP_RE = re.compile(
    r"(?i)arxiv\s*:|\bdoi\b|https?:|www\.|@|©|\bcopyright\b|\bissn\b|\bisbn\b|\bproceedings\b|\bjournal\b"
    r"|\bjl\.|\bconference\b|\bsymposium\b|\bworkshop\b|\btransactions on\b|\bvol\.|\bvolume\b|\bmagazine\b"
    r"|\bsubmitted\b|\bsubmission\b|\bpreprint\b|\bdraft\b|\bto appear\b|\bpublished\b|\bpage \d+ of\b"
    r"|\bsee discussions\b|\bdownloaded\b|\bopen access\b|\bsponsored\b|\breport series\b|\btechnical report\b"
    r"|\buniversit|\bdepartment\b|\bdept\.|\binstitut|\blaborator|\bschool of\b|\bcollege\b"
    r"|\bgeneral rights\b|\bhal-\d|\bmanuscript\b|\bextended abstract\b|^abstract\b|^\d+(\.\d+)*\s*$"
    r"|^(?:\d+\.?\s+)?introduction\b|^\s*(?:关键字|关键词|摘\s*要)"
)
_HAL_PREFIX_RE = re.compile(r"(?i)^\s*\[?\s*hal-\d+\s*,?\s*v\d+\s*\]?\s*")
_PREFIX_STAMP_RE = re.compile(r"(?i)^\s*(?:\[?\s*hal-\d+\s*,?\s*v\d+\s*\]?|arxiv:\S+(?:\s+\[[^\]]*\])?)\s*")
_TRAILING_MARKS_RE = re.compile(r"[\s*∗†‡§¶⋆]+$")


def _letters(text: str) -> int:
    return len(_LETTER_RE.findall(text))


def _same_size(a: float, b: float) -> bool:
    return abs(a - b) <= max(0.3, 0.05 * max(a, b))


def body_size(lines: list[PageLine]) -> float:
    """The font size that most of page 1's characters are set in."""
    weight: Counter[float] = Counter()
    for ln in lines:
        weight[round(ln.size * 2) / 2] += len(ln.text)
    return weight.most_common(1)[0][0] if weight else 0.0


def _title_block(lines: list[PageLine]) -> list[int]:
    """Indexes of the title's lines: the largest-font run of adjacent lines that can be a title.

    Runs of adjacent lines in one size are tried largest first (the first in reading order
    among equal sizes); stamp, banner and affiliation lines split a run and are left out.
    """
    runs: list[list[int]] = []
    for i, ln in enumerate(lines):
        if runs:
            last = lines[runs[-1][-1]]
            # The next line down, or the rest of this one (pdfium breaks "Kelips∗" / ": Building ...").
            drop = last.top - ln.top
            level = abs(drop) < 0.3 * ln.size and ln.left > last.left
            if _same_size(last.size, ln.size) and (0 < drop <= 1.9 * max(last.size, ln.size) or level):
                runs[-1].append(i)
                continue
        runs.append([i])
    for run in sorted(runs, key=lambda r: (-max(lines[i].size for i in r), r[0])):
        # The lines before a stamp in the run can be the title; those after it belong to the
        # banner ("This paper is included in the Proceedings of the / 11th USENIX Symposium on").
        block: list[int] = []
        for i in run:
            # A HAL id before the title is a stamp on the title's line, not a line of its own.
            if _STAMP_RE.search(_HAL_PREFIX_RE.sub("", lines[i].text)):
                break
            if _letters(lines[i].text) >= 2:
                block.append(i)
        text = " ".join(lines[k].text for k in block)
        # Two words, or a title in a script written without spaces (Chinese, Japanese).
        words = " " in text.strip() or len(_CJK_RE.findall(text)) >= 6
        if block and _letters(text) >= 8 and words and len(text) <= 350 and len(block) <= 6:
            return block
    return []


def _title_from_lines(lines: list[PageLine], block: list[int]) -> str | None:
    if not block:
        return None
    parts = [lines[i].clean for i in block]
    # Names set in the title's font on its last line ("... Image Recognition Karen Simonyan").
    last = lines[block[-1]]
    if len(last.parts) > 1 and _only_names(last.parts[-1]) and not _only_names(last.parts[0]):
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
    if _STAMP_RE.search(sub.text) or _letters(sub.text) < 6 or _person_names([sub.clean]):
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
# Authors: the name lines between the title and the abstract

_PARTICLES = frozenset("van von de der den da di du la le del della dos das bin ibn al el ten ter zu y st.".split())
_ORG_RE = re.compile(
    r"(?i)\b(?:universit\w*|univ\.?|college|institut\w*|department|dept\.?|school|laborator\w*|labs?|research"
    r"|cent(?:er|re)|inc\.?|corp\.?|corporation|company|ltd\.?|gmbh|group|division|project|foundation|academy"
    r"|society|national|technolog\w*|systems|sciences?|engineering|computing|computer|faculty|program+e?"
    r"|google|microsoft|ibm|intel|yahoo!?|facebook|akamai|nokia|xerox|amazon|apple|oracle|sun microsystems"
    r"|microsystems|bell|at&t|mit|cmu|epfl|inria|cnrs|csiro|nasa|berkeley|stanford|cornell|princeton|usa|u\.s\.a\."
    r"|uk|street|avenue|road|box|square|polytechni\w*|ecole|école|telecom|télécom|paristech|lab\.?|hospital"
    r"|ministry|agency|council|conference|paper|profile|publications?|citations?|reads|abstract|introduction"
    r"|keywords?|draft|report|supervised|advisers?|editor|chair|email|e-mail|www|http"
    r"|departament\w*|departement|dipartimento|informati\w+|h[oö]gskola|universidad|universit[aàäé]\w*"
    r"|building|entertainment|intelligence|germany|france|italy|spain|portugal|china|japan|canada|australia"
    r"|india|israel|switzerland|netherlands|sweden|denmark|norway|finland|korea|brazil|austria|belgium)\b"
)
_STOP_RE = re.compile(
    r"(?i)^\s*(?:abstract|a b s t r a c t|summary|keywords?|key words|index terms|cr categor|categories and subject"
    r"|general terms|(?:\d+\.?|[ivx]+\.)?\s*introduction)\b"
)
_INITIALS_RE = re.compile(r"^(?:[A-Z]\.?-?){1,3}\.?$|^[A-Z]\.(?:-?[A-Z]\.)+$")
_NAME_WORD_RE = re.compile(r"^[^\W\d_][^\W\d_'’\-]*(?:['’\-][^\W\d_]+)*\.?$")
_FOOTNOTE_DIGITS_RE = re.compile(r"(?<=[^\W\d_])\d+(?:,\d+)*\b")
_EMAIL_RE = re.compile(r"[(<]?\s*[\w.+\-]+@[\w.\-]+\s*[)>]?")
# A place, not a person: "Santa Clara, CA", "Palo Alto, California", "Ithaca, NY".
_PLACE_AFTER_RE = re.compile(
    r"^(?:[A-Z]{2}|USA|U\.S\.A\.|UK|Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware"
    r"|Florida|Georgia|Hawaii|Idaho|Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland"
    r"|Massachusetts|Michigan|Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire"
    r"|New Jersey|New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania"
    r"|Rhode Island|South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington"
    r"|West Virginia|Wisconsin|Wyoming|Canada|England|Scotland|United Kingdom|United States)"
    r"(?:\s+\d[\d\-]*)?\.?$")  # the whole piece: "CA 94304", not "Massachusetts Institute of ..."
_SUFFIX_RE = re.compile(r"^(?:Jr\.?|Sr\.?|II|III|IV)$")
_NOT_NAME_WORDS = frozenset("and by with of the for in on at to from".split())
_BY_RE = re.compile(r"^(?:by|BY|By|Prof\.|Professor|Dr\.|Mr\.|Mrs\.|Ms\.)\s+")
_NAME_SPLIT_RE = re.compile(r"\s*[,;]\s*|\s+(?:and|AND|And)\s+|\s*&\s*")


def _name_word(token: str) -> str | None:
    """'initial', 'particle', 'word' (a capitalised or all-caps name word) or None."""
    if _INITIALS_RE.match(token):
        return "initial"
    if token.lower() in _PARTICLES and token.islower():
        return "particle"
    if token.lower() in _NOT_NAME_WORDS:
        return None
    if _NAME_WORD_RE.match(token) and token[0].isupper() and _letters(token) >= 2:
        return "word"
    return None


def _split_run(tokens: list[str]) -> list[list[str]]:
    """Names in a run that no comma separates ("Sage A. Weil Andrew W. Leung", "S E Robertson S Walker").

    A name ends after a full word when the next token starts another name; three full words,
    or four without initials, are one name ("Angela Demke Brown", "Ana Candida Cruz Natali").
    """
    kinds = [_name_word(t) for t in tokens]
    words = sum(1 for k in kinds if k == "word")
    if words < 4 or (words == 4 and "initial" not in kinds) or None in kinds:
        return [tokens]  # a phrase with a word no name has ("An Overlooked Paradigm in ...") stays whole
    names: list[list[str]] = [[]]
    for token, kind in zip(tokens, kinds):
        current = names[-1]
        if current and len(current) >= 2 and _name_word(current[-1]) == "word" and kind in ("word", "initial"):
            names.append([])
        names[-1].append(token)
    return names


def _person(tokens: list[str]) -> dict[str, str] | None:
    """{'given', 'family'} (and 'suffix': "Jr.") for a name's tokens, or None if they are no person's name."""
    if not 2 <= len(tokens) <= 5:
        return None
    suffix = tokens[-1] if len(tokens) > 2 and _SUFFIX_RE.match(tokens[-1]) else ""
    if suffix:
        tokens = tokens[:-1]
    kinds = [_name_word(t) for t in tokens]
    if None in kinds or kinds[-1] != "word" or kinds[0] == "particle":
        return None
    k = len(tokens) - 1
    # Particles belong to the family name ("van Renesse"), capitalised ones too after a given
    # name ("Alfredo De la Fuente").
    while k > 1 and (kinds[k - 1] == "particle" or tokens[k - 1].lower() in _PARTICLES):
        k -= 1
    given = " ".join(_name_case(t) for t in tokens[:k])
    family = " ".join(_name_case(t) for t in tokens[k:])
    if not given:
        return None
    return {"given": given, "family": family, "suffix": suffix} if suffix else {"given": given, "family": family}


def _name_case(token: str) -> str:
    # "HOARE" -> "Hoare"; initials and mixed-case names ("McKenney") stay as printed.
    if token.isupper() and _letters(token) >= 3:
        return "-".join(p.capitalize() for p in token.split("-"))
    return token


def _names_in(text: str) -> list[dict[str, str]]:
    """The person names in one run of author text ("A. Fox, E. Brewer and J. Doe")."""
    text = _FOOTNOTE_DIGITS_RE.sub("", _EMAIL_RE.sub(" ", text).strip())
    if not text or re.search(r"\d|@|\{|\}|\(|\)|:", text):
        return []
    if ";" in text and "," in text:
        # "Bonnichsen, Lars Frydendal; Karlsson, Sven": family name first. "Qi Chen, Peking
        # University; Zhaoguo Wang and Russell Power, New York University": names, affiliation.
        out = []
        for piece in text.split(";"):
            piece = re.sub(r"\s+(?:and|AND|And|&)\s*$", "", piece)  # "Sachin Katti and" / "Mendel ..."
            family, _, given = piece.partition(",")
            if not given.strip() or _ORG_RE.search(given):
                out.extend(_names_in(family))
                continue
            if _ORG_RE.search(piece):
                break
            person = _person(given.split() + family.split()) if given.strip() else None
            if person:
                person = {"given": " ".join(given.split()), "family": " ".join(family.split())}
                out.append(person)
        return out
    out = []
    pieces = _NAME_SPLIT_RE.split(text)
    for k, piece in enumerate(pieces):
        if _ORG_RE.search(piece):
            break  # an affiliation; what follows it is its place ("University of California, Santa Cruz")
        if k + 1 < len(pieces) and _PLACE_AFTER_RE.match(pieces[k + 1].strip()):
            break  # a town before its state or country
        tokens = _tokens(_BY_RE.sub("", re.sub(r"^(?:and|AND|And|&)\s+", "", piece)))
        for run in _split_run(tokens):
            person = _person(run)
            if person:
                out.append(person)
    return out


def _tokens(text: str) -> list[str]:
    return text.replace("\u00a0", " ").split()


def _person_names(parts: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
    """The names in a line's parts, or in the parts joined when that finds more ("CYNTHIA DWORK AND ...")."""
    def names_in(pieces: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
        names = []
        for piece in pieces:
            for sub in re.split(r"\s+[–—|·•]\s+|\s{2,}", piece):
                names.extend(_names_in(sub))
        return names

    separate = names_in(parts)
    if len(parts) > 1:
        joined = names_in([" ".join(parts)])
        if len(joined) > len(separate):
            return joined
    return separate


def _only_names(text: str) -> list[dict[str, str]]:
    """The names in `text` when they are all it says ("Ken Birman"), else []."""
    names = _person_names([text])
    words = sum(len(n["given"].split()) + len(n["family"].split()) for n in names)
    return names if names and words == len(re.findall(r"[^\W\d_][^\s,;&]*", _BY_RE.sub("", text))) - len(
        re.findall(r"\b(?:and|AND|And)\b", text)) else []


def _running_text(line: PageLine, body: float) -> bool:
    """A line of a paragraph: body size (when sizes are known), eight words or more, many lowercase."""
    words = line.text.split()
    if len(words) < 8 or (line.size and body and not _same_size(line.size, body)):
        return False
    return sum(1 for w in words if w[:1].islower()) >= 0.4 * len(words)


def _author_lines(lines: list[PageLine], block: list[int], body: float | None = None) -> list[int]:
    """Indexes of the lines below the title in reading order, up to the abstract or body text."""
    if not block:
        return []
    bottom = min(lines[i].bottom for i in block)
    body = body_size(lines) if body is None else body
    below = sorted(
        (i for i, ln in enumerate(lines) if i not in block and bottom - _AUTHOR_WINDOW_PT <= ln.top <= bottom + 2),
        key=lambda i: (-round(lines[i].top / 3), lines[i].left),
    )
    left = min(lines[i].left for i in block)
    right = max(lines[i].right for i in block)
    out = []
    for i in below[:_AUTHOR_MAX_LINES]:
        ln = lines[i]
        if _STOP_RE.match(ln.text):
            break
        if _running_text(ln, body):
            if ln.left < right and ln.right > left:
                break
            continue  # the other column's text, level with the author block
        out.append(i)
    return out


def _authors_from_lines(
    lines: list[PageLine], block: list[int], below: list[int] | None = None
) -> list[dict[str, str]]:
    """Person names on the lines between the title and the abstract (`below`, the lines found there)."""
    names: list[dict[str, str]] = []
    seen: set[str] = set()
    size = 0.0  # the authors' font size, from the first line with names
    for i in _author_lines(lines, block) if below is None else below:
        ln = lines[i]
        if size and not _same_size(ln.size, size):
            continue  # affiliation and address lines are set smaller ("Santa Clara", "Palo Alto")
        found = _person_names(ln.parts or (ln.text,))
        if found and not size:
            size = ln.size
        for person in found:
            key = f"{person['given']} {person['family']}".casefold()
            if key not in seen:
                seen.add(key)
                names.append(person)
    return names


def _authors_from_info(info: dict[str, str], first_page: str) -> list[dict[str, str]]:
    """The info dict's authors, when each of them is printed on page 1 (else it is an account name)."""
    raw = (info.get("Author") or "").strip()
    if not raw or len(raw) > 500:
        return []
    page = " ".join(first_page.split()).casefold()
    names = []
    for person in _names_in(raw) if not _ORG_RE.search(raw) else []:
        if person["family"].casefold() not in page:
            return []
        names.append(person)
    return names


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
        if not _running_text(ln, body):
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
            lines = _first_page_lines(doc) if len(doc) else []
        except Exception:  # noqa: BLE001 - font data is a heuristic; fall back to text
            lines = []
    known = isinstance(lines, PageLines) and lines.title_block is not None
    block = lines.title_block if known else _title_block(lines)
    body = lines.body if known else body_size(lines)
    people = _authors_from_lines(lines, block, lines.author_lines if known else None)
    if not people and len(block) > 1:
        # No names under the title: its last line, set in the title's font, may be the author.
        names = _only_names(lines[block[-1]].clean)
        if names:
            block, people = block[:-1], names
    font_title = _title_from_lines(lines, block)
    info_title = _info_title(info, filename, first)
    if info_title and (not font_title or normalize_title(font_title) in normalize_title(info_title)):
        # The info title is printed on the page and holds the font title: it is the whole title.
        title = info_title
    elif font_title and _letters(font_title) >= 6:
        title = font_title
    else:
        title = info_title or _title_from_text(first)
    people = people or _authors_from_info(info, first)
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
