"""The search service: a Starlette app (served by uvicorn) over the live index generation.

Routes: `/` (the search page), `/search` (JSON), `/papers/{doc_id}.pdf`, `/healthz`, `/readyz`,
`/metrics` and `/openapi.json`. Started by `research-pipeline serve [--workers N]`.

Concurrency: searches are CPU-bound, so each process runs them on its own bounded thread pool
(`concurrency` threads); at most `queue` more wait for a thread, and a search beyond that is
refused at once with 503 and Retry-After instead of piling up. There is no global lock: the
Searcher only reads (SQLAlchemy's pool, FAISS and torch inference are thread-safe). A request
that takes longer than `timeout_s` answers 504 (its thread finishes the search and frees its
slot; the bounded pool keeps abandoned work from accumulating).

Probes never wait behind searches: a background task refreshes the readiness state (database
reachable, live pointer, Searcher loaded; a moved pointer loads the new generation beside the
old one and swaps it in) on its own thread every `readiness_interval_s`; /readyz only reads it.

Shutdown: SIGTERM first turns readiness false (`draining`) and keeps serving for `drain_s`, so
that load balancers stop sending new requests; then uvicorn stops accepting, lets in-flight
requests finish and the lifespan closes the runtime (which flushes the query log).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders, QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from research_pipeline import logs
from research_pipeline.api import page, papers
from research_pipeline.api.metrics import ServiceMetrics, live_generation_info
from research_pipeline.config import Settings
from research_pipeline.lib.core.util import redact_url
from research_pipeline.runtime import Runtime

log = logging.getLogger(__name__)
access_log = logging.getLogger("research_pipeline.api.access")

MAX_K = 100
#: Years outside this range are typing errors; SQLite raises OverflowError beyond 64 bits.
YEAR_RANGE = (0, 9999)
MAX_AUTHOR_CHARS = 200
MODES = ("hybrid", "bm25", "dense")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Worker processes by default: one per usable core, at most 4 (1 on a single core)."""
    return max(1, min(usable_cores(), 4))


@dataclass(frozen=True)
class ServiceOptions:
    """How one service process schedules work: search threads, queue, timeouts, drain."""

    concurrency: int = 2
    queue: int = 16
    timeout_s: float = 10.0
    drain_s: float = 5.0
    readiness_interval_s: float = 1.0
    multiprocess_metrics: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.queue < 0 or self.timeout_s <= 0 or self.drain_s < 0:
            raise ValueError(f"bad service options: {self}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ServiceOptions:
        """Options from the configuration (RP_SEARCH_*); `overrides` win (the CLI's flags)."""
        values = {
            "concurrency": settings.search_concurrency or max(2, usable_cores()),
            "queue": settings.search_queue,
            "timeout_s": settings.search_timeout_s,
            "drain_s": settings.search_drain_s,
        }
        return cls(**{**values, **overrides})


def _one_torch_thread() -> None:
    """Each search thread encodes on one intra-op thread: the parallelism is the pool's.

    Set in the thread itself (OpenMP keeps the count per thread once a thread has its own).
    """
    import torch

    torch.set_num_threads(1)


class BadRequest(Exception):
    """A request parameter is invalid; the message says which and what is expected."""


class Busy(Exception):
    """Every search thread is busy and the queue is full."""


@dataclass(frozen=True)
class SearchParams:
    """The validated parameters of one search."""

    q: str
    k: int
    mode: str
    year_min: int | None
    year_max: int | None
    author: str | None

    def filters(self) -> Any:
        from research_pipeline.lib.search.searcher import SearchFilters

        if self.year_min is None and self.year_max is None and not self.author:
            return None
        return SearchFilters(year_min=self.year_min, year_max=self.year_max, author=self.author)


def _int_param(params: QueryParams, name: str, default: int | None, lo: int, hi: int, what: str) -> int | None:
    raw = params.get(name, "").strip()
    if raw == "":
        return default
    if not re.fullmatch(r"[+-]?\d{1,12}", raw):
        raise BadRequest(f"{name} must be {what}, got {raw[:40]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be {what}, got {value}")
    return value


def parse_search_params(params: QueryParams, max_k: int = MAX_K) -> SearchParams:
    """The search parameters of a query string; BadRequest says what is wrong."""
    k = _int_param(params, "k", 10, 1, max_k, f"an integer between 1 and {max_k}")
    years = f"a year between {YEAR_RANGE[0]} and {YEAR_RANGE[1]}"
    year_min = _int_param(params, "year_min", None, *YEAR_RANGE, years)
    year_max = _int_param(params, "year_max", None, *YEAR_RANGE, years)
    if year_min is not None and year_max is not None and year_min > year_max:
        raise BadRequest(f"year_min ({year_min}) is after year_max ({year_max})")
    mode = params.get("mode", "") or "hybrid"
    if mode not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)}, got {mode[:40]!r}")
    author = params.get("author", "").strip() or None
    if author is not None:
        if len(author) > MAX_AUTHOR_CHARS:
            raise BadRequest(f"author must be at most {MAX_AUTHOR_CHARS} characters")
        # PostgreSQL text cannot hold NUL; no author name contains one.
        author = author.replace("\x00", "").strip() or None
    return SearchParams(params.get("q", ""), k, mode, year_min, year_max, author)


@dataclass
class Readiness:
    """The last readiness check: whether searches can be answered, and why not."""

    ready: bool = False
    reason: str = "starting"
    gen_id: str | None = None
    checked_at: float = 0.0


class SearchService:
    """The state behind the routes: runtime, metrics, the live Searcher and the search pool."""

    def __init__(self, settings: Settings, options: ServiceOptions | None = None):
        self.settings = settings
        self.options = options or ServiceOptions.from_settings(settings)
        # Never creates the schema: a replica only reads (it may point at a read-only standby).
        # One intra-op torch thread per search: the service's parallelism is its search pool.
        self.runtime = Runtime(settings, create_schema=False, embed_threads=1)
        self.engine = self.runtime.engine
        self.metrics = ServiceMetrics(self.engine, multiprocess=self.options.multiprocess_metrics)
        self.cache = self.runtime.query_cache
        self.query_log = self.runtime.query_log
        self.pool = ThreadPoolExecutor(
            self.options.concurrency, thread_name_prefix="rp-search", initializer=_one_torch_thread
        )
        # Probes and PDF reads get their own threads: they must not queue behind searches.
        self.side_pool = ThreadPoolExecutor(2, thread_name_prefix="rp-side")
        self.readiness = Readiness()
        self.draining = False
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._searcher: Any = None
        self._refresh_lock = threading.Lock()

    # -- readiness ---------------------------------------------------------------------------

    def refresh(self) -> Readiness:
        """Check the database and the live pointer; load the live generation's Searcher if it moved."""
        with self._refresh_lock:
            try:
                with self.engine.connect() as conn:
                    conn.execute(sa.text("select 1"))
                live = live_generation_info(self.engine)
            except Exception as exc:  # noqa: BLE001 - reported to the probe
                state = Readiness(
                    False,
                    f"database unreachable (RP_DATABASE_URL={redact_url(self.settings.database_url)}): "
                    f"{exc.__class__.__name__}: {exc}",
                )
            else:
                if live is None:
                    state = Readiness(False, "no index generation is published yet: materialize reindex_job")
                elif self._searcher is not None and self.readiness.gen_id == live["gen_id"]:
                    state = Readiness(True, "ready", live["gen_id"])
                else:
                    try:
                        searcher = self.runtime.open_searcher(live["gen_id"])
                    except Exception as exc:  # noqa: BLE001 - reported to the probe, tried again next check
                        why = f"live generation {live['gen_id']} does not load: {exc.__class__.__name__}: {exc}"
                        if self._searcher is not None and self.readiness.gen_id is not None:
                            # Keep answering from the generation already loaded (an object-store
                            # outage must not take every replica out at once); retried next check.
                            old = self.readiness.gen_id
                            state = Readiness(True, f"serving {old} while the {why}", old)
                            log.warning("still serving index generation %s: %s", old, why)
                        else:
                            state = Readiness(False, why)
                    else:
                        self._searcher = searcher
                        state = Readiness(True, "ready", live["gen_id"])
                        log.info("serving index generation %s", live["gen_id"])
            state.checked_at = time.monotonic()
            self.readiness = state
            return state

    def current(self) -> tuple[Any, str]:
        """The Searcher and generation id that answer now; NotReady (503) if there is none."""
        state, searcher = self.readiness, self._searcher
        if not state.ready or searcher is None:
            raise NotReady(state.reason)
        return searcher, state.gen_id

    # -- searching ---------------------------------------------------------------------------

    def submit(self, fn: Any, *args: Any) -> Future:
        """Run `fn(*args)` on the search pool, or raise Busy when threads and queue are full."""
        limit = self.options.concurrency + self.options.queue
        with self._admit_lock:
            if self._admitted >= limit:
                raise Busy()
            self._admitted += 1
            self.metrics.admitted.set(self._admitted)
        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(self._release)
        return fut

    def _release(self, _: Future) -> None:
        with self._admit_lock:
            self._admitted -= 1
            self.metrics.admitted.set(self._admitted)

    async def run_search(self, params: SearchParams) -> dict[str, Any]:
        """One search through the cache on the pool; raises NotReady, Busy or TimeoutError."""
        searcher, gen_id = self.current()
        fut = self.submit(self._search_sync, searcher, gen_id, params)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.options.timeout_s)
        except TimeoutError:
            fut.cancel()  # still queued: never starts; running: finishes and frees its slot
            raise

    def _search_sync(self, searcher: Any, gen_id: str, params: SearchParams) -> dict[str, Any]:
        from research_pipeline.lib.search.cache import cached_search

        start = time.perf_counter()
        hits, cache_hit = cached_search(
            searcher, params.q, k=params.k, filters=params.filters(), mode=params.mode,
            cache=self.cache, query_log=self.query_log, gen_id=gen_id,
        )
        elapsed = time.perf_counter() - start
        self.metrics.latency.observe(elapsed)
        if cache_hit:
            self.metrics.cache_hits.inc()
        return {
            "query": params.q,
            "generation": gen_id,
            "latency_ms": round(elapsed * 1000, 2),
            "cache_hit": cache_hit,
            "results": hits,
        }

    def close(self) -> None:
        """Finish running searches, flush the query log, release cache and database connections."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.side_pool.shutdown(wait=True, cancel_futures=True)
        self.runtime.close()


class NotReady(Exception):
    """The process cannot answer searches (no database, no live generation, or draining)."""


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def search_answer(request: Request, params: SearchParams) -> dict[str, Any]:
    """Run one search for a route; records the outcome and the access-log fields."""
    service: SearchService = request.app.state.service
    answer = await service.run_search(params)
    request.state.cache_hit = answer["cache_hit"]
    request.state.generation = answer["generation"]
    return answer


async def search_endpoint(request: Request) -> Response:
    """The best papers for a query, as JSON.
    ---
    summary: Search the live index
    parameters:
      - {name: q, in: query, schema: {type: string}, description: free text (any characters)}
      - {name: k, in: query, schema: {type: integer, minimum: 1, maximum: 100, default: 10}}
      - {name: mode, in: query, schema: {type: string, enum: [hybrid, bm25, dense], default: hybrid}}
      - {name: year_min, in: query, schema: {type: integer, minimum: 0, maximum: 9999}}
      - {name: year_max, in: query, schema: {type: integer, minimum: 0, maximum: 9999}}
      - {name: author, in: query, schema: {type: string, maxLength: 200}, description: substring of an author name}
    responses:
      200: {description: "query, generation, latency_ms, cache_hit and results (one per paper: doc_id, title, authors, year, score, chunk_id, section, page_start, snippet)"}
      400: {description: "a parameter is invalid: {error: message}"}
      503: {description: "not ready, or every search thread busy (Retry-After)"}
      504: {description: "the search took longer than the request timeout"}
    """
    service: SearchService = request.app.state.service
    try:
        params = parse_search_params(request.query_params)
    except BadRequest as exc:
        service.metrics.requests.labels("bad_request").inc()
        return _error(400, str(exc))
    try:
        answer = await search_answer(request, params)
    except NotReady as exc:
        service.metrics.requests.labels("not_ready").inc()
        return _error(503, str(exc), **{"Retry-After": "5"})
    except Busy:
        service.metrics.requests.labels("busy").inc()
        service.metrics.rejected.inc()
        return _error(503, "every search thread is busy; retry shortly", **{"Retry-After": "1"})
    except TimeoutError:
        service.metrics.requests.labels("timeout").inc()
        return _error(504, f"the search took longer than {service.options.timeout_s:g} s")
    service.metrics.requests.labels("ok").inc()
    answer["request_id"] = request.state.request_id
    return JSONResponse(answer)


async def healthz(request: Request) -> Response:
    """Liveness: the process answers.
    ---
    responses: {200: {description: "{status: ok}"}}
    """
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the database answers and the live generation is loaded (the last background check).
    ---
    responses:
      200: {description: "{status: ready, generation, reason} (reason: 'ready', or why an older generation still answers)"}
      503: {description: "{status: not ready, reason}"}
    """
    service: SearchService = request.app.state.service
    state = service.readiness
    if service.draining:
        return JSONResponse({"status": "not ready", "reason": "draining: the process is shutting down"}, 503)
    if not state.ready:
        return JSONResponse({"status": "not ready", "reason": state.reason}, 503)
    return JSONResponse({"status": "ready", "generation": state.gen_id, "reason": state.reason})


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics of the service and the corpus.
    ---
    responses: {200: {description: Prometheus text exposition}}
    """
    service: SearchService = request.app.state.service
    loop = asyncio.get_running_loop()
    body, content_type = await loop.run_in_executor(service.side_pool, service.metrics.exposition)
    return Response(body, media_type=content_type)


SCHEMAS = SchemaGenerator(
    {"openapi": "3.0.3", "info": {"title": "research_pipeline search", "version": "1"}}
)


async def openapi(request: Request) -> Response:
    """The OpenAPI schema of this service.
    ---
    responses: {200: {description: OpenAPI 3 document}}
    """
    return JSONResponse(SCHEMAS.get_schema(routes=request.app.routes))


async def not_found(request: Request, exc: Exception) -> Response:
    return _error(404, "not found; try /, /search?q=..., /healthz, /readyz, /metrics or /openapi.json")


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    if request.url.path == "/search":
        request.app.state.service.metrics.requests.labels("error").inc()
    rid = getattr(request.state, "request_id", "-")
    return _error(500, f"internal error (request id {rid}); the service log has the traceback")


class AccessLog:
    """ASGI middleware: a request id on every request and one access-log line per response."""

    def __init__(self, app: Any, service: SearchService):
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.service.metrics.http.labels(name, str(status)).inc()
            if status >= 400:
                self.service.metrics.errors.labels(name, str(status)).inc()
            ms = round((time.perf_counter() - start) * 1000, 2)
            access_log.info(
                "%s %s %s %.1fms", scope["method"], name, status, ms,
                extra={
                    "route": name, "method": scope["method"], "status": status, "ms": ms,
                    "cache_hit": state.get("cache_hit"), "generation": state.get("generation"),
                    "request_id": rid,
                },
            )


def _install_drain(service: SearchService) -> None:
    """On SIGTERM: readiness false now, the server's own shutdown after `drain_s`."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return
    loop = asyncio.get_running_loop()

    def on_term(sig: int, frame: Any) -> None:
        if service.draining:  # a second SIGTERM: stop now
            previous(sig, frame)
            return
        service.draining = True
        log.info("SIGTERM: draining for %.1f s, then finishing in-flight requests", service.options.drain_s)
        loop.call_soon_threadsafe(loop.call_later, service.options.drain_s, previous, sig, frame)

    signal.signal(signal.SIGTERM, on_term)


async def _refresh_forever(service: SearchService) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(service.options.readiness_interval_s)
        await loop.run_in_executor(service.side_pool, service.refresh)


def build_app(service: SearchService) -> Starlette:
    """The Starlette app over `service` (started and closed by the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()
        # Load the model and the live generation before the first request; a failure leaves
        # the process live but not ready, and the background task keeps retrying.
        await loop.run_in_executor(service.side_pool, service.refresh)
        _install_drain(service)
        task = asyncio.create_task(_refresh_forever(service))
        try:
            yield
        finally:
            task.cancel()
            await loop.run_in_executor(None, service.close)

    app = Starlette(
        routes=[
            Route("/", page.search_page, methods=["GET"]),
            Route("/search", search_endpoint, methods=["GET"]),
            Route("/papers/{doc_id}.pdf", papers.paper_pdf, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        ],
        exception_handlers={404: not_found, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(AccessLog, service=service)
    return app


def create_app(settings: Settings | None = None, options: ServiceOptions | None = None) -> Starlette:
    """The app factory uvicorn's workers call (`research_pipeline.api.app:create_app`, factory=True)."""
    if settings is None:
        settings = Settings.from_env()
        logs.configure(settings.log_format, settings.log_level)
    return build_app(SearchService(settings, options))


def create_multiprocess_app() -> Starlette:
    """The app factory of a worker among several: metrics summed over workers' multiprocess files."""
    settings = Settings.from_env()
    logs.configure(settings.log_format, settings.log_level)
    return build_app(SearchService(settings, ServiceOptions.from_settings(settings, multiprocess_metrics=True)))


def serve(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int | None = None,
    options: ServiceOptions | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT: one process, or `workers` uvicorn worker processes on one port."""
    import uvicorn

    workers = default_workers() if workers is None else workers
    opts = options or ServiceOptions.from_settings(settings)
    common: dict[str, Any] = {
        "host": host, "port": port, "access_log": False, "log_config": None, "lifespan": "on",
        "timeout_graceful_shutdown": int(opts.timeout_s) + 5, "proxy_headers": True,
    }
    print(
        f"research-pipeline: serving on http://{host}:{port} with {workers} worker(s) "
        f"(/, /search, /healthz, /readyz, /metrics, /openapi.json)",
        flush=True,
    )
    if workers == 1:
        uvicorn.Server(uvicorn.Config(create_app(settings, opts), **common)).run()
        return
    import tempfile

    from research_pipeline.config import set_process_default

    with tempfile.TemporaryDirectory(prefix="rp-metrics-") as metrics_dir:
        # prometheus_client's multiprocess mode: every worker writes its samples here.
        set_process_default("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
        uvicorn.run(
            "research_pipeline.api.app:create_multiprocess_app", factory=True, workers=workers, **common
        )
