"""The two ends of a migration: the source deployment (read-only) and the PostgreSQL + S3 target.

`MigrationSource` and `MigrationTarget` carry everything the migration steps need (engines,
object stores, the inbox, bucket and prefix), built once by the caller (the Dagster resources,
a test, the bench) and passed as two arguments instead of a long positional list.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store
from research_pipeline.lib.migration.errors import MigrationError

_SCHEMA_LOCK = "research_pipeline:migration:schema"


def _decode_sqlite_text(raw: bytes) -> str:
    """SQLite TEXT as str, never failing: bytes that are not UTF-8 become lone surrogates.

    SQLite stores whatever bytes another writer gave it (an encoded surrogate, Latin-1);
    Python's default decoder would stop the read. Encoded surrogates come back as themselves,
    other bad bytes as surrogate escapes; the codec then normalises or refuses them by column.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "surrogateescape")


def open_source_engine(url: str) -> Engine:
    """A read-only engine on the source database.

    SQLite is opened through SQLite itself in read-only mode on the original path, so committed
    pages still in the -wal file are read too and the file is never written.
    """
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return store.make_engine(url)
    if not parsed.database or parsed.database == ":memory:":
        raise MigrationError(f"source database URL {url!r} names no SQLite file")
    path = Path(parsed.database).resolve()
    if not path.is_file():
        raise MigrationError(f"source SQLite database {path} does not exist: check RP_DATABASE_URL")
    engine = sa.create_engine(
        f"sqlite+pysqlite:///file:{quote(str(path))}?mode=ro&uri=true",
        connect_args={"timeout": 60, "check_same_thread": False},
    )

    @sa.event.listens_for(engine, "connect")
    def _read_only(dbapi_conn, _record):
        dbapi_conn.text_factory = _decode_sqlite_text
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA query_only=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    return engine


def open_target_engine(url: str, source_url: str | None = None) -> Engine:
    """An engine on the PostgreSQL target (refuses SQLite and the source itself)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise MigrationError(
            f"migration target {parsed.render_as_string(hide_password=True)!r} is not PostgreSQL: "
            "set RP_TARGET_DATABASE_URL to postgresql+psycopg://user@host/db"
        )
    if source_url is not None and _same_database(url, source_url):
        raise MigrationError(
            "the migration source and target are the same database: RP_DATABASE_URL must still point "
            "at the old deployment while migrating"
        )
    return store.make_engine(url)


def _same_database(a: str, b: str) -> bool:
    ua, ub = sa.engine.make_url(a), sa.engine.make_url(b)
    return (ua.get_backend_name(), ua.host, ua.port, ua.database) == (
        ub.get_backend_name(),
        ub.host,
        ub.port,
        ub.database,
    )


_PREPARED: weakref.WeakSet = weakref.WeakSet()


def prepare_target(target: Engine) -> None:
    """Create the schema (and migration_state) on the target; safe to repeat and to run concurrently.

    The 16 partitions of a backfill start at once; a session advisory lock stops their
    CREATE TABLEs from racing on a fresh database.
    """
    if target in _PREPARED:
        return
    with target.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": _SCHEMA_LOCK})
        try:
            store.create_schema(target)
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": _SCHEMA_LOCK})
            conn.commit()
    _PREPARED.add(target)


def is_prepared(target: Engine) -> bool:
    """Whether this process already created the schema on `target`."""
    return target in _PREPARED


@dataclass(frozen=True)
class MigrationSource:
    """The deployment being migrated: its database (read-only), object store and inbox.

    `store` holds the index files (None: a rows-only migration); relative paths of original
    papers resolve under `inbox`.
    """

    engine: Engine
    store: Any = None
    inbox: Path | None = None

    @classmethod
    def open(cls, url: str, store: Any = None, inbox: Path | None = None) -> MigrationSource:
        """The source at database `url`, opened read-only."""
        return cls(open_source_engine(url), store, inbox)


@dataclass(frozen=True)
class MigrationTarget:
    """Where a migration writes: a PostgreSQL engine and (for files) an S3 client, bucket and prefix.

    With `s3=None` only rows are migrated and verified.
    """

    engine: Engine
    s3: Any = None
    bucket: str = ""
    prefix: str = ""

    def key(self, key: str) -> str:
        """The S3 key of an object-store key under this target's prefix."""
        prefix = self.prefix.strip("/")
        return f"{prefix}/{key}" if prefix else key

    @property
    def object_store_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}".rstrip("/")

    def object_store(self) -> Any:
        """The target bucket as the pipeline's object store (what searches read after the cutover)."""
        from research_pipeline.lib.core.objectstore import S3ObjectStore

        return S3ObjectStore(self.bucket, self.prefix, client=self.s3)
