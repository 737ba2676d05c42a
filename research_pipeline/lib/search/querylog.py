"""The query log: every search (query, filters, latency, generation, results, cache hit).

Logging must not slow a search down, so `QueryLog.log` only appends to an in-memory buffer;
a background thread inserts the buffer in batches every `flush_interval_s` (and when it
grows past `max_buffer`), and `close()` flushes what is left. The log feeds the
cache-warming job (`top_queries`) and latency figures.

Queries come from anyone who can reach the search API, so what is logged is made storable
first (`pg_safe_text`: NUL and lone surrogates become U+FFFD): no query can fail the flush,
or later a migration of the log to PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util

log = logging.getLogger(__name__)

#: Longer queries are truncated in the log (junk input must not bloat the table).
MAX_QUERY_CHARS = 2000


class QueryLog:
    """A buffered, thread-safe writer of `query_log` rows; use as a context manager or call close()."""

    def __init__(self, engine: Engine, flush_interval_s: float = 1.0, max_buffer: int = 500):
        self.engine = engine
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.written = 0
        self.dropped = 0
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def log(
        self,
        query: str,
        filters: Mapping[str, Any] | None = None,
        latency_ms: float = 0.0,
        gen_id: str | None = None,
        n_results: int = 0,
        cache_hit: bool = False,
    ) -> None:
        """Buffer one search; returns at once (the row is written by the flush thread)."""
        row = {
            "ts": util.utcnow(),
            "query": util.pg_safe_text(str(query or "")[:MAX_QUERY_CHARS]),
            "filters": util.pg_safe_text(store.dumps(dict(filters))) if filters else None,
            "gen_id": gen_id,
            "latency_ms": float(latency_ms),
            "n_results": int(n_results),
            "cache_hit": bool(cache_hit),
        }
        with self._lock:
            self._buffer.append(row)
            full = len(self._buffer) >= self.max_buffer
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="query-log-flush", daemon=True)
                self._thread.start()
        if full:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - the rows stay buffered and are retried
                log.warning("query log flush failed (%s: %s); will retry", type(exc).__name__, exc)

    def flush(self) -> int:
        """Insert the buffered rows in one transaction; returns how many were written."""
        with self._flush_lock:
            with self._lock:
                rows, self._buffer = self._buffer, []
            if not rows:
                return 0
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.insert(store.query_log), rows)
            except Exception:
                with self._lock:
                    # Put the rows back in front (bounded, so a dead database cannot eat memory).
                    keep = rows + self._buffer
                    overflow = max(0, len(keep) - 50 * self.max_buffer)
                    self.dropped += overflow
                    self._buffer = keep[overflow:]
                raise
            self.written += len(rows)
            return len(rows)

    def close(self) -> None:
        """Stop the flush thread and write everything still buffered."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def __enter__(self) -> QueryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def top_queries(engine: Engine, n: int = 50, since: datetime | None = None) -> list[dict[str, Any]]:
    """The `n` most frequent logged (query, filters) pairs, most frequent first.

    Only queries that returned results count: replaying a query with no answer warms nothing.
    """
    ql = store.query_log
    count = sa.func.count().label("count")
    stmt = (
        sa.select(ql.c.query, ql.c.filters, count, sa.func.max(ql.c.ts).label("last_seen"))
        .where(ql.c.n_results > 0)
        .group_by(ql.c.query, ql.c.filters)
        .order_by(count.desc(), sa.func.max(ql.c.ts).desc(), ql.c.query)
        .limit(int(n))
    )
    if since is not None:
        stmt = stmt.where(ql.c.ts >= since)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        {"query": r.query, "filters": json.loads(r.filters) if r.filters else {}, "count": int(r.count)}
        for r in rows
    ]


def latency_summary(engine: Engine, gen_id: str | None = None) -> dict[str, float | int]:
    """Logged searches and their latency percentiles (ms), optionally for one generation."""
    ql = store.query_log
    stmt = sa.select(ql.c.latency_ms, ql.c.cache_hit)
    if gen_id is not None:
        stmt = stmt.where(ql.c.gen_id == gen_id)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    from research_pipeline.lib.release.ir_metrics import percentiles

    lat = [float(r.latency_ms) for r in rows]
    out: dict[str, float | int] = {"searches": len(rows), "cache_hits": sum(1 for r in rows if r.cache_hit)}
    out.update(percentiles(lat))
    return out
