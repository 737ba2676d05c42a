"""The one runtime: engine, object store, embedder, query cache and query log built from Settings.

The Dagster resources (`defs/resources.py`), the CLI and the search service build their
dependencies here and nowhere else. Heavy state is built once per process: the embedder per
(model, device, precision), engines per URL (each process owns its connection pool).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import sqlalchemy as sa

from research_pipeline.config import Settings
from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import ObjectStore, open_object_store
from research_pipeline.lib.core.util import redact_url

log = logging.getLogger(__name__)


class DependencyError(Exception):
    """A dependency cannot be built; the message says which one and what to do."""


def make_engine(url: str, create_schema: bool = True) -> sa.Engine:
    """An engine on the corpus database, with the schema created (idempotent) unless only reading.

    A search replica passes `create_schema=False`: it may point at a read-only standby.
    """
    try:
        engine = store.make_engine(url)
        if create_schema:
            store.create_schema(engine)
    except ValueError as exc:
        raise DependencyError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the drivers' errors vary; the fix is the same
        raise DependencyError(
            f"RP_DATABASE_URL={redact_url(url)}: cannot open the database ({exc.__class__.__name__}: {exc}); "
            "check that the server runs at that address and accepts this user, or fix the variable"
        ) from None
    return engine


def make_object_store(url: str, s3_endpoint_url: str | None = None) -> ObjectStore:
    """The object store of index files: a folder or s3://bucket/prefix."""
    return open_object_store(url, endpoint_url=s3_endpoint_url)


@functools.lru_cache(maxsize=4)
def embedder(model: str, device: str = "cpu", precision: str = "auto", threads: int | None = None) -> Any:
    """The process-wide embedder for (model, device, precision, threads): the weights load once per process.

    `threads` None: batch work on every core; a search service passes 1 (its parallelism is
    concurrent searches, each on one intra-op thread).
    """
    from research_pipeline.lib.embed.model import load_embedder

    try:
        return load_embedder(model, device, precision, threads)
    except RuntimeError as exc:
        raise DependencyError(str(exc)) from None


def make_query_cache(redis_url: str | None, **kwargs: Any) -> Any:
    """The query cache: Redis when `redis_url` is set (shared by every process), else in-process LRU."""
    from research_pipeline.lib.search.cache import QueryCache

    return QueryCache(redis_url=redis_url, **kwargs)


def make_query_log(engine: sa.Engine) -> Any:
    """The buffered writer of `query_log` rows (flushes in the background; close() flushes the rest)."""
    from research_pipeline.lib.search.querylog import QueryLog

    return QueryLog(engine)


class Runtime:
    """Everything a process needs, built lazily from one Settings and closed together."""

    def __init__(self, settings: Settings, create_schema: bool = True, embed_threads: int | None = None):
        self.settings = settings
        self.create_schema = create_schema
        self.embed_threads = embed_threads
        self._lock = threading.Lock()
        self._engine: sa.Engine | None = None
        self._object_store: ObjectStore | None = None
        self._query_cache: Any = None
        self._query_log: Any = None
        self._query_log_engine: sa.Engine | None = None

    @classmethod
    def from_env(cls) -> Runtime:
        return cls(Settings.from_env())

    @property
    def engine(self) -> sa.Engine:
        with self._lock:
            if self._engine is None:
                self._engine = make_engine(self.settings.database_url, self.create_schema)
            return self._engine

    @property
    def object_store(self) -> ObjectStore:
        with self._lock:
            if self._object_store is None:
                s = self.settings
                self._object_store = make_object_store(s.object_store_url, s.s3_endpoint_url)
            return self._object_store

    @property
    def embedder(self) -> Any:
        s = self.settings
        return embedder(s.model, s.device, s.embed_precision, self.embed_threads)

    @property
    def query_cache(self) -> Any:
        with self._lock:
            if self._query_cache is None:
                self._query_cache = make_query_cache(self.settings.redis_url)
            return self._query_cache

    @property
    def query_log(self) -> Any:
        """The query-log writer: on RP_QUERY_LOG_DATABASE_URL when set (a replica reading from a
        read-only standby logs to the primary), else on the corpus database."""
        url = self.settings.query_log_database_url
        engine = self.engine if url is None else None
        with self._lock:
            if self._query_log is None:
                if engine is None:
                    self._query_log_engine = engine = make_engine(url, create_schema=False)
                self._query_log = make_query_log(engine)
            return self._query_log

    def open_searcher(self, gen_id: str | None = None) -> Any:
        """A Searcher over generation `gen_id` (default: the live one)."""
        from research_pipeline.lib.release.searchers import open_searcher

        return open_searcher(self.engine, self.object_store, self.embedder, gen_id=gen_id)

    def close(self) -> None:
        """Flush the query log, close the cache and dispose of the engine."""
        with self._lock:
            query_log, cache, engine = self._query_log, self._query_cache, self._engine
            log_engine, self._query_log_engine = self._query_log_engine, None
            self._query_log = self._query_cache = self._engine = None
        if query_log is not None:
            query_log.close()
        if log_engine is not None:
            log_engine.dispose()
        if cache is not None:
            cache.close()
        if engine is not None:
            engine.dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
