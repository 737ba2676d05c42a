"""Text cleanup for extracted PDF pages: junk measurement, normalisation and de-hyphenation.

`page_stats` measures how much of a page's raw text is junk (the garbled-page signal),
`clean_text` normalises it (newlines, ligatures, soft hyphens, junk characters) and
`dehyphenate` joins the words a document broke at line ends. Pure functions on strings: no
PDF library is imported here.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

#: A page is garbled when this share of its non-space characters is junk (see `page_stats`).
GARBLED_PAGE_THRESHOLD = 0.12

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


def read_page(raw: str) -> tuple[PageStats, str]:
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
