"""Page 1 of a PDF as lines with their rendered font sizes and positions, and where its title
and author block sit.

pdfium's lines of page 1 with their font size and position (`PageLine`); the lines near the
title rebuilt glyph by glyph (`rebuild_line`); the title block (the largest-font run of lines
that is no banner, stamp or affiliation) and the lines under it up to the abstract. Plain
Python over an open pypdfium2 text page; no Dagster.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, NamedTuple

_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd\ufffe\uffff\ue000-\uf8ff]")


def clean_str(value: Any) -> str:
    """A metadata string without control/private-use characters (PostgreSQL text cannot hold NUL)."""
    return " ".join(_CONTROL_RE.sub(" ", str(value)).split())


_LETTER_RE = re.compile(r"[^\W\d_]")
_CJK_RE = re.compile("[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


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
    page.title_block = find_title_block(lines)
    page.author_lines = find_author_lines(lines, page.title_block, page.body)
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
    page.author_lines = find_author_lines(page, page.title_block, page.body)
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
    return tuple(t for t in (clean_str(_join_words(p)) for p in parts) if t)


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


def load_first_page_lines(doc: Any) -> PageLines:
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
# Where the title and the author block sit: the largest-font block, the lines under it

_AUTHOR_WINDOW_PT = 320.0  # how far below the title the author block may reach
_AUTHOR_MAX_LINES = 32
STAMP_RE = re.compile(
    r"(?i)arxiv\s*:|\bdoi\b|https?:|www\.|@|©|\bcopyright\b|\bissn\b|\bisbn\b|\bproceedings\b|\bjournal\b"
    r"|\bjl\.|\bconference\b|\bsymposium\b|\bworkshop\b|\btransactions on\b|\bvol\.|\bvolume\b|\bmagazine\b"
    r"|\bsubmitted\b|\bsubmission\b|\bpreprint\b|\bdraft\b|\bto appear\b|\bpublished\b|\bpage \d+ of\b"
    r"|\bsee discussions\b|\bdownloaded\b|\bopen access\b|\bsponsored\b|\breport series\b|\btechnical report\b"
    r"|\buniversit|\bdepartment\b|\bdept\.|\binstitut|\blaborator|\bschool of\b|\bcollege\b"
    r"|\bgeneral rights\b|\bhal-\d|\bmanuscript\b|\bextended abstract\b|^abstract\b|^\d+(\.\d+)*\s*$"
    r"|^(?:\d+\.?\s+)?introduction\b|^\s*(?:关键字|关键词|摘\s*要)"
)
_HAL_PREFIX_RE = re.compile(r"(?i)^\s*\[?\s*hal-\d+\s*,?\s*v\d+\s*\]?\s*")


_STOP_RE = re.compile(
    r"(?i)^\s*(?:abstract|a b s t r a c t|summary|keywords?|key words|index terms|cr categor|categories and subject"
    r"|general terms|(?:\d+\.?|[ivx]+\.)?\s*introduction)\b"
)


def letters(text: str) -> int:
    return len(_LETTER_RE.findall(text))


def same_size(a: float, b: float) -> bool:
    return abs(a - b) <= max(0.3, 0.05 * max(a, b))


def body_size(lines: list[PageLine]) -> float:
    """The font size that most of page 1's characters are set in."""
    weight: Counter[float] = Counter()
    for ln in lines:
        weight[round(ln.size * 2) / 2] += len(ln.text)
    return weight.most_common(1)[0][0] if weight else 0.0


def find_title_block(lines: list[PageLine]) -> list[int]:
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
            if same_size(last.size, ln.size) and (0 < drop <= 1.9 * max(last.size, ln.size) or level):
                runs[-1].append(i)
                continue
        runs.append([i])
    for run in sorted(runs, key=lambda r: (-max(lines[i].size for i in r), r[0])):
        # The lines before a stamp in the run can be the title; those after it belong to the
        # banner ("This paper is included in the Proceedings of the / 11th USENIX Symposium on").
        block: list[int] = []
        for i in run:
            # A HAL id before the title is a stamp on the title's line, not a line of its own.
            if STAMP_RE.search(_HAL_PREFIX_RE.sub("", lines[i].text)):
                break
            if letters(lines[i].text) >= 2:
                block.append(i)
        text = " ".join(lines[k].text for k in block)
        # Two words, or a title in a script written without spaces (Chinese, Japanese).
        words = " " in text.strip() or len(_CJK_RE.findall(text)) >= 6
        if block and letters(text) >= 8 and words and len(text) <= 350 and len(block) <= 6:
            return block
    return []


def running_text(line: PageLine, body: float) -> bool:
    """A line of a paragraph: body size (when sizes are known), eight words or more, many lowercase."""
    words = line.text.split()
    if len(words) < 8 or (line.size and body and not same_size(line.size, body)):
        return False
    return sum(1 for w in words if w[:1].islower()) >= 0.4 * len(words)


def find_author_lines(lines: list[PageLine], block: list[int], body: float | None = None) -> list[int]:
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
        if running_text(ln, body):
            if ln.left < right and ln.right > left:
                break
            continue  # the other column's text, level with the author block
        out.append(i)
    return out
