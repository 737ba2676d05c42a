"""The thresholds of the release gates: declared once, here (plain data, no heavy imports).

`research_pipeline.config` reads each field from the environment; the Dagster resource's
config schema is made from these fields; `gates.py` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GateThresholds:
    """Thresholds of every release gate; config.py reads each from RP_GATE_<FIELD> (or its `env`)."""

    min_documents: int = 1
    max_document_drop_share: float = field(default=0.10, metadata={"env": "RP_GATE_MAX_DOCUMENT_DROP"})
    latency_p95_ms: float = 250.0
    ndcg_floor: float = 0.30
    ndcg_max_regression: float = 0.05
    # Known-item probes drawn from the candidate corpus (the quality gate on every corpus).
    probe_documents: int = 50
    probe_seed: int = 0
    probe_min_success_at_10: float = 0.60  # in each of hybrid, bm25 and dense
    probe_min_mrr_at_10: float = 0.40  # hybrid
    probe_min_rbo: float = 0.60  # hybrid rankings vs the live generation's
    probe_max_success_drop: float = 0.05  # hybrid success@10 vs the live generation's
    # Advisory only.
    max_quarantine_share: float = 0.25
    min_median_quality: float = 0.80
    max_staleness_hours: float = 7 * 24.0
