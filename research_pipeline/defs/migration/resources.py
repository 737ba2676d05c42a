"""Resources of the migration's target side: the PostgreSQL database and the S3 bucket.

Kept beside the migration assets so the whole feature reads its environment in one place;
every value comes from an environment variable through `EnvVar` when it is set:

* RP_TARGET_DATABASE_URL - the PostgreSQL database to migrate to (postgresql+psycopg://...)
* RP_S3_BUCKET, RP_S3_PREFIX - the bucket (and key prefix) that receives papers and indexes
* RP_S3_ENDPOINT_URL - an S3-compatible endpoint (MinIO, moto); unset for AWS itself
* AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION - the
  standard AWS credentials; unset ones fall back to boto3's default chain (profile, IAM role)
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import PrivateAttr

from research_pipeline.lib import migrate


def _env(name: str, default: Any = None) -> Any:
    """`EnvVar(name)` when the variable is set (the UI shows where the value came from), else `default`."""
    return dg.EnvVar(name) if os.environ.get(name) else default


class MigrationTargetResource(dg.ConfigurableResource):
    """Where a migration writes: a PostgreSQL database URL and an S3 bucket and key prefix."""

    database_url: str = ""
    bucket: str = ""
    prefix: str = ""

    _engine: Any = PrivateAttr(default=None)

    def get_engine(self, source_url: str | None = None):
        if not self.database_url:
            raise migrate.MigrationError(
                "no migration target: set RP_TARGET_DATABASE_URL to the PostgreSQL database to migrate to"
            )
        if self._engine is None:
            self._engine = migrate.open_target_engine(self.database_url, source_url)
        return self._engine

    def get_bucket(self) -> str:
        if not self.bucket:
            raise migrate.MigrationError("no target bucket: set RP_S3_BUCKET to the S3 bucket to migrate files to")
        return self.bucket

    def object_store_url(self) -> str:
        return f"s3://{self.get_bucket()}/{self.prefix.strip('/')}".rstrip("/")

    def teardown_after_execution(self, context) -> None:  # noqa: ANN001
        if self._engine is not None:
            self._engine.dispose()


def build_migration_resources() -> dict[str, dg.ConfigurableResource]:
    """The target-side resources, configured from the environment."""
    return {
        "migration_target": MigrationTargetResource(
            database_url=_env("RP_TARGET_DATABASE_URL", ""),
            bucket=_env("RP_S3_BUCKET", ""),
            prefix=_env("RP_S3_PREFIX", ""),
        ),
        # botocore's standard retry mode retries throttling and 5xx answers with backoff.
        "migration_s3": S3Resource(
            endpoint_url=_env("RP_S3_ENDPOINT_URL"),
            region_name=_env("AWS_DEFAULT_REGION"),
            aws_access_key_id=_env("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=_env("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=_env("AWS_SESSION_TOKEN"),
            max_attempts=10,
        ),
    }


@dg.definitions
def migration_resources() -> dg.Definitions:
    return dg.Definitions(resources=build_migration_resources())
