"""BM25 as FTS5's ``bm25()`` computes it, for both full-text backends.

Per-term IDF, field-weighted term frequency, k1=1.2, b=0.75 over the whole row length. Scores
are rounded to `SCORE_DECIMALS` and ties go to the lower row id, so the backends (whose
summation order differs in the last bits) return the same ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Field weights title > abstract > body (tuned on SciFact train, see docs/SEARCH.md).
FIELD_WEIGHTS: dict[str, float] = {"title": 2.0, "abstract": 1.0, "body": 1.0}
FIELDS = ("title", "abstract", "body")

#: BM25 constants: FTS5's built-in values, used on both backends so they rank alike.
K1 = 1.2
B = 0.75
#: Scores are compared at this many decimals, so last-bit differences never reorder results.
SCORE_DECIMALS = 9
#: Extra rows read past `k`, so that near-ties at the cut are settled by `top`, not the backend.
TIE_MARGIN = 16


@dataclass(frozen=True)
class Stats:
    """What BM25 needs of the whole table: row count, mean row length, IDF of the query terms."""

    n: int
    avgdl: float
    idf: dict[str, float]


def idf(n: int, ndoc: int) -> float:
    """FTS5's IDF: log((N - n + 0.5) / (n + 0.5)), floored at 1e-6 for very common terms."""
    value = math.log((n - ndoc + 0.5) / (ndoc + 0.5))
    return value if value > 0.0 else 1e-6


def term_score(stats: Stats, term: str, f: float, dl: int) -> float:
    """One term's BM25 share, written as FTS5's bm25() evaluates it (f: field-weighted count)."""
    return stats.idf[term] * ((f * (K1 + 1.0)) / (f + K1 * (1 - B + B * dl / stats.avgdl)))


def top(rows: list[tuple[str, int, float]], k: int) -> list[tuple[str, float]]:
    """The `k` best (chunk_id, score) of (chunk_id, row id, raw score) rows, scores rounded to
    `SCORE_DECIMALS` and ties broken by row id: the same order on both backends."""
    ranked = sorted(((round(float(s), SCORE_DECIMALS), rid, cid) for cid, rid, s in rows), key=lambda r: (-r[0], r[1]))
    return [(cid, score) for score, _, cid in ranked[:k]]
