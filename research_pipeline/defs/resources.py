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
from dagster_aws.s3 import S3Resource
from pydantic import PrivateAttr

from research_pipeline.config import Settings
from research_pipeline.defs.migration.resources import MigrationTargetResource
from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import ObjectStore, open_object_store
from research_pipeline.lib.embed.model import Embedder, load_embedder
from research_pipeline.lib.release.gates import GateThresholds


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


#: The gate defaults live in one place, lib/gates.GateThresholds.
_GATES = GateThresholds()


class ReleaseGatesResource(dg.ConfigurableResource):
    """Thresholds of the blocking release gates on a candidate index generation."""

    min_documents: int = _GATES.min_documents
    max_document_drop_share: float = _GATES.max_document_drop_share
    latency_p95_ms: float = _GATES.latency_p95_ms
    ndcg_floor: float = _GATES.ndcg_floor
    ndcg_max_regression: float = _GATES.ndcg_max_regression
    keep_generations: int = 3


def _env_or(name: str, default: Any) -> Any:
    """`EnvVar(name)` when the variable is set (the UI shows where a value came from), else the default."""
    return dg.EnvVar(name) if os.environ.get(name) else default


def _env_opt(name: str) -> Any:
    """`EnvVar(name)` when the variable is set, else None (the library's own default applies)."""
    return _env_or(name, None)


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
            min_documents=_env_num("RP_GATE_MIN_DOCUMENTS", _GATES.min_documents, int),
            max_document_drop_share=_env_num("RP_GATE_MAX_DOCUMENT_DROP", _GATES.max_document_drop_share),
            latency_p95_ms=_env_num("RP_GATE_LATENCY_P95_MS", _GATES.latency_p95_ms),
            ndcg_floor=_env_num("RP_GATE_NDCG_FLOOR", _GATES.ndcg_floor),
            ndcg_max_regression=_env_num("RP_GATE_NDCG_MAX_REGRESSION", _GATES.ndcg_max_regression),
            keep_generations=_env_num("RP_KEEP_GENERATIONS", 3, int),
        ),
        # The migration's target. Unset values raise a clear error only when a migration runs,
        # so the code location always loads.
        "migration_target": MigrationTargetResource(
            database_url=_env_or("RP_TARGET_DATABASE_URL", ""),
            bucket=_env_or("RP_S3_BUCKET", ""),
            prefix=_env_or("RP_S3_PREFIX", ""),
        ),
        # Unset AWS values fall back to boto3's default chain (profile, instance role);
        # botocore's retry mode retries throttling and 5xx answers with backoff.
        "migration_s3": S3Resource(
            endpoint_url=_env_opt("RP_S3_ENDPOINT_URL"),
            region_name=_env_opt("AWS_DEFAULT_REGION"),
            aws_access_key_id=_env_opt("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=_env_opt("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=_env_opt("AWS_SESSION_TOKEN"),
            max_attempts=10,
        ),
    }


DEFAULT_NIGHTLY_CRON = "0 2 * * *"


def nightly_cron() -> str:
    """The cron expression of `nightly_reindex`: RP_NIGHTLY_CRON (UTC), default 02:00 every day."""
    return os.environ.get("RP_NIGHTLY_CRON") or DEFAULT_NIGHTLY_CRON


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())
