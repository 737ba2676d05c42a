"""Retrieval metrics and the percentile: the one definition of each that gates, evaluation and
the query log use (docs/RELEASE_GATES.md, "Metrics").

nDCG@k uses gain = relevance grade and a log2(rank + 1) discount, with the ideal ranking taken
from all judged documents of the query; judgments <= 0 count as not relevant (as pytrec_eval /
BEIR). Percentiles interpolate linearly between the closest ranks (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """Normalised discounted cumulative gain of the first `k` ranked ids."""
    dcg = sum(max(qrels.get(doc, 0), 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((r for r in qrels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mean_ndcg(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], k: int = 10) -> float:
    """Mean nDCG@k over the queries of `qrels` (a query without a ranking scores 0)."""
    if not qrels:
        return 0.0
    return sum(ndcg_at_k(rankings.get(q, []), rel, k) for q, rel in qrels.items()) / len(qrels)


def recall_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 100) -> float:
    """Share of the relevant ids found in the first `k`."""
    relevant = {d for d, r in qrels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """1 / rank of the first relevant id within the first `k`, else 0."""
    for i, doc in enumerate(ranked[:k]):
        if qrels.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def success_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """1.0 if a relevant id is within the first `k`, else 0.0."""
    return 1.0 if mrr_at_k(ranked, qrels, k) > 0 else 0.0


def rank_biased_overlap(a: Sequence[str], b: Sequence[str], p: float = 0.9, k: int = 10) -> float:
    """Extrapolated rank-biased overlap of the first `k` ids of two rankings (1 = same order).

    RBO_ext of Webber, Moffat and Zobel (2010), eq. 32, at depth k: the agreement at each depth
    d is |A[:d] & B[:d]| / d, weighted by p^(d-1); the agreement at depth k is assumed to hold
    below it. Rankings of different lengths are compared to the shorter one's depth. Two empty
    rankings agree (1.0); one empty ranking against another does not (0.0).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"rank-biased overlap needs 0 < p < 1, got {p}")
    a, b = list(dict.fromkeys(a[:k])), list(dict.fromkeys(b[:k]))
    depth = min(len(a), len(b))
    if depth == 0:
        return 1.0 if not a and not b else 0.0
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    overlap = 0
    weighted = 0.0
    for d in range(1, depth + 1):
        x, y = a[d - 1], b[d - 1]
        if x == y:
            overlap += 1
        else:
            overlap += (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        weighted += overlap / d * p**d
    return float(overlap / depth * p**depth + (1.0 - p) / p * weighted)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks; 0.0 for no values."""
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=float), q))


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of `values` by `percentile` (zeros for an empty list)."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": float(max(values)),
    }
