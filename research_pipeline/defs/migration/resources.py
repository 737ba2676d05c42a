"""The migration's resources: the target (PostgreSQL database, S3 bucket and prefix), and the one
place where the source and target objects of the migration library are built from resources.

The target resource is configured from the environment in `research_pipeline.defs.resources`
with the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from research_pipeline.lib.migration.endpoints import (
    MigrationSource,
    MigrationTarget,
    open_target_engine,
)
from research_pipeline.lib.migration.errors import MigrationError


class MigrationTargetResource(dg.ConfigurableResource):
    """Where a migration writes: a PostgreSQL database URL and an S3 bucket and key prefix."""

    database_url: str = ""
    bucket: str = ""
    prefix: str = ""

    _engine: Any = PrivateAttr(default=None)

    def get_engine(self, source_url: str | None = None):
        if not self.database_url:
            raise MigrationError(
                "no migration target: set RP_TARGET_DATABASE_URL to the PostgreSQL database to migrate to"
            )
        if self._engine is None:
            self._engine = open_target_engine(self.database_url, source_url)
        return self._engine

    def get_bucket(self) -> str:
        if not self.bucket:
            raise MigrationError("no target bucket: set RP_S3_BUCKET to the S3 bucket to migrate files to")
        return self.bucket

    def get_target(self, source_url: str | None = None, s3: Any = None) -> MigrationTarget:
        """The library's target: the engine, and with `s3` (dagster-aws's S3Resource) the bucket."""
        engine = self.get_engine(source_url)
        if s3 is None:
            return MigrationTarget(engine)
        return MigrationTarget(engine, s3.get_client(), self.get_bucket(), self.prefix)

    def teardown_after_execution(self, context) -> None:
        if self._engine is not None:
            self._engine.dispose()


@contextmanager
def migration_endpoints(
    database: Any, object_store: Any, inbox: Any, target: MigrationTargetResource, s3: Any = None,
    require_target: bool = True,
) -> Iterator[tuple[MigrationSource, MigrationTarget | None]]:
    """(source, target) of the migration, from the pipeline's resources; the source engine is
    disposed on exit.

    The source is opened read-only on the original path (never DatabaseResource.get_engine,
    which writes). With `s3` (dagster-aws's S3Resource) the target carries the bucket; without,
    it is rows only. `require_target=False` gives None for a target not configured (a dry run).
    """
    source = MigrationSource.open(database.url, object_store.get_store(), inbox.get_path())
    try:
        if not require_target and not target.database_url:
            yield source, None
            return
        yield source, target.get_target(database.url, s3)
    finally:
        source.engine.dispose()
