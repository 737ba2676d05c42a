"""Every resource of the code location, configured from `research_pipeline.config.Settings`.

Values come from the one configuration reader; a variable that is set reaches the resource as
`EnvVar(name)`, so the UI shows where it came from, and an unset one as its default. The
resources build their clients through `research_pipeline.runtime`, the same builders the CLI
and the search service use; heavy state (engine, embedder) is built once per process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import PrivateAttr, create_model

from research_pipeline import runtime
from research_pipeline.config import DEFAULT_KEEP_GENERATIONS, Settings
from research_pipeline.defs.migration.resources import MigrationTargetResource
from research_pipeline.lib.core.objectstore import ObjectStore
from research_pipeline.lib.embed.model import Embedder
from research_pipeline.lib.release.thresholds import GateThresholds


#: Retries of a reindex step that failed on something transient (the database restarted or
#: failed over, S3 throttled past botocore's own retries). Every step is idempotent (content-hash
#: ids, upserts, a generation's files rewritten whole), so a retry redoes only the failed step.
#: Failures a retry cannot fix are raised as dg.Failure(allow_retries=False) and fail at once.
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


class DatabaseResource(dg.ConfigurableResource):
    """The corpus database (SQLite by default, PostgreSQL in production)."""

    url: str

    _engine: Any = PrivateAttr(default=None)

    def get_engine(self):  # noqa: ANN201
        if self._engine is None:
            self._engine = runtime.make_engine(self.url)
        return self._engine

    def teardown_after_execution(self, context) -> None:  # noqa: ANN001
        if self._engine is not None:
            self._engine.dispose()


class ObjectStoreResource(dg.ConfigurableResource):
    """Where index files and (after migration) original papers live: a folder or s3://bucket/prefix."""

    url: str
    s3_endpoint_url: str | None = None

    def get_store(self) -> ObjectStore:
        return runtime.make_object_store(self.url, self.s3_endpoint_url)


class InboxResource(dg.ConfigurableResource):
    """The folder of PDFs (searched recursively) and/or BEIR-layout JSONL records to ingest."""

    path: str
    #: Retracted DOIs / arXiv ids / doc_ids, one per line; those papers never enter a generation.
    retracted_file: str | None = None

    def get_path(self) -> Path:
        return Path(self.path)

    def get_retracted_file(self) -> Path | None:
        return Path(self.retracted_file) if self.retracted_file else None


class EmbedderResource(dg.ConfigurableResource):
    """The sentence-transformers model; weights load once per process (`runtime.embedder`)."""

    model: str
    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 64

    def get_embedder(self) -> Embedder:
        return runtime.embedder(self.model, self.device, self.precision)


class QueryCacheResource(dg.ConfigurableResource):
    """The query cache: Redis when `redis_url` is set (shared across processes), else in-process LRU."""

    redis_url: str | None = None
    max_entries: int = 10_000
    ttl_s: int = 86_400

    def get_cache(self) -> Any:
        return runtime.make_query_cache(self.redis_url, max_entries=self.max_entries, ttl_s=self.ttl_s)


# The gate thresholds are declared once, as GateThresholds' fields; the resource's config schema
# (what the UI shows and a run may override) is made from them.
_GateFields = create_model(
    "_GateFields",
    __base__=dg.ConfigurableResource,
    **{f.name: (type(f.default), f.default) for f in dataclasses.fields(GateThresholds)},
)


class ReleaseGatesResource(_GateFields):
    """Thresholds of the release gates on a candidate generation, and how many generations to keep."""

    keep_generations: int = DEFAULT_KEEP_GENERATIONS

    def thresholds(self) -> GateThresholds:
        return GateThresholds(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GateThresholds)})


def build_resources(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    """All resources, from the environment (or from an explicit Settings, for tests)."""
    explicit = settings is not None
    s = settings or Settings.from_env()

    def pick(name: str, value: Any) -> Any:
        """`EnvVar(name)` when the variable is set (the UI shows the source), else the resolved value."""
        return dg.EnvVar(name) if not explicit and s.is_set(name) else value

    gate_values = dataclasses.asdict(s.gates)
    aws = s.aws
    return {
        "database": DatabaseResource(url=pick("RP_DATABASE_URL", s.database_url)),
        "object_store": ObjectStoreResource(
            url=pick("RP_OBJECT_STORE_URL", s.object_store_url),
            s3_endpoint_url=pick("RP_S3_ENDPOINT_URL", s.s3_endpoint_url),
        ),
        "inbox": InboxResource(
            path=str(s.inbox),
            retracted_file=str(s.retracted_file) if s.retracted_file else None,
        ),
        "embedder": EmbedderResource(
            model=pick("RP_MODEL", s.model),
            device=pick("RP_DEVICE", s.device),
            precision=pick("RP_EMBED_PRECISION", s.embed_precision),
        ),
        "query_cache": QueryCacheResource(redis_url=pick("RP_REDIS_URL", s.redis_url)),
        # Numbers pass as parsed values (EnvVar would hand the resource a string).
        "release_gates": ReleaseGatesResource(**gate_values, keep_generations=s.keep_generations),
        # The migration's target. Unset values raise a clear error only when a migration runs,
        # so the code location always loads.
        "migration_target": MigrationTargetResource(
            database_url=pick("RP_TARGET_DATABASE_URL", s.migration.database_url),
            bucket=pick("RP_S3_BUCKET", s.migration.bucket),
            prefix=pick("RP_S3_PREFIX", s.migration.prefix),
        ),
        # Unset AWS values fall back to boto3's default chain (profile, instance role);
        # botocore's retry mode retries throttling and 5xx answers with backoff.
        "migration_s3": S3Resource(
            endpoint_url=pick("RP_S3_ENDPOINT_URL", s.s3_endpoint_url),
            region_name=pick("AWS_DEFAULT_REGION", aws.region),
            aws_access_key_id=pick("AWS_ACCESS_KEY_ID", aws.access_key_id),
            aws_secret_access_key=pick("AWS_SECRET_ACCESS_KEY", aws.secret_access_key),
            aws_session_token=pick("AWS_SESSION_TOKEN", aws.session_token),
            max_attempts=10,
        ),
    }


def nightly_cron() -> str:
    """The cron expression of `nightly_reindex`: RP_NIGHTLY_CRON (UTC), default 02:00 every day."""
    return Settings.from_env().nightly_cron


def sensor_interval(default: int) -> int:
    """Seconds between a sensor's ticks: RP_SENSOR_INTERVAL_S if set, else the sensor's `default`."""
    return Settings.from_env().sensor_interval_s or default


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())

