"""The migration's target-side resource: the PostgreSQL database and the S3 bucket and prefix.

It is configured from the environment in `research_pipeline.defs.resources` with the rest.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from research_pipeline.lib.migration import migrate


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
