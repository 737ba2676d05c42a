"""Hybrid paper search: BM25 (full-text index) and dense (FAISS) candidates fused per chunk,
then grouped per paper with the best chunk as the snippet.

Fusion is either reciprocal-rank fusion (``fusion='rrf'``: sum of 1/(rrf_k + rank)) or
normalised-score fusion (``fusion='score'``: per-list min-max or z-score, weighted
``alpha * dense + (1 - alpha) * bm25``). The shipped default is the one with the better
nDCG@10 on the SciFact *train* split (research_pipeline/data/search_tuning.json, figures in
docs/SEARCH.md). Chunks of a References section count `references_weight` times as much, so
a paper is not found because it cites the words. Filters (year range, author substring,
source kind) are applied in SQL on documents.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store
from research_pipeline.lib.search.analyzer import MAX_QUERY_CHARS, query_words
from research_pipeline.lib.search.fts import fts_search

MODES = ("hybrid", "bm25", "dense")

#: Fusion parameters tuned on SciFact train, shipped as package data.
TUNING_FILE = Path(__file__).resolve().parents[2] / "data" / "search_tuning.json"

#: Used when the packaged tuning file is absent; every key can be overridden per Searcher.
BASE_TUNING: dict[str, Any] = {
    "fusion": "rrf",  # rrf | score
    "rrf_k": 60,
    "norm": "minmax",  # for fusion='score': minmax | zscore
    "alpha": 0.5,  # for fusion='score': weight of the dense list
    "depth": 100,  # candidates taken from each list
    "references_weight": 0.5,
    "snippet_chars": 280,
    "field_weights": None,  # BM25 weights {title, abstract, body}; None: bm25.FIELD_WEIGHTS
}

#: With filters, candidates are drawn this many times deeper so that enough survive them.
FILTER_DEPTH_FACTOR = 5

_WORD_RE = re.compile(r"[^\W_]+")

# The dense list (query encoding + FAISS) runs beside the full-text query: torch, SQLite and
# psycopg all release the GIL, so a hybrid search costs the slower of the two, not their sum.
_DENSE_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rp-dense")


@lru_cache(maxsize=1)
def default_tuning() -> dict[str, Any]:
    """The shipped fusion parameters (package data), over `BASE_TUNING`."""
    tuning = dict(BASE_TUNING)
    if TUNING_FILE.is_file():
        tuning.update(json.loads(TUNING_FILE.read_text("utf-8")).get("params", {}))
    return tuning


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions on the papers a search may return."""

    year_min: int | None = None
    year_max: int | None = None
    author: str | None = None  # case-insensitive substring of any author name
    source: str | None = None  # documents.source_kind: pdf | record

    def is_empty(self) -> bool:
        return self.year_min is None and self.year_max is None and not self.author and not self.source


@dataclass
class PaperHit:
    """One paper in a result list, with its best-matching chunk."""

    doc_id: str
    title: str | None
    year: int | None
    authors: list[str]
    score: float
    chunk_id: str
    section: str
    page_start: int
    snippet: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        return out


def _parse_authors(raw: str | None) -> list[str]:
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return [raw]
    if isinstance(value, list):
        return [str(a) for a in value]
    return [str(value)]


def _normalise(scores: list[float], norm: str) -> list[float]:
    if not scores:
        return []
    if norm == "zscore":
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
        return [(s - mean) / std if std > 0 else 0.0 for s in scores]
    lo, hi = min(scores), max(scores)
    return [(s - lo) / (hi - lo) if hi > lo else 1.0 for s in scores]


def make_snippet(text: str, terms: list[str], width: int) -> str:
    """A window of about `width` characters of `text` around the first query term it contains."""
    lower = text.lower()
    first = min((p for p in (lower.find(t) for t in terms) if p >= 0), default=0)
    # Flatten whitespace only in a window around the hit: chunks can be long.
    lo = max(0, first - width)
    window = text[lo : first + 2 * width]
    lead = len(" ".join(text[lo:first].split())) + (1 if lo < first and text[first - 1].isspace() else 0)
    flat = " ".join(window.split())
    cut_left, cut_right = lo > 0, first + 2 * width < len(text)
    if len(flat) <= width and not (cut_left or cut_right):
        return flat
    start = max(0, lead - width // 4)
    if start > 0 or cut_left:
        space = flat.find(" ", start)
        start = space + 1 if 0 <= space < lead else start
    end = min(len(flat), start + width)
    if end < len(flat):
        space = flat.rfind(" ", start, end)
        end = space if space > start else end
    left = "…" if (start > 0 or cut_left) else ""
    right = "…" if (end < len(flat) or cut_right) else ""
    return left + flat[start:end] + right


class Searcher:
    """Searches one generation: a full-text index, a vector index and the embedding model.

    The full-text list comes from `fulltext` (an opened `fts_tantivy.FulltextIndex`) when given,
    else from the SQL full-text table `fts_table`.
    """

    def __init__(self, engine: Engine, fts_table: str | None, vector_index, embedder, fulltext=None, **tuning: Any):  # noqa: ANN001
        self.engine = engine
        self.fts_table = fts_table
        self.fulltext = fulltext
        self.vector_index = vector_index
        self.embedder = embedder
        unknown = set(tuning) - set(BASE_TUNING)
        if unknown:
            raise ValueError(f"unknown search tuning keys {sorted(unknown)}; known: {sorted(BASE_TUNING)}")
        self.tuning = {**default_tuning(), **tuning}
        if self.tuning["fusion"] not in ("rrf", "score"):
            raise ValueError(f"fusion must be 'rrf' or 'score', got {self.tuning['fusion']!r}")
        if self.tuning["norm"] not in ("minmax", "zscore"):
            raise ValueError(f"norm must be 'minmax' or 'zscore', got {self.tuning['norm']!r}")
        if fulltext is not None and not fulltext.accepts(self.tuning["field_weights"]):
            if not fts_table:
                raise ValueError(
                    f"field weights {self.tuning['field_weights']} differ from the ones the full-text index "
                    f"was built with ({fulltext.weights}) and there is no SQL table to search instead"
                )
            self.fulltext = None  # query-time weights: the SQL table scores them

    @property
    def fulltext_engine(self) -> str | None:
        """What answers the full-text list: "tantivy", the SQL dialect, or None."""
        if self.fulltext is not None:
            return "tantivy"
        return self.engine.dialect.name if self.fts_table else None

    # -- candidate lists ------------------------------------------------------------------

    def _bm25(self, query: str, depth: int) -> list[tuple[str, float]]:
        if self.fulltext is not None:
            return self.fulltext.search(query, k=depth)
        if not self.fts_table:
            return []
        return fts_search(self.engine, self.fts_table, query, k=depth, weights=self.tuning["field_weights"])

    def _dense(self, query: str, depth: int) -> list[tuple[str, float]]:
        if self.vector_index is None or self.embedder is None:
            return []
        vec = np.asarray(self.embedder.encode_query(query), dtype=np.float32)
        return self.vector_index.search(vec, depth)

    def _chunk_rows(self, chunk_ids: list[str], filters: SearchFilters | None) -> dict[str, Mapping[str, Any]]:
        c, d = store.chunks, store.documents
        stmt = (
            sa.select(c.c.chunk_id, c.c.doc_id, c.c.is_references)
            .join(d, d.c.doc_id == c.c.doc_id)
            .where(c.c.chunk_id.in_(sa.bindparam("ids", expanding=True)))
        )
        if filters is not None:
            if filters.year_min is not None:
                stmt = stmt.where(d.c.year >= int(filters.year_min))
            if filters.year_max is not None:
                stmt = stmt.where(d.c.year <= int(filters.year_max))
            if filters.author:
                stmt = stmt.where(sa.func.lower(d.c.authors).contains(filters.author.lower(), autoescape=True))
            if filters.source:
                stmt = stmt.where(d.c.source_kind == filters.source)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt, {"ids": chunk_ids}).mappings().all() if chunk_ids else []
        return {r["chunk_id"]: r for r in rows}

    def _hit_rows(self, chunk_ids: list[str]) -> dict[str, Mapping[str, Any]]:
        c, d = store.chunks, store.documents
        stmt = (
            sa.select(
                c.c.chunk_id, c.c.section, c.c.page_start, c.c.text,
                d.c.title, d.c.year, d.c.authors, d.c.source_kind,
            )
            .join(d, d.c.doc_id == c.c.doc_id)
            .where(c.c.chunk_id.in_(sa.bindparam("ids", expanding=True)))
        )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt, {"ids": chunk_ids}).mappings().all() if chunk_ids else []
        return {r["chunk_id"]: r for r in rows}

    # -- fusion ---------------------------------------------------------------------------

    def _fuse(
        self, lists: list[list[tuple[str, float]]], rows: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, float]:
        t = self.tuning
        fused: dict[str, float] = {}
        weights = [1.0] * len(lists)
        if t["fusion"] == "score" and len(lists) == 2:
            weights = [1.0 - float(t["alpha"]), float(t["alpha"])]
        for weight, ranked in zip(weights, lists):
            kept = [(cid, s) for cid, s in ranked if cid in rows]
            if not kept:
                continue
            if t["fusion"] == "rrf":
                contrib = [1.0 / (float(t["rrf_k"]) + rank) for rank in range(1, len(kept) + 1)]
                floor = 0.0
            else:
                contrib = _normalise([s for _, s in kept], t["norm"])
                floor = min(contrib) if t["norm"] == "zscore" else 0.0
            for (cid, _), value in zip(kept, contrib):
                fused[cid] = fused.get(cid, 0.0) + weight * (value - floor)
        ref_w = float(t["references_weight"])
        return {cid: s * ref_w if rows[cid]["is_references"] else s for cid, s in fused.items()}

    # -- public ---------------------------------------------------------------------------

    def search(
        self, query: str, k: int = 10, filters: SearchFilters | None = None, mode: str = "hybrid"
    ) -> list[PaperHit]:
        """The `k` best papers for `query`, best first; [] for an empty or wordless query."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(query, str):
            return []
        query = query[:MAX_QUERY_CHARS].replace("\x00", " ")
        if not _WORD_RE.search(query) or int(k) <= 0:
            return []
        k = int(k)
        if filters is not None and filters.is_empty():
            filters = None
        depth = max(int(self.tuning["depth"]), 2 * k)
        if filters is not None:
            depth *= FILTER_DEPTH_FACTOR
        dense = _DENSE_POOL.submit(self._dense, query, depth) if mode in ("hybrid", "dense") else None
        lists = []
        if mode in ("hybrid", "bm25"):
            lists.append(self._bm25(query, depth))
        if dense is not None:
            lists.append(dense.result())
        candidates = list(dict.fromkeys(cid for ranked in lists for cid, _ in ranked))
        rows = self._chunk_rows(candidates, filters)
        fused = self._fuse(lists, rows)

        best: dict[str, tuple[float, str]] = {}
        for cid, score in fused.items():
            doc_id = rows[cid]["doc_id"]
            if doc_id not in best or score > best[doc_id][0]:
                best[doc_id] = (score, cid)
        ranked_docs = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]

        terms = query_words(query)
        width = int(self.tuning["snippet_chars"])
        details = self._hit_rows([cid for _, (_, cid) in ranked_docs])
        hits = []
        for doc_id, (score, cid) in ranked_docs:
            r = details.get(cid)
            if r is None:  # the chunk was replaced between the two reads
                continue
            hits.append(
                PaperHit(
                    doc_id=doc_id,
                    title=r["title"],
                    year=r["year"],
                    authors=_parse_authors(r["authors"]),
                    score=round(float(score), 6),
                    chunk_id=cid,
                    section=r["section"],
                    page_start=int(r["page_start"]),
                    snippet=make_snippet(r["text"], terms, width),
                    extra={"source_kind": r["source_kind"]},
                )
            )
        return hits
