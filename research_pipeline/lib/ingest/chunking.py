"""Section-aware chunking of documents into embedding-sized passages.

A document's text is split at detected section headings (chunks never cross a section),
then each section is cut into windows of at most `max_tokens - 2` word pieces of the
embedding model (the model adds [CLS] and [SEP] and truncates at `max_tokens`), preferring
sentence ends, with `overlap_tokens` of overlap that starts on a sentence where one is near.
Every chunk's text is exactly `documents.text[char_start:char_end]`, so offsets, page spans
and snippets always point at the source. Chunk identities are content hashes, so re-chunking
the same text gives the same ids.

Chunking is versioned: `chunking_id` hashes `CHUNKER_VERSION`, the window parameters and the
tokenizer into an id stored on every chunk and part of its identity. `chunk_documents`
re-chunks every live document whose chunks have another id; unchanged passages keep their
content hash, so their embeddings (keyed by content hash and model) are reused, not recomputed.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util
from research_pipeline.lib.ingest.lifecycle import LIVE

logger = logging.getLogger(__name__)

#: Bump when a change to this module cuts any document differently (headings, windows, fitting):
#: every document is then re-chunked on the next run.
CHUNKER_VERSION = "2"

#: Word pieces the model adds around every input ([CLS] and [SEP] for BERT-style models).
SPECIAL_TOKENS = 2
#: The section name of text before the first heading of a PDF, and of a record without headings.
FRONT_MATTER = "Front matter"
BODY = "Body"
REFERENCES = "References"

# Known section names, keyed by the lower-cased heading with spacing collapsed.
_KNOWN: dict[str, str] = {}
for _canonical, _variants in {
    "Abstract": ["abstract", "摘要", "摘 要"],
    "Introduction": ["introduction", "引言", "前言", "绪论"],
    "Background": ["background", "preliminaries"],
    "Related Work": ["related work", "related works", "literature review", "prior work"],
    "Methods": ["method", "methods", "materials and methods", "methods and materials", "方法"],
    "Methodology": ["methodology"],
    "Experiments": ["experiment", "experiments", "实验"],
    "Experimental Setup": ["experimental setup"],
    "Experimental Results": ["experimental results"],
    "Evaluation": ["evaluation"],
    "Results": ["results", "结果"],
    "Results and Discussion": ["results and discussion"],
    "Discussion": ["discussion", "讨论"],
    "Conclusion": ["conclusion", "结论", "结语"],
    "Conclusions": ["conclusions", "conclusions and future work", "conclusion and future work"],
    "Summary": ["summary"],
    "Statement of Need": ["statement of need"],
    "Acknowledgements": ["acknowledgements", "acknowledgments", "acknowledgement", "acknowledgment", "致谢"],
    REFERENCES: ["references", "bibliography", "literature cited", "works cited", "参考文献", "参 考 文 献"],
    "Appendix": ["appendix", "appendices", "附录"],
}.items():
    for _v in _variants:
        _KNOWN[_v] = _canonical
_REFERENCE_SECTIONS = {REFERENCES}

# "1", "2.1", "3.2.1." or a Roman "IV." (Roman numerals need the dot: "I" alone is a word).
_NUMBER = re.compile(r"^(?:(?P<arabic>\d{1,2}(?:\.\d{1,2}){0,3})\.?|(?P<roman>[IVX]{1,5})\.)\s+(?P<rest>\S.*)$")
# Chinese numbering: "一、引言".
_CN_NUMBER = re.compile(r"^[一二三四五六七八九十]{1,3}[、.．]\s*(?P<rest>\S.*)$")
# "Appendix", "Appendix A", "Appendix B: Proofs".
_APPENDIX = re.compile(r"^(appendix|appendices)(\s+[A-Z0-9]{1,3}\b.*)?$", re.IGNORECASE)
# An abstract that starts on its heading line: "Abstract—We ...", "ABSTRACT: We ...", "Abstract. We ...".
_INLINE_ABSTRACT = re.compile(r"^(abstract|摘要)\s*[.:—–-]\s*\S", re.IGNORECASE)
# Numbered lines that are captions, or affiliation lists ("1 Univ. A 2 Univ. B"), not headings.
_NOT_A_TITLE = re.compile(r"^(?:fig(?:ure)?|table|tab|algorithm|eq(?:uation)?|step)\b|(?-i:\s\d+\s+[A-Z])", re.IGNORECASE)
# "R E F E R E N C E S": letter-spaced capitals.
_LETTER_SPACED = re.compile(r"^(?:\w ){3,}\w$")
_ROMAN = {"I": 1, "V": 5, "X": 10}
# A sentence ends at . ! ? (optionally closed by a quote or bracket) before whitespace and a
# capital, digit or opening bracket; a blank line ends a paragraph. CJK sentence ends need no space.
_SENTENCE_START = re.compile(
    r"(?:(?<=[.!?])[\"'”’)\]]*\s+(?=[A-Z0-9\"'“‘(\[])|\n[ \t\r\f]*\n\s*|(?<=[。！？])\s*)"
)


@dataclass(frozen=True)
class Section:
    """A span of a document's text under one heading: [start, end) in documents.text."""

    name: str
    start: int
    end: int

    @property
    def is_references(self) -> bool:
        return self.name in _REFERENCE_SECTIONS


def _roman_to_int(s: str) -> int:
    total = 0
    for i, ch in enumerate(s):
        v = _ROMAN[ch]
        total += -v if i + 1 < len(s) and _ROMAN[s[i + 1]] > v else v
    return total


def _normalise_title(title: str) -> str:
    title = title.strip().rstrip(":.").strip()
    if _LETTER_SPACED.match(title):
        title = title.replace(" ", "")
    return re.sub(r"\s+", " ", title)


def _known(title: str) -> str | None:
    key = _normalise_title(title).lower()
    if key in _KNOWN:
        return _KNOWN[key]
    if _APPENDIX.match(_normalise_title(title)):
        return "Appendix"
    return None


def _looks_like_title(title: str) -> bool:
    """Whether the text after a section number reads like a heading, not a table row or sentence."""
    title = title.strip()
    if not title or len(title) > 70 or not title[0].isupper():
        return False
    if title[-1] in ".,;:?" or len(title.split()) > 10 or "," in title:
        return False
    if _NOT_A_TITLE.search(title) or title.count("(") != title.count(")"):
        return False
    visible = [c for c in title if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return letters >= 0.75 * len(visible) and letters >= 3


class _HeadingDetector:
    """Decides line by line whether a line is a section heading, keeping numbering monotonic."""

    def __init__(self) -> None:
        self.last_number: tuple[int, ...] | None = None
        self.inline = False
        self.in_references = False

    def heading(self, line: str) -> str | None:
        """The section name if `line` is a heading; `self.inline` tells if its text goes on."""
        self.inline = False
        stripped = line.strip()
        if not stripped or len(stripped) > 90:
            return None
        if _INLINE_ABSTRACT.match(stripped):
            self.inline = True
            return self._enter("Abstract")
        known = _known(stripped)
        if known:
            return self._enter(known)
        cn = _CN_NUMBER.match(stripped)
        if cn and _known(cn.group("rest")):
            return self._enter(_known(cn.group("rest")))
        m = _NUMBER.match(stripped)
        if not m:
            return None
        rest = m.group("rest")
        if m.group("roman"):
            number: tuple[int, ...] = (_roman_to_int(m.group("roman")),)
        else:
            number = tuple(int(p) for p in m.group("arabic").split("."))
        known = _known(rest)
        # Inside References, numbered lines are citations: only a known heading ends the list.
        if self.in_references and not known:
            return None
        if not known and not (_looks_like_title(rest) and self._plausible(number)):
            return None
        self.last_number = number
        return self._enter(known or _normalise_title(rest))

    def _plausible(self, number: tuple[int, ...]) -> bool:
        # Numbered headings advance: a table row "3 Adam" after section 5 is not a heading,
        # and a paper starts at section 0, 1 or 2.
        if self.last_number is None:
            return number[0] <= 2
        return self.last_number < number and number[0] <= self.last_number[0] + 2

    def _enter(self, name: str) -> str:
        self.in_references = name in _REFERENCE_SECTIONS
        return name


def detect_sections(text: str, default: str = FRONT_MATTER) -> list[Section]:
    """The sections of a document's text, in order, covering all of it (headings included).

    Text before the first heading is the section `default`. A section starts at the start of
    its heading line, so the heading is part of the section's first chunk.
    """
    detector = _HeadingDetector()
    # (section start, name, where the text under the heading starts)
    starts: list[tuple[int, str, int]] = [(0, default, 0)]
    for m in re.finditer(r"[^\n]*\n?", text):
        if not m.group():
            break
        name = detector.heading(m.group().rstrip("\r\n\f"))
        if name is None:
            continue
        start, _, body = starts[-1]
        if not text[body : m.start()].strip():
            # Nothing under the previous heading ("4 Experiments" right before "4.1 Setup"):
            # the new heading continues that section, so no chunk is a bare heading.
            starts[-1] = (start, name, m.start() if detector.inline else m.end())
            continue
        starts.append((m.start(), name, m.start() if detector.inline else m.end()))
    bounds = [s for s, _, _ in starts[1:]] + [len(text)]
    return [Section(name, s, e) for (s, name, _), e in zip(starts, bounds, strict=True)]


class _Tokens:
    """One section tokenized once: token char offsets, word starts and sentence starts."""

    def __init__(self, offsets: Sequence[tuple[int, int]], word_start: list[bool], sent_start: list[bool]):
        self.offsets = offsets
        self.word_start = word_start
        self.sent_start = sent_start

    def __len__(self) -> int:
        return len(self.offsets)


_FALLBACK_TOKEN = re.compile(r"\w+|[^\w\s]")


def _tokenizer_of(count_tokens: Callable[[str], int]) -> Any:
    """The Hugging Face fast tokenizer behind `Embedder.count_tokens`, if that is what was passed."""
    tok = getattr(getattr(count_tokens, "__self__", None), "tokenizer", None)
    return tok if tok is not None and getattr(tok, "is_fast", False) else None


def _tokenize(texts: list[str], tokenizer: Any, count_tokens: Callable[[str], int]) -> list[_Tokens]:
    """Tokenize all sections of a document in one batched call (the hot path of chunking)."""
    out: list[_Tokens] = []
    if not texts:
        return out
    if tokenizer is not None:
        enc = tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
        )
        per_text = [(enc["offset_mapping"][i], enc.word_ids(i)) for i in range(len(texts))]
    else:
        # No tokenizer with offsets (a custom count_tokens): words and punctuation marks, each
        # standing for as many tokens as count_tokens gives it; every chunk is re-counted after.
        per_text = []
        pieces: dict[str, int] = {}
        for t in texts:
            offsets: list[tuple[int, int]] = []
            word_ids: list[int] = []
            for w, m in enumerate(_FALLBACK_TOKEN.finditer(t)):
                if m.group() not in pieces:
                    pieces[m.group()] = max(1, count_tokens(m.group()))
                offsets += [(m.start(), m.end())] * pieces[m.group()]
                word_ids += [w] * pieces[m.group()]
            per_text.append((offsets, word_ids))
    for text, (offsets, word_ids) in zip(texts, per_text, strict=True):
        sentence_chars = {m.end() for m in _SENTENCE_START.finditer(text)}
        word_start = [k == 0 or word_ids[k] != word_ids[k - 1] for k in range(len(offsets))]
        sent_start = [k == 0 or (word_start[k] and offsets[k][0] in sentence_chars) for k in range(len(offsets))]
        out.append(_Tokens([tuple(o) for o in offsets], word_start, sent_start))
    return out


def _windows(tokens: _Tokens, budget: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [i, j) of at most `budget` tokens, cut at sentence or word starts."""
    n = len(tokens)
    windows: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if n - i <= budget:
            windows.append((i, n))
            break
        limit = i + budget
        floor = i + max(1, budget // 2)
        # Cut before a sentence start in the second half of the window, else before any word.
        end = next((k for k in range(limit, floor - 1, -1) if tokens.sent_start[k]), None)
        if end is None:
            end = next((k for k in range(limit, i, -1) if tokens.word_start[k]), limit)
        windows.append((i, end))
        if overlap <= 0:
            i = end
            continue
        lo = max(i + 1, end - overlap)
        nxt = next((k for k in range(lo, end) if tokens.sent_start[k]), None)
        if nxt is None:
            nxt = next((k for k in range(lo, end + 1) if tokens.word_start[k]), end)
        i = nxt
    return windows


def _page_of(page_offsets: Sequence[int], char: int) -> int:
    """The 1-based page number holding character `char`."""
    if not page_offsets:
        return 1
    return max(1, bisect.bisect_right(page_offsets, char))


def _tokenizer_name(count_tokens: Callable[[str], int]) -> str:
    """What counts the tokens, independent of where the model is installed."""
    tok = getattr(getattr(count_tokens, "__self__", None), "tokenizer", None)
    if tok is not None:
        name = str(getattr(tok, "name_or_path", "") or type(tok).__name__).rstrip("/").rsplit("/", 1)[-1]
        return f"{name}:{len(tok) if hasattr(tok, '__len__') else ''}"
    return f"{getattr(count_tokens, '__module__', '')}.{getattr(count_tokens, '__qualname__', type(count_tokens).__name__)}"


def chunking_id(count_tokens: Callable[[str], int], max_tokens: int = 256, overlap_tokens: int = 32) -> str:
    """The id of one way of chunking: 16 hex digits of sha256 over the version, parameters and tokenizer."""
    spec = {"version": CHUNKER_VERSION, "max_tokens": int(max_tokens), "overlap_tokens": int(overlap_tokens),
            "tokenizer": _tokenizer_name(count_tokens)}
    return util.sha256_hex(json.dumps(spec, sort_keys=True))[:16]


def chunk_id_of(doc_id: str, ordinal: int, content_hash: str, chunking: str) -> str:
    """The identity of a chunk: sha256 of doc_id|ordinal|content_hash|chunking id."""
    return util.sha256_hex(f"{doc_id}|{ordinal}|{content_hash}|{chunking}")


def chunk_document(
    doc: Mapping[str, Any],
    count_tokens: Callable[[str], int],
    max_tokens: int = 256,
    overlap_tokens: int = 32,
) -> list[dict[str, Any]]:
    """Rows for `store.chunks` from one document row (needs doc_id, text, page_offsets).

    `count_tokens` counts word pieces without special tokens (`Embedder.count_tokens`); when it
    is bound to an Embedder, its fast tokenizer cuts sections by token offsets. Every chunk has
    at most `max_tokens - 2` content word pieces (checked with `count_tokens`), page numbers are
    1-based, and `text == documents.text[char_start:char_end]` (up to characters no database
    stores, NUL and lone surrogates, which a chunk holds as U+FFFD, one for one).
    """
    budget = max_tokens - SPECIAL_TOKENS
    if budget < 8:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for text; use at least {8 + SPECIAL_TOKENS}")
    if not 0 <= overlap_tokens < budget // 2:
        raise ValueError(f"overlap_tokens={overlap_tokens} must be >= 0 and below half of max_tokens - 2")
    doc_id = doc["doc_id"]
    text: str = util.pg_safe_text(doc.get("text") or "")
    chunking = chunking_id(count_tokens, max_tokens, overlap_tokens)
    page_offsets = doc.get("page_offsets") or "[]"
    if isinstance(page_offsets, str):
        page_offsets = json.loads(page_offsets)
    default = BODY if doc.get("source_kind") == "record" else FRONT_MATTER
    sections = [s for s in detect_sections(text, default) if text[s.start : s.end].strip()]
    tokenizer = _tokenizer_of(count_tokens)
    tokenized = _tokenize([text[s.start : s.end] for s in sections], tokenizer, count_tokens)

    spans: list[tuple[Section, int, int]] = []
    for section, tokens in zip(sections, tokenized, strict=True):
        for i, j in _windows(tokens, budget, overlap_tokens):
            spans.append((section, section.start + tokens.offsets[i][0], section.start + tokens.offsets[j - 1][1]))
    # Re-count every chunk as the model will see it: a cut inside a word (only a single "word"
    # longer than the budget forces one) can tokenize differently from the slice of tokens.
    counts = _count_all([text[a:b] for _, a, b in spans], count_tokens, tokenizer)
    checked = _fit(text, [(sec, a, b, n) for (sec, a, b), n in zip(spans, counts, strict=True)], budget, count_tokens)
    rows: list[dict[str, Any]] = []
    for section, a, b, n_tok in checked:
        chunk_text = text[a:b]
        content_hash = util.sha256_hex(chunk_text)
        ordinal = len(rows)
        rows.append(
            {
                "chunk_id": chunk_id_of(doc_id, ordinal, content_hash, chunking),
                "doc_id": doc_id,
                "shard": store.shard_of(doc_id),
                "ordinal": ordinal,
                "section": section.name,
                "is_references": section.is_references,
                "page_start": _page_of(page_offsets, a),
                "page_end": _page_of(page_offsets, b - 1),
                "char_start": a,
                "char_end": b,
                "n_tokens": n_tok,
                "content_hash": content_hash,
                "text": chunk_text,
                "chunking_id": chunking,
            }
        )
    return rows


def _fit(
    text: str, spans: list[tuple[Section, int, int, int]], budget: int, count_tokens: Callable[[str], int]
) -> list[tuple[Section, int, int, int]]:
    """Split any span over `budget` tokens in two (by characters), keeping all text the model sees."""
    out: list[tuple[Section, int, int, int]] = []
    pending = list(reversed(spans))
    while pending:
        section, a, b, n_tok = pending.pop()
        if n_tok == 0:
            continue  # only characters the model drops (control codes): nothing to embed
        if n_tok <= budget:
            out.append((section, a, b, n_tok))
            continue
        cut = a + max(1, (b - a) * budget // (n_tok + 1))
        head_end, tail_start = cut, cut
        while head_end > a + 1 and text[head_end - 1].isspace():
            head_end -= 1
        while tail_start < b and text[tail_start].isspace():
            tail_start += 1
        if tail_start < b:
            pending.append((section, tail_start, b, count_tokens(text[tail_start:b])))
        pending.append((section, a, head_end, count_tokens(text[a:head_end])))
    return out


def _count_all(texts: list[str], count_tokens: Callable[[str], int], tokenizer: Any) -> list[int]:
    if not texts:
        return []
    if tokenizer is not None:
        ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]
    return [count_tokens(t) for t in texts]


def chunk_documents(
    engine: Engine,
    count_tokens: Callable[[str], int],
    max_tokens: int = 256,
    overlap_tokens: int = 32,
) -> dict[str, int]:
    """Chunk every live document without chunks of this chunking; returns the counts.

    `documents_chunked` counts the documents that got chunks in this call, of which
    `documents_rechunked` had chunks of another chunking id (another version, parameters or
    tokenizer), which were replaced. Retired documents keep the chunks they have.

    Idempotent: a document's chunks are replaced in one transaction, so a crash leaves each
    document fully chunked or not at all, and a re-run picks up the rest. Chunks whose document
    is gone are removed (`chunks_removed`).
    """
    d, c = store.documents, store.chunks
    started = time.perf_counter()
    current = chunking_id(count_tokens, max_tokens, overlap_tokens)
    with engine.begin() as conn:
        orphans = conn.execute(
            sa.delete(c).where(~sa.exists().where(d.c.doc_id == c.c.doc_id))
        ).rowcount or 0
        todo = conn.execute(
            sa.select(d.c.doc_id)
            .where(LIVE, ~sa.exists().where(c.c.doc_id == d.c.doc_id, c.c.chunking_id == current))
            .order_by(d.c.doc_id)
        ).scalars().all()
        rechunk = set(conn.execute(
            sa.select(c.c.doc_id).distinct().where(sa.or_(c.c.chunking_id.is_(None), c.c.chunking_id != current))
        ).scalars())
    if rechunk & set(todo):
        logger.info("chunking %s: %d documents have chunks of another chunking and are re-chunked",
                 current, len(rechunk & set(todo)))
    documents_chunked = n_chunks = rechunked = 0
    cols = [d.c.doc_id, d.c.text, d.c.page_offsets, d.c.source_kind, d.c.title]
    group = 32
    for g in range(0, len(todo), group):
        ids = todo[g : g + group]
        with engine.connect() as conn:
            docs = conn.execute(sa.select(*cols).where(d.c.doc_id.in_(ids))).mappings().all()
        rows: list[dict[str, Any]] = []
        for doc in docs:
            mine = chunk_document(doc, count_tokens, max_tokens=max_tokens, overlap_tokens=overlap_tokens)
            # A document with no text has no chunks and is looked at again next time; it is
            # not counted, so an unchanged corpus reports zero work.
            documents_chunked += bool(mine)
            rechunked += doc["doc_id"] in rechunk
            rows += mine
        # One transaction per group of documents (thousands of one-page records would otherwise
        # cost a commit each); each document's chunks are still replaced all at once.
        with engine.begin() as conn:
            conn.execute(sa.delete(c).where(c.c.doc_id.in_([doc["doc_id"] for doc in docs])))
            store.upsert(conn, c, rows, ["chunk_id"])
        n_chunks += len(rows)
        logger.info("chunked %d/%d documents, %d chunks", min(g + group, len(todo)), len(todo), n_chunks)
    stats = {"documents_chunked": documents_chunked, "documents_rechunked": rechunked, "chunks": n_chunks,
             "chunks_removed": int(orphans)}
    logger.info("chunking done in %.1fs: %s", time.perf_counter() - started, stats)
    return stats
