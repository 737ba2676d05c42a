"""The one place that reads the environment: every resource of the code location.

Each setting falls back to the embedded default (SQLite and local files under RP_HOME, the
packaged model), so the code location runs with no configuration; set the variable to point
it at production (PostgreSQL, S3, Redis).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from research_pipeline.lib import store
from research_pipeline.lib.embedder import Embedder, load_embedder
from research_pipeline.lib.objectstore import ObjectStore, open_object_store
from research_pipeline.lib.settings import Settings


class DatabaseResource(dg.ConfigurableResource):
    """The corpus database (SQLite by default, PostgreSQL in production)."""

    url: str

    _engine: Any = PrivateAttr(default=None)

    def get_engine(self):
        if self._engine is None:
            self._engine = store.make_engine(self.url)
            store.create_schema(self._engine)
        return self._engine

    def teardown_after_execution(self, context) -> None:  # noqa: ANN001
        if self._engine is not None:
            self._engine.dispose()


class ObjectStoreResource(dg.ConfigurableResource):
    """Where index files and (after migration) original papers live: a folder or s3://bucket/prefix."""

    url: str
    s3_endpoint_url: str | None = None

    def get_store(self) -> ObjectStore:
        return open_object_store(self.url, endpoint_url=self.s3_endpoint_url)


class InboxResource(dg.ConfigurableResource):
    """The folder of PDFs (searched recursively) and/or BEIR-layout JSONL records to ingest."""

    path: str

    def get_path(self) -> Path:
        return Path(self.path)


class EmbedderResource(dg.ConfigurableResource):
    """The sentence-transformers model; weights load once per process."""

    model: str
    device: str = "cpu"
    batch_size: int = 64

    def get_embedder(self) -> Embedder:
        return load_embedder(self.model, self.device)


class QueryCacheResource(dg.ConfigurableResource):
    """The query cache: Redis when `redis_url` is set (shared across processes), else in-process LRU."""

    redis_url: str | None = None
    max_entries: int = 10_000
    ttl_s: int = 86_400


class ReleaseGatesResource(dg.ConfigurableResource):
    """Thresholds of the blocking release gates on a candidate index generation."""

    min_documents: int = 1
    max_document_drop_share: float = 0.10
    latency_p95_ms: float = 250.0
    ndcg_floor: float = 0.30
    ndcg_max_regression: float = 0.05
    keep_generations: int = 3


def _env_or(name: str, default: Any) -> Any:
    """`EnvVar(name)` when the variable is set (the UI shows where a value came from), else the default."""
    return dg.EnvVar(name) if os.environ.get(name) else default


def _env_num(name: str, default: float, cast=float):  # noqa: ANN001
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}") from None


def build_resources(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    """All resources, configured from the environment (or from an explicit Settings for tests)."""
    s = settings or Settings.from_env()
    explicit = settings is not None
    pick = (lambda name, value: value) if explicit else _env_or
    return {
        "database": DatabaseResource(url=pick("RP_DATABASE_URL", s.database_url)),
        "object_store": ObjectStoreResource(
            url=pick("RP_OBJECT_STORE_URL", s.object_store_url),
            s3_endpoint_url=pick("RP_S3_ENDPOINT_URL", s.s3_endpoint_url),
        ),
        "inbox": InboxResource(path=pick("RP_INBOX", str(s.inbox))),
        "embedder": EmbedderResource(model=pick("RP_MODEL", s.model), device=pick("RP_DEVICE", s.device)),
        "query_cache": QueryCacheResource(redis_url=pick("RP_REDIS_URL", s.redis_url)),
        "release_gates": ReleaseGatesResource(
            min_documents=_env_num("RP_GATE_MIN_DOCUMENTS", 1, int),
            max_document_drop_share=_env_num("RP_GATE_MAX_DOCUMENT_DROP", 0.10),
            latency_p95_ms=_env_num("RP_GATE_LATENCY_P95_MS", 250.0),
            ndcg_floor=_env_num("RP_GATE_NDCG_FLOOR", 0.30),
            ndcg_max_regression=_env_num("RP_GATE_NDCG_MAX_REGRESSION", 0.05),
            keep_generations=_env_num("RP_KEEP_GENERATIONS", 3, int),
        ),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())
