"""The search service's Prometheus metrics: request counters, the latency histogram, corpus gauges.

One process (`--workers 1`, the Kubernetes shape: scale with replicas) keeps its metrics in its
own registry. With several uvicorn workers on one port a scrape reaches one worker at random,
so per-worker scraping cannot work: the workers then write their counters to
prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, set by `serve` for its
workers) and every scrape sums all of them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from research_pipeline.lib.core import store
from research_pipeline.ops.metrics import MemoryLimitCollector

#: Seconds; 2.0 separates "slow" from "timed out" at the default 10 s request timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0)


def live_generation_info(engine: sa.Engine) -> dict[str, Any] | None:
    """The live generation's id and when it went live (published_at, else created_at), or None."""
    live = store.live_generation(engine)
    if live is None:
        return None
    return {"gen_id": live["gen_id"], "since": live["published_at"] or live["created_at"] or live["live_since"]}


class CorpusCollector:
    """Gauges read from the store at scrape time, so every replica reports the same truth."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def collect(self):
        up = GaugeMetricFamily("rp_database_up", "1 when the corpus database answered this scrape")
        try:
            counts = store.counts(self.engine)
            live = live_generation_info(self.engine)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, help_text in (
            ("documents", "documents in the corpus"),
            ("chunks", "chunks in the corpus"),
            ("embeddings", "stored chunk embeddings (all models)"),
            ("pages", "pages over all documents"),
        ):
            gauge = GaugeMetricFamily(f"rp_{name}", help_text)
            gauge.add_metric([], counts[name])
            yield gauge
        quarantine = GaugeMetricFamily("rp_quarantined", "files in quarantine by reason", labels=["reason"])
        for reason, n in counts["quarantine"].items():
            quarantine.add_metric([reason], n)
        yield quarantine
        # Absent (not -1) when nothing is live: the NoLiveGeneration alert keys on its absence.
        if live is not None and live["since"] is not None:
            age = GaugeMetricFamily(
                "rp_live_generation_age_seconds", "seconds since the live index generation went live"
            )
            age.add_metric([], (datetime.now(UTC) - live["since"]).total_seconds())
            yield age


class ServiceMetrics:
    """The counters and histogram of one service process, and the registry a scrape reads."""

    def __init__(self, engine: sa.Engine, multiprocess: bool = False):
        # In multiprocess mode the values live in files; the metric objects must not also sit
        # in the scrape registry, or every sample would be reported twice.
        own = None if multiprocess else CollectorRegistry()
        self.registry = CollectorRegistry() if multiprocess else own
        if multiprocess:
            from prometheus_client import multiprocess as mp

            mp.MultiProcessCollector(self.registry)
        self.latency = Histogram(
            "rp_search_latency_seconds", "time to answer /search", buckets=LATENCY_BUCKETS, registry=own
        )
        self.requests = Counter("rp_search_requests", "/search requests by outcome", ["outcome"], registry=own)
        self.cache_hits = Counter(
            "rp_search_cache_hits", "/search answers served from the query cache", registry=own
        )
        self.http = Counter(
            "rp_http_requests", "HTTP answers by route and status (the 5xx-rate alert's numerator and denominator)",
            ["route", "status"], registry=own,
        )
        self.errors = Counter(
            "rp_http_errors", "HTTP answers of 4xx and 5xx by route and status", ["route", "status"], registry=own
        )
        self.rejected = Counter(
            "rp_search_rejected", "searches refused with 503 because the search queue was full", registry=own
        )
        self.admitted = Gauge(
            "rp_search_admitted", "searches this process is running or holding for a search thread (saturation)",
            registry=own, multiprocess_mode="livesum",
        )
        self.registry.register(CorpusCollector(engine))
        # RSS, CPU and open fds of this process, and its memory limit: the 85% memory alert.
        ProcessCollector(registry=self.registry)
        self.registry.register(MemoryLimitCollector())

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
