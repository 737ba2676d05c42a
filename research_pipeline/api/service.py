"""The search API process: /healthz, /readyz, /metrics (Prometheus) and /search over the live index.

Started by `research-pipeline serve --port N`. Liveness (/healthz) only says the process
answers; readiness (/readyz) says the database is reachable and the live index generation
loads, so a load balancer sends no queries to a replica that cannot answer them.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from research_pipeline.config import Settings
from research_pipeline.lib.core import store
from research_pipeline.runtime import Runtime

MAX_K = 100


class NotReady(Exception):
    """The process cannot answer searches yet (no database, or no live generation)."""


def live_generation_info(engine: sa.Engine) -> dict[str, Any] | None:
    """The live generation's id and when it went live (published_at, else created_at), or None."""
    live = store.live_generation(engine)
    if live is None:
        return None
    return {"gen_id": live["gen_id"], "since": live["published_at"] or live["created_at"] or live["live_since"]}


class _CorpusCollector:
    """Gauges read from the store at scrape time, so every replica reports the same truth."""

    def __init__(self, app: SearchApp):
        self.app = app

    def collect(self):  # noqa: ANN201 - the prometheus_client collector protocol
        up = GaugeMetricFamily("rp_database_up", "1 when the corpus database answered this scrape")
        try:
            counts = store.counts(self.app.engine)
            live = live_generation_info(self.app.engine)
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
        age = GaugeMetricFamily(
            "rp_live_generation_age_seconds", "seconds since the live index generation went live (-1: none)"
        )
        if live is None or live["since"] is None:
            age.add_metric([], -1)
        else:
            age.add_metric([], (datetime.now(timezone.utc) - live["since"]).total_seconds())
        yield age


class SearchApp:
    """The state behind the HTTP handlers: the engine, the metrics and the live Searcher."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # Never creates the schema: a replica only reads (it may point at a read-only standby).
        self.runtime = Runtime(settings, create_schema=False)
        self.engine = self.runtime.engine
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "rp_search_latency_seconds",
            "time to answer /search",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.requests = Counter(
            "rp_search_requests", "/search requests by outcome", ["outcome"], registry=self.registry
        )
        self.cache_hits = Counter(
            "rp_search_cache_hits", "/search answers served from the query cache", registry=self.registry
        )
        self.registry.register(_CorpusCollector(self))
        # Redis when RP_REDIS_URL is set: shared by every replica and warmed after each publish.
        self.cache = self.runtime.query_cache
        self.query_log = self.runtime.query_log
        self._lock = threading.Lock()
        self._searcher = None
        self._searcher_gen: str | None = None

    def database_ok(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("select 1"))
        except Exception as exc:  # noqa: BLE001 - reported to the probe
            raise NotReady(f"database unreachable: {exc.__class__.__name__}: {exc}") from None

    def searcher(self):  # noqa: ANN201
        """The Searcher of the live generation; reloaded when the live pointer moves (publish/rollback)."""
        self.database_ok()
        live = live_generation_info(self.engine)
        if live is None:
            raise NotReady("no index generation is published yet: materialize reindex_job")
        with self._lock:
            if self._searcher is None or self._searcher_gen != live["gen_id"]:
                try:
                    self._searcher = self.runtime.open_searcher(live["gen_id"])
                except Exception as exc:  # noqa: BLE001 - any load failure means "not ready"
                    raise NotReady(
                        f"live generation {live['gen_id']} does not load: {exc.__class__.__name__}: {exc}"
                    ) from None
                self._searcher_gen = live["gen_id"]
            return self._searcher, self._searcher_gen

    def search(self, params: dict[str, list[str]]) -> tuple[int, dict]:
        """Answer one /search request: (HTTP status, JSON body). User text never causes a 500."""
        query = (params.get("q") or [""])[0]
        try:
            k = int((params.get("k") or ["10"])[0])
            year_min = _opt_int(params, "year_min")
            year_max = _opt_int(params, "year_max")
        except ValueError:
            self.requests.labels("bad_request").inc()
            return 400, {"error": "k, year_min and year_max must be integers"}
        if not 1 <= k <= MAX_K:
            self.requests.labels("bad_request").inc()
            return 400, {"error": f"k must be between 1 and {MAX_K}"}
        mode = (params.get("mode") or ["hybrid"])[0]
        if mode not in ("hybrid", "bm25", "dense"):
            self.requests.labels("bad_request").inc()
            return 400, {"error": "mode must be hybrid, bm25 or dense"}
        author = (params.get("author") or [None])[0]
        try:
            searcher, gen_id = self.searcher()
        except NotReady as exc:
            self.requests.labels("not_ready").inc()
            return 503, {"error": str(exc)}
        from research_pipeline.lib.search.cache import cached_search
        from research_pipeline.lib.search.searcher import SearchFilters

        filters = None
        if year_min is not None or year_max is not None or author:
            filters = SearchFilters(year_min=year_min, year_max=year_max, author=author)
        start = time.perf_counter()
        with self._lock:
            hits, cache_hit = cached_search(
                searcher, query, k=k, filters=filters, mode=mode,
                cache=self.cache, query_log=self.query_log, gen_id=gen_id,
            )
        elapsed = time.perf_counter() - start
        self.latency.observe(elapsed)
        self.requests.labels("ok").inc()
        if cache_hit:
            self.cache_hits.inc()
        return 200, {
            "query": query,
            "generation": gen_id,
            "latency_ms": round(elapsed * 1000, 2),
            "cache_hit": cache_hit,
            "results": hits,
        }

    def close(self) -> None:
        """Write the buffered query log and release the cache and database connections."""
        self.runtime.close()


def _opt_int(params: dict[str, list[str]], name: str) -> int | None:
    raw = (params.get(name) or [""])[0]
    return int(raw) if raw != "" else None


def make_handler(app: SearchApp) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to `app`."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "research-pipeline"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            # Probes hit every few seconds; access logs would drown everything else.
            return

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value: Any) -> None:
            self._send(status, json.dumps(value, default=str).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            parts = urlsplit(self.path)
            if parts.path == "/healthz":
                self._json(200, {"status": "ok"})
            elif parts.path == "/readyz":
                try:
                    _, gen_id = app.searcher()
                except NotReady as exc:
                    self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "not ready", "reason": str(exc)})
                else:
                    self._json(200, {"status": "ready", "generation": gen_id})
            elif parts.path == "/metrics":
                self._send(200, generate_latest(app.registry), CONTENT_TYPE_LATEST)
            elif parts.path == "/search":
                try:
                    status, body = app.search(parse_qs(parts.query))
                except Exception as exc:  # noqa: BLE001 - a bug must answer 500, not drop the connection
                    app.requests.labels("error").inc()
                    status, body = 500, {"error": f"{exc.__class__.__name__}: {exc}"}
                self._json(status, body)
            else:
                self._json(404, {"error": "not found; try /search?q=..., /healthz, /readyz or /metrics"})

    return Handler


class SearchServer(ThreadingHTTPServer):
    """The HTTP server with its SearchApp; `server_close` also closes the app."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: SearchApp):
        self.app = app
        super().__init__(address, make_handler(app))

    def server_close(self) -> None:
        super().server_close()
        self.app.close()


def make_server(settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> SearchServer:
    """The HTTP server (not started); port 0 picks a free port (see server.server_address)."""
    return SearchServer((host, port), SearchApp(settings))


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted (SIGINT or SIGTERM, as Kubernetes stops a pod)."""
    server = make_server(settings, host, port)
    # SIGTERM -> KeyboardInterrupt, so that the query log is flushed on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(
        f"research-pipeline: serving on http://{host}:{server.server_address[1]} (/search, /healthz, /readyz, /metrics)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
