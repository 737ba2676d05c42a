"""The migration of a deployment to production: SQLite + local files -> PostgreSQL + S3.

The work is split by the static shards of the content-hash space (`store.SHARDS`), the same
keys that partition embeddings, so a migration is a 16-partition backfill that can be resumed,
re-run and verified one shard at a time:

* rows: documents, document_sources and chunks go by `doc_id[0]`, embeddings by
  `content_hash[0]`, quarantine by `sha256(uri)[0]`; the small bookkeeping tables
  (index_generations, index_pointer, query_log, schema_version) all go to shard '0', so every
  shard key stays a plain hex digit shared with the rest of the pipeline;
* objects: original papers (`papers/<doc_id>.pdf`) by doc_id, index files (`indexes/...`) by
  `sha256(key)[0]`.

Each (table, shard) is copied in ONE target transaction (COPY into the table, or into a staging
table merged with INSERT ... ON CONFLICT when the shard already has rows), together with its
`migration_state` row; it is then read back and compared row by row with what was read from the
source (count + an order-independent checksum of canonical row encodings) before it is marked
`verified`. A killed copy leaves nothing behind; a re-run skips verified shards. The source is
only ever read: SQLite is opened read-only through SQLite itself, so the WAL is applied.
"""

from __future__ import annotations

import hashlib
import struct
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util
from research_pipeline.lib.core.progress import emit

Log = Callable[[str], None] | None

#: The shard that holds the small bookkeeping tables in full.
SMALL_TABLES_SHARD = "0"
#: Key prefixes in the object store (local and S3).
PAPERS_PREFIX = "papers/"
INDEXES_PREFIX = "indexes/"
#: migration_state.table_name of the two object families.
OBJECT_FAMILIES = ("s3:papers", "s3:indexes")
#: Where the cutover record is written in the target bucket.
CUTOVER_KEY = "migration/cutover.json"
#: Throughputs used for the dry-run estimate (measured by bench/bench_migrate.py on 2 cores).
EST_ROWS_PER_S = 7_000.0
EST_BYTES_PER_S = 12e6
_MOD = 1 << 256


class MigrationError(RuntimeError):
    """The migration cannot proceed; the message says what to do."""


class MigrationNotVerified(MigrationError):
    """Verification found differences between source and target; the cutover is refused."""

    def __init__(self, report: VerifyReport):
        self.report = report
        super().__init__(report.summary())


@dataclass(frozen=True)
class TableSpec:
    """How one table is split into shards: by the first hex digit of `by` (a column or sha256 of one)."""

    table: sa.Table
    by: str | None  # None: the whole table lives in SMALL_TABLES_SHARD
    hash_key: bool = False  # True: shard = sha256(by)[0] instead of by[0]

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.table.primary_key.columns)

    @property
    def shards(self) -> tuple[str, ...]:
        """The shards that hold rows of this table."""
        return store.SHARDS if self.by is not None else (SMALL_TABLES_SHARD,)

    def shard_of_row(self, row: Mapping[str, Any]) -> str:
        if self.by is None:
            return SMALL_TABLES_SHARD
        value = row[self.by]
        return util.sha256_hex(value)[0] if self.hash_key else str(value)[:1]

    def predicate(self, shard: str, dialect: str) -> Any:
        """A WHERE clause selecting the shard, or None when rows must be filtered in Python."""
        if self.by is None:
            return sa.true() if shard == SMALL_TABLES_SHARD else sa.false()
        col = self.table.c[self.by]
        if self.hash_key:
            if dialect != "postgresql":
                return None
            col = sa.func.encode(sa.func.sha256(sa.func.convert_to(col, "UTF8")), "hex")
        return sa.func.substr(col, 1, 1) == shard


TABLE_SPECS: tuple[TableSpec, ...] = (
    TableSpec(store.documents, "doc_id"),
    TableSpec(store.document_sources, "doc_id"),
    TableSpec(store.chunks, "doc_id"),
    TableSpec(store.quarantine, "uri", hash_key=True),
    TableSpec(store.embeddings, "content_hash"),
    TableSpec(store.index_generations, None),
    TableSpec(store.index_pointer, None),
    TableSpec(store.query_log, None),
    TableSpec(store.schema_version, None),
)
SPECS_BY_NAME = {s.name: s for s in TABLE_SPECS}


def expected_states(shards: Sequence[str] = store.SHARDS) -> list[tuple[str, str]]:
    """The (table or object family, shard) pairs a complete migration of `shards` marks verified."""
    pairs = [(spec.name, s) for spec in TABLE_SPECS for s in shards if s in spec.shards]
    return pairs + [(family, s) for family in OBJECT_FAMILIES for s in shards]


def _check_shard(shard: str) -> str:
    if shard not in store.SHARDS:
        raise ValueError(f"unknown shard {shard!r}: use one of {''.join(store.SHARDS)}")
    return shard


# --------------------------------------------------------------------------- engines


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
    def _read_only(dbapi_conn, _record):  # noqa: ANN001
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
        conn.execute(sa.text("SELECT pg_advisory_lock(hashtext('research_pipeline:migration:schema'))"))
        try:
            store.create_schema(target)
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext('research_pipeline:migration:schema'))"))
            conn.commit()
    _PREPARED.add(target)


# --------------------------------------------------------------------------- canonical rows


# The canonical encoding of a row, computed identically in Python (any source) and in
# PostgreSQL's own SQL (the target, so verification reads back a count and a checksum, or 64 hex
# characters per row, rather than the rows): every column becomes text by its declared type
# (timestamps as UTC epoch microseconds, floats as their IEEE-754 bits, bytes as the hex sha256
# of the bytes, booleans as true/false), each value is length-prefixed ("V<len>:<text>", NULL
# is "N"), and the row digest is the sha256 of the concatenation.

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _canon_datetime(v: datetime) -> str:
    # SQLite hands back naive datetimes that were written as UTC; PostgreSQL aware ones.
    if v.tzinfo is None:
        v = v.replace(tzinfo=timezone.utc)
    return str((v - _EPOCH) // timedelta(microseconds=1))


def _declared(col: sa.Column) -> sa.types.TypeEngine:
    """The column's storage type: a TypeDecorator (store.UtcDateTime) is judged by its impl."""
    t = col.type
    return t.impl if isinstance(t, sa.types.TypeDecorator) else t


def _canon_py(col: sa.Column) -> Callable[[Any], str]:
    """The canonical text of a column's value, by declared type (not by what a driver returned)."""
    t = _declared(col)
    if isinstance(t, sa.Boolean):
        return lambda v: "true" if v else "false"
    if isinstance(t, sa.DateTime):
        return _canon_datetime
    if isinstance(t, sa.LargeBinary):
        return lambda v: hashlib.sha256(v).hexdigest()
    if isinstance(t, sa.Float):
        return lambda v: struct.pack(">d", float(v)).hex()
    if isinstance(t, sa.Integer):
        return _canon_int
    return str


def _canon_int(v: Any) -> str:
    return str(v) if type(v) is int else str(int(v))


def _canon_sql(col: sa.Column) -> str:
    """The same canonical text as `_canon_py`, as a PostgreSQL expression."""
    name = f't."{col.name}"'
    t = _declared(col)
    if isinstance(t, sa.DateTime):
        return f"(extract(epoch from {name}) * 1000000)::bigint::text"
    if isinstance(t, sa.LargeBinary):
        return f"encode(sha256({name}), 'hex')"
    if isinstance(t, sa.Float):
        return f"encode(float8send({name}), 'hex')"
    if isinstance(t, (sa.Boolean, sa.Integer)):
        return f"{name}::text"
    return f"{name}::text"


def _pg_value(col: sa.Column) -> Callable[[Any], Any] | None:
    """How a source value becomes a COPY value (None: as it is)."""
    if isinstance(_declared(col), sa.DateTime):
        return lambda v: v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v
    if isinstance(_declared(col), sa.LargeBinary):
        return bytes
    return None


class RowCodec:
    """Canonical, backend-independent encoding of a table's rows, and their digests."""

    def __init__(self, table: sa.Table):
        self.table = table
        self.columns = [c.name for c in table.columns]
        self.key_idx = [self.columns.index(c.name) for c in table.primary_key.columns]
        self._canon = [_canon_py(c) for c in table.columns]
        self._pg = [_pg_value(c) for c in table.columns]
        self._text_idx = [i for i, c in enumerate(table.columns) if isinstance(c.type, sa.String)]
        self._sized_idx = [i for i, c in enumerate(table.columns) if isinstance(c.type, (sa.String, sa.LargeBinary))]

    def key(self, row: Sequence[Any]) -> tuple:
        return tuple(row[i] for i in self.key_idx)

    def digest(self, row: Sequence[Any]) -> int:
        parts = []
        for f, v in zip(self._canon, row):
            if v is None:
                parts.append("N")
            else:
                # Text columns are their own canonical text: no call for the commonest case.
                text = v if f is str and type(v) is str else f(v)
                parts.append(f"V{len(text)}:{text}")
        return int.from_bytes(hashlib.sha256("".join(parts).encode("utf-8", "surrogatepass")).digest(), "big")

    def size(self, values: Sequence[Any]) -> int:
        """Characters and bytes of a row's text and binary values (the bench's MB)."""
        return sum(len(values[i]) for i in self._sized_idx if values[i] is not None)

    def digest_sql(self) -> str:
        """A PostgreSQL expression (over alias `t`) equal to `digest` as 64 hex characters."""
        parts = []
        for col in self.table.columns:
            x = _canon_sql(col)
            parts.append(f"CASE WHEN t.\"{col.name}\" IS NULL THEN 'N' ELSE 'V' || length({x}) || ':' || {x} END")
        return f"encode(sha256(convert_to(concat({', '.join(parts)}), 'UTF8')), 'hex')"

    def to_pg(self, row: Sequence[Any]) -> list[Any]:
        for i in self._text_idx:
            v = row[i]
            if v is not None and "\x00" in v:
                raise MigrationError(
                    f"{self.table.name} row {self.key(row)} column {self.columns[i]} contains NUL "
                    "characters, which PostgreSQL text cannot store: re-ingest that document with "
                    "the current parser (it strips them) and re-run the migration"
                )
        return [v if (f is None or v is None) else f(v) for f, v in zip(self._pg, row)]


def checksum_of(digests: Iterable[int]) -> str:
    """Order-independent checksum of row digests (their sum modulo 2**256, as hex)."""
    return format(sum(digests) % _MOD, "064x")


def _partition_rows(conn: sa.Connection, spec: TableSpec, shard: str, batch: int) -> Iterator[list[Sequence[Any]]]:
    """The rows of one shard of a table, in batches (filtered in Python where SQL cannot)."""
    pred = spec.predicate(shard, conn.dialect.name)
    stmt = sa.select(spec.table)
    if pred is not None:
        stmt = stmt.where(pred)
    result = conn.execution_options(yield_per=batch).execute(stmt)
    cols = [c.name for c in spec.table.columns]
    for part in result.partitions(batch):
        if pred is None:
            part = [r for r in part if spec.shard_of_row(dict(zip(cols, r))) == shard]
        if part:
            yield part


def digests_of(engine: Engine, spec: TableSpec, shard: str, batch: int = 5000, in_database: bool | None = None) -> dict[tuple, int]:
    """{primary key: row digest} of one shard of a table.

    PostgreSQL computes the digests itself (`in_database`, the default there); elsewhere the
    rows are read and digested in Python. Both give the same digest for the same row.
    """
    codec = RowCodec(spec.table)
    out: dict[tuple, int] = {}
    if in_database is None:
        in_database = engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        if in_database:
            keys = ", ".join(f't."{c}"' for c in spec.key)
            sql = f"SELECT {keys}, {codec.digest_sql()} {_shard_from(conn, spec, shard)}"
            result = conn.execution_options(yield_per=batch).exec_driver_sql(sql)
            n = len(spec.key)
            for row in result:
                out[tuple(row[:n])] = int(row[n], 16)
            return out
        for part in _partition_rows(conn, spec, shard, batch):
            for row in part:
                out[codec.key(row)] = codec.digest(row)
    return out


def _shard_from(conn: sa.Connection, spec: TableSpec, shard: str) -> str:
    """`FROM <table> AS t WHERE <the shard's rows>` as literal SQL for `conn`'s dialect."""
    pred = spec.predicate(shard, conn.dialect.name)
    where = str(pred.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    where = where.replace(f'"{spec.name}".', "t.").replace(f"{spec.name}.", "t.")
    return f'FROM "{spec.name}" AS t WHERE {where}'


def checksum_in_database(engine: Engine, spec: TableSpec, shard: str) -> tuple[int, str]:
    """(rows, `checksum_of` their digests) of one shard of a PostgreSQL table, summed by
    PostgreSQL itself: one row comes back instead of a digest per row."""
    codec = RowCodec(spec.table)
    # The 256-bit digest as four 64-bit words, summed exactly as numeric (read as signed,
    # corrected below). OFFSET 0 keeps the digest one value per row instead of being inlined
    # into every word.
    words = ", ".join(f"('x' || substr(h, {1 + 16 * i}, 16))::bit(64)::bigint AS w{i}" for i in range(4))
    sums = ", ".join(f"coalesce(sum(w{i}::numeric), 0), count(*) FILTER (WHERE w{i} < 0)" for i in range(4))
    with engine.connect() as conn:
        row = conn.exec_driver_sql(
            f"SELECT count(*), {sums} FROM (SELECT {words} FROM "
            f"(SELECT {codec.digest_sql()} AS h {_shard_from(conn, spec, shard)} OFFSET 0) d OFFSET 0) w"
        ).one()
    # A word read as negative stands for itself + 2**64.
    total = sum((int(row[1 + 2 * i]) + (int(row[2 + 2 * i]) << 64)) << (64 * (3 - i)) for i in range(4))
    return int(row[0]), format(total % _MOD, "064x")


# --------------------------------------------------------------------------- state


def _relaxed_commit(conn: sa.Connection) -> None:
    """Commit this transaction without waiting for its WAL flush.

    Safe here: a shard's rows and its state commit together, so a server crash can only lose
    whole recent shards, which the re-run copies again; it saves one fsync per (table, shard).
    """
    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")


def _set_states(conn: sa.Connection, rows: Sequence[tuple[str, str, str, int, str | None]]) -> None:
    """Upsert (table_name, shard, state, rows, checksum) rows of migration_state."""
    _relaxed_commit(conn)
    now = util.utcnow()
    store.upsert(
        conn,
        store.migration_state,
        [
            {"table_name": t, "partition": p, "state": st, "rows": n, "checksum": c, "updated_at": now}
            for t, p, st, n, c in rows
        ],
        ["table_name", "partition"],
    )


def migration_states(target: Engine) -> dict[tuple[str, str], dict[str, Any]]:
    """{(table_name, shard): migration_state row} on the target (empty if it has no schema yet)."""
    if target not in _PREPARED and not sa.inspect(target).has_table(store.migration_state.name):
        return {}
    with target.connect() as conn:
        rows = conn.execute(sa.select(store.migration_state)).mappings().all()
    return {(r["table_name"], r["partition"]): dict(r) for r in rows}


# --------------------------------------------------------------------------- rows


@dataclass
class BatchInfo:
    """Progress of a running shard copy, handed to the `on_batch` callback between batches."""

    table: str
    shard: str
    rows_sent: int
    backend_pid: int


def _diff(table: str, shard: str, source: Mapping[tuple, int], target: Mapping[tuple, int]) -> list[Difference]:
    out = []
    for key in source.keys() - target.keys():
        out.append(Difference("row", table, shard, _fmt_key(key), "missing on target"))
    for key in target.keys() - source.keys():
        out.append(Difference("row", table, shard, _fmt_key(key), "extra on target (not in source)"))
    for key in source.keys() & target.keys():
        if source[key] != target[key]:
            out.append(Difference("row", table, shard, _fmt_key(key), "differs from source"))
    return sorted(out, key=lambda d: d.key)


def _fmt_key(key: tuple) -> str:
    return key[0] if len(key) == 1 else "|".join(str(k) for k in key)


def _copy_table_shard(
    source: Engine,
    target: Engine,
    spec: TableSpec,
    shard: str,
    batch_rows: int,
    on_batch: Callable[[BatchInfo], None] | None,
) -> tuple[dict[tuple, int], int]:
    """Copy one shard of one table in one target transaction; returns (source digests, bytes).

    The shard's rows and its `copied` state commit together, so a killed copy leaves nothing.
    """
    codec = RowCodec(spec.table)
    cols = ", ".join(f'"{c}"' for c in codec.columns)
    key_cols = ", ".join(f'"{c}"' for c in spec.key)
    source_digests: dict[tuple, int] = {}
    nbytes = 0
    with target.begin() as tconn, source.connect() as sconn:
        # One copier per shard at a time, even when Dagster retries a step that is still running.
        tconn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"migrate:{spec.name}:{shard}"})
        _relaxed_commit(tconn)
        pred_t = spec.predicate(shard, "postgresql")
        has_rows = tconn.execute(sa.select(sa.literal(1)).select_from(spec.table).where(pred_t).limit(1)).first()
        dest = spec.name
        if has_rows:
            dest = f"_stage_{spec.name}"
            tconn.exec_driver_sql(f'CREATE TEMP TABLE "{dest}" (LIKE "{spec.name}" INCLUDING DEFAULTS) ON COMMIT DROP')
        raw = tconn.connection.driver_connection
        sent = 0
        with raw.cursor() as cur, cur.copy(f'COPY "{dest}" ({cols}) FROM STDIN') as copy:
            for part in _partition_rows(sconn, spec, shard, batch_rows):
                for row in part:
                    source_digests[codec.key(row)] = codec.digest(row)
                    values = codec.to_pg(row)
                    copy.write_row(values)
                    nbytes += codec.size(values)
                sent += len(part)
                if on_batch is not None:
                    on_batch(BatchInfo(spec.name, shard, sent, raw.info.backend_pid))
        if has_rows:
            non_key = [c for c in codec.columns if c not in spec.key]
            if non_key:
                sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in non_key)
                changed = " OR ".join(f't."{c}" IS DISTINCT FROM EXCLUDED."{c}"' for c in non_key)
                conflict = f"DO UPDATE SET {sets} WHERE {changed}"
            else:
                conflict = "DO NOTHING"
            tconn.exec_driver_sql(
                f'INSERT INTO "{spec.name}" AS t ({cols}) SELECT {cols} FROM "{dest}" '
                f"ON CONFLICT ({key_cols}) {conflict}"
            )
            # The target shard mirrors the source: rows the source no longer has go.
            pred_sql = str(pred_t.compile(dialect=tconn.dialect, compile_kwargs={"literal_binds": True}))
            match = " AND ".join(f's."{c}" = "{spec.name}"."{c}"' for c in spec.key)
            tconn.exec_driver_sql(
                f'DELETE FROM "{spec.name}" WHERE {pred_sql} AND NOT EXISTS (SELECT 1 FROM "{dest}" s WHERE {match})'
            )
        if spec.table is store.query_log:
            # Ids were copied explicitly; move the sequence past them so new log rows don't collide.
            tconn.exec_driver_sql(
                "SELECT setval(pg_get_serial_sequence('query_log', 'id'), "
                "COALESCE((SELECT max(id) FROM query_log), 0) + 1, false)"
            )
        _set_states(tconn, [(spec.name, shard, "copied", len(source_digests), checksum_of(source_digests.values()))])
    return source_digests, nbytes


def migrate_rows(
    source: Engine,
    target: Engine,
    shard: str,
    force: bool = False,
    batch_rows: int = 5000,
    on_batch: Callable[[BatchInfo], None] | None = None,
    log: Log = None,
) -> dict[str, Any]:
    """Copy and verify every table's rows of one shard; returns totals and per-table rows.

    Tables already verified in this shard are skipped unless `force`. Each table's shard is
    copied in its own transaction (`pending` -> `copied`), then read back: PostgreSQL digests
    its rows, which must equal the digests of the rows read from the source (-> `verified`).
    Raises MigrationError naming the rows that differ.
    """
    _check_shard(shard)
    prepare_target(target)
    t0 = time.perf_counter()
    states = migration_states(target)
    specs = [spec for spec in TABLE_SPECS if shard in spec.shards]
    todo = [s for s in specs if force or states.get((s.name, shard), {}).get("state") != "verified"]
    out: dict[str, Any] = {"rows": 0, "bytes": 0, "tables_skipped": len(specs) - len(todo), "tables": {}}
    if todo:
        with target.begin() as conn:
            _set_states(conn, [(spec.name, shard, "pending", 0, None) for spec in todo])
    verified, diffs = [], []
    for spec in todo:
        source_digests, nbytes = _copy_table_shard(source, target, spec, shard, batch_rows, on_batch)
        expected = (len(source_digests), checksum_of(source_digests.values()))
        # Count and checksum computed by PostgreSQL decide; only when they differ are the
        # rows' digests read back to name the rows that differ.
        found = []
        if checksum_in_database(target, spec, shard) != expected:
            found = _diff(spec.name, shard, source_digests, digests_of(target, spec, shard, batch_rows)) or [
                Difference("row", spec.name, shard, f"shard {shard}", "checksum differs from source")
            ]
        diffs += found
        if not found:
            verified.append((spec.name, shard, "verified", *expected))
        out["rows"] += len(source_digests)
        out["bytes"] += nbytes
        out["tables"][spec.name] = len(source_digests)
    if verified:
        with target.begin() as conn:
            _set_states(conn, verified)
    if diffs:
        raise MigrationError(
            f"shard {shard} read back different from the source: " + "; ".join(str(d) for d in diffs[:10])
        )
    out["seconds"] = time.perf_counter() - t0
    out["rows_per_s"] = out["rows"] / out["seconds"] if out["seconds"] > 0 else 0.0
    emit(log, f"rows[{shard}]: {out['rows']} copied and verified, {out['tables_skipped']} tables skipped, "
          f"{out['seconds']:.2f}s")
    return out


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class ObjectPlan:
    """One object to have in S3: its key, expected bytes and sha256, and where it comes from."""

    key: str
    size: int | None
    sha256: str
    path: Path | None = None  # a local file to upload
    store_key: str | None = None  # or a key in the source object store
    problem: str | None = None  # why it cannot be uploaded (the source file is gone, changed...)


def _local_path(uri: str, base: Path | None) -> Path | None:
    """The local file a source URI names (relative ones under `base`), or None for remote URIs."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if "://" in uri:
        return None
    path = Path(uri)
    return path if path.is_absolute() else (base or Path.cwd()) / path


def _plan_papers(source: Engine, shard: str, inbox: Path | None = None) -> list[ObjectPlan]:
    """The original PDFs of a shard: one object per document, `papers/<doc_id>.pdf`.

    Documents whose every source is remote (already in S3) have nothing to upload.
    """
    d, s = store.documents, store.document_sources
    with source.connect() as conn:
        rows = conn.execute(
            sa.select(s.c.doc_id, s.c.uri, s.c.size)
            .join(d, d.c.doc_id == s.c.doc_id)
            .where(d.c.source_kind == "pdf", sa.func.substr(s.c.doc_id, 1, 1) == shard)
            .order_by(s.c.doc_id, s.c.uri)
        ).all()
    by_doc: dict[str, list[tuple[Path, int | None]]] = {}
    for doc_id, uri, size in rows:
        path = _local_path(uri, inbox)
        if path is not None:
            by_doc.setdefault(doc_id, []).append((path, size))
    plans = []
    for doc_id, candidates in by_doc.items():
        key = f"{PAPERS_PREFIX}{doc_id}.pdf"
        present = [(p, sz) for p, sz in candidates if p.is_file()]
        if present:
            path, size = present[0]
            plans.append(ObjectPlan(key, path.stat().st_size, doc_id, path=path))
        else:
            plans.append(
                ObjectPlan(
                    key,
                    candidates[0][1],
                    doc_id,
                    problem=f"source file {candidates[0][0]} is gone: restore it or re-ingest the paper",
                )
            )
    return plans


def _plan_indexes(source_store: Any, shard: str) -> list[ObjectPlan]:
    """The index files (vector indexes and manifests) whose key hashes to the shard."""
    plans = []
    for key in source_store.list(INDEXES_PREFIX):
        if util.sha256_hex(key)[0] != shard:
            continue
        root = getattr(source_store, "root", None)
        if root is not None:
            path = Path(root) / key
            plans.append(ObjectPlan(key, path.stat().st_size, _sha256_path(path), path=path))
        else:
            data = source_store.get_bytes(key)
            plans.append(ObjectPlan(key, len(data), util.sha256_hex(data), store_key=key))
    return plans


def _sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def plan_objects(source: Engine, source_store: Any, shard: str, inbox: Path | None = None) -> dict[str, list[ObjectPlan]]:
    """{object family: plans} of one shard (relative source paths resolve under `inbox`)."""
    _check_shard(shard)
    return {"s3:papers": _plan_papers(source, shard, inbox), "s3:indexes": _plan_indexes(source_store, shard)}


def _s3_key(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


#: S3 answers that mean "try again later" (throttling, a node restarting).
_TRANSIENT_S3_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling"})


def _with_s3_retries(fn: Callable[..., Any], *args: Any, attempts: int = 6) -> Any:
    """`fn(*args)`, tried again with backoff on transient S3 errors that botocore gave up on.

    botocore retries each call, but its retry quota runs dry in a storm of 503s and then it
    raises at once; a migration would rather wait a few seconds than fail a shard.
    """
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError
    from botocore.exceptions import ConnectionError as S3ConnectionError

    for attempt in range(attempts - 1):
        try:
            return fn(*args)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status < 500 and exc.response.get("Error", {}).get("Code") not in _TRANSIENT_S3_CODES:
                raise
        except (S3ConnectionError, S3UploadFailedError):
            # upload_file wraps whatever failed in S3UploadFailedError; uploads are idempotent.
            pass
        time.sleep(min(8.0, 0.25 * 2**attempt))
    return fn(*args)


def _head(s3: Any, bucket: str, key: str) -> dict | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _object_problem(s3: Any, bucket: str, prefix: str, plan: ObjectPlan, deep: bool = False) -> str | None:
    """Why the target object does not match the plan (None when it does)."""
    head = _head(s3, bucket, _s3_key(prefix, plan.key))
    if head is None:
        return "missing on target" + (f" ({plan.problem})" if plan.problem else "")
    if plan.size is not None and int(head["ContentLength"]) != plan.size:
        return f"size {head['ContentLength']} on target, {plan.size} in source"
    if head.get("Metadata", {}).get("sha256") != plan.sha256:
        return "sha256 on target differs from source"
    if deep:
        body = s3.get_object(Bucket=bucket, Key=_s3_key(prefix, plan.key))["Body"]
        h = hashlib.sha256()
        for block in iter(lambda: body.read(1 << 20), b""):
            h.update(block)
        if h.hexdigest() != plan.sha256:
            return "content on target differs from source (sha256 of the bytes read back)"
    return None


def ensure_bucket(s3: Any, bucket: str) -> None:
    """Create the bucket when it does not exist yet."""
    try:
        s3.head_bucket(Bucket=bucket)
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        region = s3.meta.region_name
        kwargs = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **kwargs)


def _upload(s3: Any, bucket: str, prefix: str, plan: ObjectPlan, source_store: Any) -> tuple[int, str | None]:
    """Upload one object unless the target already has it; returns (bytes sent, problem)."""
    from boto3.s3.transfer import TransferConfig

    if _object_problem(s3, bucket, prefix, plan) is None:
        return 0, None
    if plan.problem:
        return 0, plan.problem
    extra = {"Metadata": {"sha256": plan.sha256}}
    key = _s3_key(prefix, plan.key)
    if plan.path is not None:
        actual = _sha256_path(plan.path)
        if actual != plan.sha256:
            return 0, f"{plan.path} changed since it was ingested (sha256 {actual[:12]}...): re-ingest it"
        # Multipart above 16 MiB; each part is retried by botocore and S3 assembles atomically.
        config = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
        s3.upload_file(str(plan.path), bucket, key, ExtraArgs=extra, Config=config)
    else:
        data = source_store.get_bytes(plan.store_key)
        s3.put_object(Bucket=bucket, Key=key, Body=data, **extra)
    problem = _object_problem(s3, bucket, prefix, plan)
    return (plan.size or 0), (f"after upload: {problem}" if problem else None)


def migrate_objects(
    source: Engine,
    source_store: Any,
    s3: Any,
    bucket: str,
    prefix: str,
    target: Engine,
    shard: str,
    force: bool = False,
    workers: int = 8,
    log: Log = None,
    inbox: Path | None = None,
) -> dict[str, Any]:
    """Upload and verify the papers and index files of one shard (skipping what S3 already has).

    Raises MigrationError naming every object that could not be uploaded or read back equal.
    """
    prepare_target(target)
    ensure_bucket(s3, bucket)
    t0 = time.perf_counter()
    states = migration_states(target)
    out: dict[str, Any] = {"objects": 0, "bytes": 0, "objects_skipped": 0}
    problems: list[str] = []
    for family, plans in plan_objects(source, source_store, shard, inbox).items():
        state = states.get((family, shard))
        if state and state["state"] == "verified" and not force:
            out["objects_skipped"] += len(plans)
            continue
        with target.begin() as conn:
            _set_states(conn, [(family, shard, "pending", 0, None)])
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(lambda p: _with_s3_retries(_upload, s3, bucket, prefix, p, source_store), plans))
        family_problems = [f"{p.key}: {why}" for p, (_, why) in zip(plans, results) if why]
        out["objects"] += len(plans)
        out["bytes"] += sum(sent for sent, _ in results)
        if family_problems:
            problems += family_problems
            continue
        with target.begin() as conn:
            _set_states(conn, [(family, shard, "verified", len(plans), checksum_of(int(p.sha256, 16) for p in plans))])
    out["seconds"] = time.perf_counter() - t0
    out["mb_per_s"] = out["bytes"] / 1e6 / out["seconds"] if out["seconds"] > 0 else 0.0
    if problems:
        raise MigrationError(f"shard {shard}: {len(problems)} objects not migrated: " + "; ".join(problems[:20]))
    emit(log, f"objects[{shard}]: {out['objects']} checked, {out['bytes']} bytes sent in {out['seconds']:.2f}s")
    return out


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Difference:
    """One thing that differs between source and target."""

    kind: str  # row | object | table | state
    where: str  # table name or object family
    shard: str
    key: str
    problem: str

    def __str__(self) -> str:
        if self.kind == "object":
            return f"object {self.key}: {self.problem}"
        if self.kind == "row":
            return f"{self.where} row {self.key} (shard {self.shard}): {self.problem}"
        return f"{self.where} {self.key}: {self.problem}"


@dataclass
class VerifyReport:
    """The outcome of comparing the whole source with the target."""

    rows: int = 0
    objects: int = 0
    partitions: int = 0
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differences

    def summary(self, limit: int = 20) -> str:
        if self.ok:
            return f"verified: {self.rows} rows and {self.objects} objects in {self.partitions} partitions equal"
        lines = [str(d) for d in self.differences[:limit]]
        more = len(self.differences) - len(lines)
        return (
            f"{len(self.differences)} differences between source and target: "
            + "; ".join(lines)
            + (f"; and {more} more" if more > 0 else "")
            + ". Re-run migration_job with force for the named partitions, then verify again."
        )

    def as_metadata(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "objects": self.objects,
            "partitions": self.partitions,
            "differences": len(self.differences),
            "seconds": round(self.seconds, 3),
        }


def verify(
    source: Engine,
    target: Engine,
    source_store: Any = None,
    s3: Any = None,
    bucket: str = "",
    prefix: str = "",
    shards: Sequence[str] = store.SHARDS,
    deep: bool = False,
    log: Log = None,
    inbox: Path | None = None,
) -> VerifyReport:
    """Compare source and target row by row and object by object; name every difference.

    Rows are compared by primary key and canonical digest, objects by size and sha256 (the
    bytes themselves when `deep`); every (table, shard) must also be `verified` in
    migration_state, and whole-table counts must match (rows outside the hex shards included).
    With `s3=None` only the rows are compared.
    """
    t0 = time.perf_counter()
    report = VerifyReport()
    states = migration_states(target)
    has_schema = bool(states) or sa.inspect(target).has_table(store.migration_state.name)
    for spec in TABLE_SPECS:
        for shard in (s for s in shards if s in spec.shards):
            report.partitions += 1
            st = states.get((spec.name, shard))
            if st is None or st["state"] != "verified":
                report.differences.append(
                    Difference("state", spec.name, shard, f"shard {shard}", f"not migrated ({st['state'] if st else 'never run'})")
                )
            if not has_schema:
                continue
            src = digests_of(source, spec, shard)
            tgt = digests_of(target, spec, shard)
            report.rows += len(src)
            report.differences += _diff(spec.name, shard, src, tgt)
        if has_schema and list(shards) == list(store.SHARDS):
            with source.connect() as sc, target.connect() as tc:
                n_src = sc.execute(sa.select(sa.func.count()).select_from(spec.table)).scalar_one()
                n_tgt = tc.execute(sa.select(sa.func.count()).select_from(spec.table)).scalar_one()
            if n_src != n_tgt:
                report.differences.append(
                    Difference("table", spec.name, "*", "row count", f"{n_tgt} rows on target, {n_src} in source")
                )
    for shard in shards if s3 is not None else ():
        for family, plans in plan_objects(source, source_store, shard, inbox).items():
            st = states.get((family, shard))
            if st is None or st["state"] != "verified":
                report.differences.append(
                    Difference("state", family, shard, f"shard {shard}", f"not migrated ({st['state'] if st else 'never run'})")
                )
            with ThreadPoolExecutor(max_workers=8) as pool:
                found = list(pool.map(lambda p: _with_s3_retries(_object_problem, s3, bucket, prefix, p, deep), plans))
            report.objects += len(plans)
            report.differences += [Difference("object", family, shard, p.key, why) for p, why in zip(plans, found) if why]
    report.seconds = time.perf_counter() - t0
    emit(log, report.summary())
    return report


# --------------------------------------------------------------------------- republish + cutover


def republish(target: Engine, target_store: Any, log: Log = None) -> dict[str, Any]:
    """Make the live index generation searchable on the target.

    The vector files were copied under the same keys, so the generation's manifest key resolves
    in the S3 store; it is loaded (every file's sha256 checked). A SQLite FTS5 table cannot be
    copied to PostgreSQL, so the live generation's full-text table is rebuilt from the migrated
    chunks with the same code that built it.
    """
    from research_pipeline.lib.embed import vectors
    from research_pipeline.lib.search import fts

    with target.connect() as conn:
        live = conn.execute(
            sa.select(store.index_generations)
            .join(store.index_pointer, store.index_pointer.c.gen_id == store.index_generations.c.gen_id)
            .where(store.index_pointer.c.name == "live")
        ).mappings().first()
    if live is None:
        emit(log, "no live index generation to republish")
        return {"live_generation": None, "fts_rows": 0, "vectors": 0}
    index = vectors.load_vector_index(target_store, live["vector_key"])
    if index.ntotal != live["n_vectors"]:
        raise MigrationError(
            f"generation {live['gen_id']}: {live['vector_key']} holds {index.ntotal} vectors on "
            f"{target_store.url}, the generation recorded {live['n_vectors']}: re-run migration_job with force"
        )
    fts_rows = fts.build_fts(target, live["fts_table"])
    if fts_rows != live["n_fts_rows"]:
        raise MigrationError(
            f"generation {live['gen_id']}: rebuilt {live['fts_table']} with {fts_rows} rows on the target, "
            f"the source generation had {live['n_fts_rows']}: migrate every partition before republishing"
        )
    emit(log, f"republished generation {live['gen_id']}: {fts_rows} full-text rows, {index.ntotal} vectors")
    return {"live_generation": live["gen_id"], "fts_rows": fts_rows, "vectors": int(index.ntotal)}


def _safe_url(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def cutover(
    source: Engine,
    target: Engine,
    source_store: Any,
    s3: Any,
    bucket: str,
    prefix: str = "",
    log: Log = None,
    inbox: Path | None = None,
) -> dict[str, Any]:
    """Record the cutover in the bucket after a full verification; refuses when anything differs.

    Raises MigrationNotVerified naming the differences. Nothing on the source changes: rolling
    back is pointing RP_DATABASE_URL and RP_OBJECT_STORE_URL at the old values.
    """
    report = verify(source, target, source_store, s3, bucket, prefix, log=log, inbox=inbox)
    if not report.ok:
        raise MigrationNotVerified(report)
    record = {
        "cutover_at": util.utcnow().isoformat(),
        "source_database": _safe_url(source.url.render_as_string(hide_password=False)),
        "target_database": _safe_url(target.url.render_as_string(hide_password=False)),
        "object_store": f"s3://{bucket}/{prefix.strip('/')}".rstrip("/"),
        **report.as_metadata(),
    }
    s3.put_object(Bucket=bucket, Key=_s3_key(prefix, CUTOVER_KEY), Body=store.dumps(record).encode("utf-8"))
    emit(log, f"cutover recorded at s3://{bucket}/{_s3_key(prefix, CUTOVER_KEY)}")
    return record


# --------------------------------------------------------------------------- dry run


def _table_bytes(conn: sa.Connection, spec: TableSpec) -> int:
    sized = [c for c in spec.table.columns if isinstance(c.type, (sa.String, sa.LargeBinary))]
    if not sized:
        return 0
    total = sum(sa.func.coalesce(sa.func.sum(sa.func.length(c)), 0) for c in sized)
    return int(conn.execute(sa.select(total).select_from(spec.table)).scalar_one() or 0)


def dry_run(
    source: Engine,
    source_store: Any,
    shards: Sequence[str] = store.SHARDS,
    target: Engine | None = None,
    inbox: Path | None = None,
) -> dict[str, Any]:
    """What a migration of `shards` would move (rows, bytes, objects, estimated seconds); changes nothing.

    With a `target` that already has migration state, verified shards are left out of the
    estimate, as a real run would skip them. Only reads.
    """
    states = migration_states(target) if target is not None else {}
    out: dict[str, Any] = {"tables": {}, "rows": 0, "bytes": 0, "objects": 0, "object_bytes": 0}
    with source.connect() as conn:
        for spec in TABLE_SPECS:
            todo = [s for s in shards if states.get((spec.name, s), {}).get("state") != "verified"]
            if not todo:
                out["tables"][spec.name] = 0
                continue
            total = conn.execute(sa.select(sa.func.count()).select_from(spec.table)).scalar_one()
            nbytes = _table_bytes(conn, spec)
            if len(todo) == len(store.SHARDS):
                rows = total
            else:
                rows = sum(
                    1
                    for s in todo
                    for part in _partition_rows(conn, spec, s, 5000)
                    for _ in part
                )
                nbytes = int(nbytes * rows / total) if total else 0
            out["tables"][spec.name] = rows
            out["rows"] += rows
            out["bytes"] += nbytes
    for shard in shards:
        for family, plans in plan_objects(source, source_store, shard, inbox).items():
            if states.get((family, shard), {}).get("state") == "verified":
                continue
            out["objects"] += len(plans)
            out["object_bytes"] += sum(p.size or 0 for p in plans)
    out["estimated_seconds"] = round(
        out["rows"] / EST_ROWS_PER_S + (out["bytes"] + out["object_bytes"]) / EST_BYTES_PER_S, 2
    )
    return out
