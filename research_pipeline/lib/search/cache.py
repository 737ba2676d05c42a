"""The query cache: search results keyed by normalised query, filters, k, mode and generation.

The generation id is part of every key, so publishing (or rolling back) a generation
invalidates the cache by itself: nothing has to be flushed. The default backend is an
in-process LRU; give a Redis URL to share the cache between processes (the webserver, the
CLI and the cache-warming job then see the same entries).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from research_pipeline.lib.core.util import sha256_hex

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "rp:qc:"


def normalise_query(query: str) -> str:
    """The cache identity of a query: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", query or "").casefold().split())


def filters_dict(filters: Any) -> dict[str, Any]:
    """A search filter (SearchFilters dataclass, mapping or None) as a dict without unset fields."""
    if filters is None:
        return {}
    if dataclasses.is_dataclass(filters) and not isinstance(filters, type):
        raw = dataclasses.asdict(filters)
    elif isinstance(filters, Mapping):
        raw = dict(filters)
    else:
        raise TypeError(f"filters must be SearchFilters, a mapping or None, not {type(filters).__name__}")
    return {k: v for k, v in sorted(raw.items()) if v not in (None, "", [], ())}


def cache_key(query: str, filters: Any, k: int, mode: str, gen_id: str | None) -> str:
    """The key of one search: sha256 of the canonical JSON of everything that changes its result."""
    ident = {
        "q": normalise_query(query),
        "f": filters_dict(filters),
        "k": int(k),
        "m": mode,
        "g": gen_id or "",
    }
    return sha256_hex(json.dumps(ident, sort_keys=True, ensure_ascii=False, default=str))


class QueryCache:
    """Search results by cache key: in-process LRU, or Redis when `redis_url` is given.

    A cache that cannot reach Redis keeps search working (errors counted in `errors`): with Redis,
    every value put is also kept in a bounded in-process LRU (`fallback_entries`), which answers
    only while Redis fails; a key it does not hold is a miss. While Redis answers, it alone
    decides hits (a flush of Redis is a flush). So a Redis outage does not turn every repeated
    query into a full search at once (docs/runbooks/cache-loss.md).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        max_entries: int = 10_000,
        ttl_s: int = 86_400,
        prefix: str = DEFAULT_PREFIX,
        client: Any = None,
        fallback_entries: int = 2_000,
    ):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self.fallback_entries = max(0, int(fallback_entries))
        self.ttl_s = int(ttl_s)
        self.prefix = prefix
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._redis = client
        if self._redis is None and redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.backend = "redis" if self._redis is not None else "lru"

    def get(self, key: str) -> Any | None:
        """The cached value for `key`, or None on a miss (expired entries are misses)."""
        raw = self._get_raw(key)
        with self._lock:
            if raw is None:
                self.misses += 1
                return None
            self.hits += 1
        return json.loads(raw)

    def put(self, key: str, value: Any) -> None:
        raw = json.dumps(value, ensure_ascii=False, default=str)
        if self._redis is not None:
            self._lru_put(key, raw, self.fallback_entries)  # the copy that answers while Redis fails
            try:
                self._redis.set(self.prefix + key, raw.encode("utf-8"), ex=self.ttl_s if self.ttl_s > 0 else None)
            except Exception as exc:  # noqa: BLE001 - a cache outage must not fail the search
                self._record_error("put", exc)
            return
        self._lru_put(key, raw, self.max_entries)

    def _lru_put(self, key: str, raw: str, limit: int) -> None:
        if limit < 1:
            return
        expires = time.monotonic() + self.ttl_s if self.ttl_s > 0 else float("inf")
        with self._lock:
            self._lru[key] = (expires, raw)
            self._lru.move_to_end(key)
            while len(self._lru) > limit:
                self._lru.popitem(last=False)

    def _get_raw(self, key: str) -> str | None:
        if self._redis is not None:
            try:
                raw = self._redis.get(self.prefix + key)
            except Exception as exc:  # noqa: BLE001 - a cache outage must not fail the search
                self._record_error("get", exc)
                return self._lru_get(key)
            return None if raw is None else raw.decode("utf-8")
        return self._lru_get(key)

    def _lru_get(self, key: str) -> str | None:
        with self._lock:
            item = self._lru.get(key)
            if item is None:
                return None
            expires, raw = item
            if expires < time.monotonic():
                del self._lru[key]
                return None
            self._lru.move_to_end(key)
            return raw

    def _record_error(self, op: str, exc: Exception) -> None:
        with self._lock:
            self.errors += 1
        log.warning("query cache %s failed (%s: %s); serving from this process's fallback copy or uncached",
                    op, type(exc).__name__, exc)

    def __len__(self) -> int:
        if self._redis is not None:
            return sum(1 for _ in self._redis.scan_iter(match=self.prefix + "*", count=500))
        with self._lock:
            return len(self._lru)

    def clear(self) -> int:
        """Remove this cache's entries (only keys under its prefix in Redis); returns how many."""
        if self._redis is not None:
            keys = list(self._redis.scan_iter(match=self.prefix + "*", count=500))
            for i in range(0, len(keys), 500):
                self._redis.delete(*keys[i : i + 500])
            with self._lock:
                self._lru.clear()
            return len(keys)
        with self._lock:
            n = len(self._lru)
            self._lru.clear()
            return n

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict[str, float | int | str]:
        """Counters since this object was created: hits, misses, errors, hit_ratio, backend."""
        return {
            "backend": self.backend,
            "hits": self.hits,
            "misses": self.misses,
            "errors": self.errors,
            "hit_ratio": round(self.hit_ratio, 4),
        }

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def cached_search(
    searcher: Any,
    query: str,
    k: int = 10,
    filters: Any = None,
    mode: str = "hybrid",
    cache: QueryCache | None = None,
    query_log: Any = None,
    gen_id: str | None = None,
) -> tuple[list[dict], bool]:
    """Search through the cache and log the query; returns (hits as dicts, cache_hit).

    `gen_id` defaults to the `gen_id` attribute that `searchers.open_searcher` sets on the
    Searcher, which is what keeps results of different generations apart.
    """
    gen = gen_id if gen_id is not None else getattr(searcher, "gen_id", None)
    started = time.perf_counter()
    key = cache_key(query, filters, k, mode, gen)
    hits = cache.get(key) if cache is not None else None
    cache_hit = hits is not None
    if hits is None:
        hits = [h.as_dict() for h in searcher.search(query, k=k, filters=filters, mode=mode)]
        if cache is not None:
            cache.put(key, hits)
    if query_log is not None:
        query_log.log(
            query,
            filters=filters_dict(filters),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            gen_id=gen,
            n_results=len(hits),
            cache_hit=cache_hit,
        )
    return hits, cache_hit
