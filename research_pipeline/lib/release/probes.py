"""Known-item probes: label-free queries drawn from a corpus, each answered by the paper it came from.

A seeded sample of documents (ordered by sha256(seed, doc_id), so the same corpus and seed
give the same sample on every backend) yields up to two probes per paper:

- ``title``: the paper's title (the easy probe: BM25 and the title field find it directly);
- ``sentence``: one sentence of the abstract (or of the opening text when there is none) with
  every word of the title removed, so the query shares no title term with its target.

A paper is skipped when its title is shared with another paper (the probe would have two right
answers) or its text is too short for a sentence to be a fraction of it. The probes are searched
in every mode (a hybrid ranking can hide a broken half) and scored by success@10 and MRR@10;
against the live generation the hybrid rankings are compared by rank-biased overlap.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util
from research_pipeline.lib.release import ir_metrics
from research_pipeline.lib.search.analyzer import analyze, query_words

logger = logging.getLogger(__name__)

#: Modes every probe is searched in.
PROBE_MODES: tuple[str, ...] = ("hybrid", "bm25", "dense")
#: A usable title has at least this many content words (fewer: a file name or a running head).
MIN_TITLE_WORDS = 3
#: A sentence probe keeps between these many words once the title's words are removed.
MIN_SENTENCE_WORDS, MAX_SENTENCE_WORDS = 8, 40
#: The document must be at least this many times longer than a sentence probe.
MIN_TEXT_RATIO = 3
#: Characters of a document's text read for its sentence when it has no abstract.
OPENING_CHARS = 6000

#: Share of a sentence probe's words that must be plain words (letters, optional trailing
#: punctuation), with at most one word holding a digit: keeps out affiliations, postal and
#: e-mail addresses, URLs and tables of numbers.
MIN_PROSE_SHARE = 0.8

_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")
_WORD = re.compile(r"\S+")
_PROSE_WORD = re.compile(r"^[(\"']?[^\W\d_]+(?:-[^\W\d_]+)*[)\"',.;:]*$")


@dataclass(frozen=True)
class KnownItemProbe:
    """A query whose one right answer is the paper `target` it was drawn from."""

    qid: str
    kind: str  # "title" or "sentence"
    text: str
    target: str


@dataclass
class ProbeRun:
    """The probes, their rankings (doc ids) per mode on the candidate, and on the live generation."""

    probes: list[KnownItemProbe]
    rankings: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: Hybrid rankings on the live generation, for the probes whose target it holds.
    live_rankings: dict[str, list[str]] | None = None
    #: "compared", "no live generation", "not compared: ..." or "unreadable: <reason>".
    live_status: str = "no live generation"


def _content_words(text: str) -> list[str]:
    return query_words(text)


def _order_key(seed: int | str, doc_id: str) -> str:
    return util.sha256_hex(f"{seed}:{doc_id}")


def sentence_probe(title: str, text: str, seed: int | str, doc_id: str) -> str | None:
    """One prose sentence of `text` with the words of `title` removed, chosen by the seed; None if none fits.

    A word is removed when its stemmed term is one of the title's terms, so "networks" goes
    when the title says "Network".
    """
    title_terms = set(analyze(title))
    fitting = []
    for i, sentence in enumerate(_SENTENCE_END.split(text)):
        kept = [w for w in _WORD.findall(sentence) if not (set(analyze(w)) & title_terms)]
        prose = (
            sum(1 for w in kept if _PROSE_WORD.match(w)) >= MIN_PROSE_SHARE * len(kept)
            and sum(1 for w in kept if any(ch.isdigit() for ch in w)) <= 1
        )
        if prose and len(_content_words(" ".join(kept))) >= MIN_SENTENCE_WORDS and len(kept) <= MAX_SENTENCE_WORDS:
            fitting.append((_order_key(seed, f"{doc_id}:{i}"), " ".join(kept)))
    return min(fitting)[1] if fitting else None


def _indexed_doc_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.select(store.chunks.c.doc_id).distinct())]


def _shared_titles(engine: Engine, titles: Iterable[str]) -> set[str]:
    """Which of the (lower-cased, stripped) `titles` more than one document carries."""
    d = store.documents
    wanted = sorted(set(titles))
    key = sa.func.lower(sa.func.trim(d.c.title))
    shared: set[str] = set()
    with engine.connect() as conn:
        for i in range(0, len(wanted), 500):
            stmt = sa.select(key).where(key.in_(wanted[i : i + 500])).group_by(key).having(sa.func.count() > 1)
            shared.update(r[0] for r in conn.execute(stmt))
    return shared


def draw_probes(engine: Engine, n_documents: int, seed: int | str = 0) -> list[KnownItemProbe]:
    """Known-item probes of up to `n_documents` searchable papers, sampled by `seed`."""
    if n_documents <= 0:
        raise ValueError(f"the probe sample needs at least one document, got {n_documents}: raise RP_GATE_PROBE_DOCUMENTS")
    ordered = sorted(_indexed_doc_ids(engine), key=lambda doc_id: _order_key(seed, doc_id))
    d = store.documents
    probes: list[KnownItemProbe] = []
    used = 0
    batch = max(2 * n_documents, 50)
    for start in range(0, len(ordered), batch):
        ids = ordered[start : start + batch]
        with engine.connect() as conn:
            rows = {
                r.doc_id: r
                for r in conn.execute(
                    sa.select(d.c.doc_id, d.c.title, d.c.abstract, sa.func.substr(d.c.text, 1, OPENING_CHARS).label("opening"),
                              sa.func.length(d.c.text).label("text_chars")).where(d.c.doc_id.in_(ids))
                )
            }
        shared = _shared_titles(engine, [(r.title or "").strip().lower() for r in rows.values() if r.title])
        for doc_id in ids:
            row = rows.get(doc_id)
            if row is None:
                continue
            title = (row.title or "").strip()
            if len(_content_words(title)) < MIN_TITLE_WORDS or title.lower() in shared:
                continue
            drawn = [KnownItemProbe(f"title:{doc_id[:16]}", "title", title, doc_id)]
            source = (row.abstract or "").strip() or (row.opening or "")
            sentence = sentence_probe(title, source, seed, doc_id)
            # The document must be more than the query: a sentence that is most of a short
            # abstract-only record would find it trivially.
            if sentence and (row.text_chars or 0) >= MIN_TEXT_RATIO * len(sentence):
                drawn.append(KnownItemProbe(f"sentence:{doc_id[:16]}", "sentence", sentence, doc_id))
            probes.extend(drawn)
            used += 1
            if used >= n_documents:
                return probes
    return probes


def search_probes(
    searcher: Any, probes: Sequence[KnownItemProbe], modes: Sequence[str] = PROBE_MODES, k: int = 10
) -> dict[str, dict[str, list[str]]]:
    """The top-`k` doc ids of every probe in every mode: {mode: {qid: [doc_id, ...]}}."""
    out: dict[str, dict[str, list[str]]] = {}
    for mode in modes:
        out[mode] = {p.qid: [h.doc_id for h in searcher.search(p.text, k=k, mode=mode)] for p in probes}
    return out


def doc_ids_in_index(engine: Engine, vector_index: Any, doc_ids: Iterable[str]) -> set[str]:
    """Which of `doc_ids` have a chunk among the rows of `vector_index` (a generation's papers)."""
    wanted = sorted(set(doc_ids))
    indexed = set(vector_index.chunk_ids)
    c = store.chunks
    found: set[str] = set()
    with engine.connect() as conn:
        for i in range(0, len(wanted), 500):
            stmt = sa.select(c.c.doc_id, c.c.chunk_id).where(c.c.doc_id.in_(wanted[i : i + 500]))
            found.update(doc_id for doc_id, chunk_id in conn.execute(stmt) if chunk_id in indexed)
    return found


def scores(
    rankings: Mapping[str, Sequence[str]], probes: Sequence[KnownItemProbe], k: int = 10
) -> dict[str, float]:
    """Mean success@k and MRR@k of `rankings` over `probes` (an unranked probe scores 0)."""
    if not probes:
        return {"success": 0.0, "mrr": 0.0}
    success = [ir_metrics.success_at_k(rankings.get(p.qid, []), {p.target: 1}, k) for p in probes]
    mrr = [ir_metrics.mrr_at_k(rankings.get(p.qid, []), {p.target: 1}, k) for p in probes]
    return {"success": sum(success) / len(probes), "mrr": sum(mrr) / len(probes)}


def mean_rbo(
    a: Mapping[str, Sequence[str]], b: Mapping[str, Sequence[str]], qids: Iterable[str], p: float = 0.9, k: int = 10
) -> float:
    """Mean rank-biased overlap of the rankings of `qids` in `a` and `b`."""
    qids = list(qids)
    if not qids:
        return 0.0
    return sum(ir_metrics.rank_biased_overlap(a.get(q, []), b.get(q, []), p, k) for q in qids) / len(qids)
