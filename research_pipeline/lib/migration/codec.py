"""The canonical form of a row, its digest and a shard's checksum, in Python and in PostgreSQL.

Every column becomes text by its declared type (timestamps as UTC epoch microseconds, floats
as their IEEE-754 bits, bytes as the hex sha256 of the bytes, booleans as true/false), each
value is length-prefixed ("V<len>:<text>", NULL is "N"), and the row digest is the sha256 of
the concatenation. The same encoding is computed by PostgreSQL's own SQL, so verification reads
back a count and a checksum (or 64 hex characters per row) rather than the rows.

Text PostgreSQL cannot store (NUL, lone surrogates) is normalised to U+FFFD, one character for
one, in the columns a `TableSpec` names (free text from outside the pipeline); the digests of
the source are taken of the normalised row, so the verification compares what the target can
hold. Anywhere else such text is refused by name.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core.util import as_utc, pg_safe_text, sha256_hex
from research_pipeline.lib.migration.errors import MigrationError
from research_pipeline.lib.migration.tables import TableSpec, partition_rows, shard_from

_MOD = 1 << 256
#: What PostgreSQL text cannot hold (util.pg_safe_text replaces the same characters).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _declared(col: sa.Column) -> sa.types.TypeEngine:
    """The column's storage type: a TypeDecorator (store.UtcDateTime) is judged by its impl."""
    t = col.type
    return t.impl if isinstance(t, sa.types.TypeDecorator) else t


def _canon_datetime(v: datetime) -> str:
    # SQLite hands back naive datetimes that were written as UTC; PostgreSQL aware ones.
    return str((as_utc(v) - _EPOCH) // timedelta(microseconds=1))


def _canon_int(v: Any) -> str:
    return str(v) if type(v) is int else str(int(v))


def _canon_py(col: sa.Column) -> Callable[[Any], str]:
    """The canonical text of a column's value, by declared type (not by what a driver returned)."""
    t = _declared(col)
    if isinstance(t, sa.Boolean):
        return lambda v: "true" if v else "false"
    if isinstance(t, sa.DateTime):
        return _canon_datetime
    if isinstance(t, sa.LargeBinary):
        return sha256_hex
    if isinstance(t, sa.Float):
        return lambda v: struct.pack(">d", float(v)).hex()
    if isinstance(t, sa.Integer):
        return _canon_int
    return str


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
    return f"{name}::text"


def _pg_value(col: sa.Column) -> Callable[[Any], Any] | None:
    """How a source value becomes a COPY value (None: as it is)."""
    t = _declared(col)
    if isinstance(t, sa.DateTime):
        return as_utc
    if isinstance(t, sa.LargeBinary):
        return bytes
    return None


class RowCodec:
    """Canonical, backend-independent encoding of a table's rows, and their digests."""

    def __init__(self, spec: TableSpec):
        table = spec.table
        self.spec = spec
        self.columns = [c.name for c in table.columns]
        self.key_idx = [self.columns.index(c.name) for c in table.primary_key.columns]
        self._canon = [_canon_py(c) for c in table.columns]
        self._pg = [_pg_value(c) for c in table.columns]
        normalised = spec.normalised_columns
        self._text_idx = [
            (i, c.name in normalised) for i, c in enumerate(table.columns) if isinstance(c.type, sa.String)
        ]
        self._sized_idx = [
            i for i, c in enumerate(table.columns) if isinstance(_declared(c), (sa.String, sa.LargeBinary))
        ]

    def key(self, row: Sequence[Any]) -> tuple:
        return tuple(row[i] for i in self.key_idx)

    def clean(self, row: Sequence[Any]) -> Sequence[Any]:
        """The row as PostgreSQL can store it: normalised where allowed, else MigrationError."""
        out = None
        for i, normalise in self._text_idx:
            v = row[i]
            if v is None or (v.isascii() and "\x00" not in v) or not _UNSTORABLE.search(v):
                continue
            if not normalise:
                raise self._refused(row, i)
            if out is None:
                out = list(row)
            out[i] = pg_safe_text(v)
        return row if out is None else out

    def _refused(self, row: Sequence[Any], i: int) -> MigrationError:
        what = "NUL characters" if "\x00" in row[i] else "lone surrogates (bytes that are not UTF-8)"
        kind = "an identifier" if self.columns[i] in {*self.spec.key, self.spec.by} else "a column"
        return MigrationError(
            f"{self.spec.name} row {self.key(row)} column {self.columns[i]} contains {what}, which "
            f"PostgreSQL text cannot store; it is {kind} the pipeline writes itself, so the migration "
            "will not change it: the source database was damaged or written by other software. Correct "
            f"or delete that row in the source, then re-run migration_job for shard {self.spec.shard_of_row(dict(zip(self.columns, row)))}"
        )

    def digest(self, row: Sequence[Any]) -> int:
        """The row's digest (of the row as `clean` returns it)."""
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
        for col in self.spec.table.columns:
            x = _canon_sql(col)
            parts.append(f"CASE WHEN t.\"{col.name}\" IS NULL THEN 'N' ELSE 'V' || length({x}) || ':' || {x} END")
        return f"encode(sha256(convert_to(concat({', '.join(parts)}), 'UTF8')), 'hex')"

    def to_pg(self, row: Sequence[Any]) -> list[Any]:
        """The COPY values of a row `clean` returned."""
        return [v if (f is None or v is None) else f(v) for f, v in zip(self._pg, row)]


def checksum_of(digests: Iterable[int]) -> str:
    """Order-independent checksum of row digests (their sum modulo 2**256, as hex)."""
    return format(sum(digests) % _MOD, "064x")


def digests_of(engine: Engine, spec: TableSpec, shard: str, batch: int = 5000, in_database: bool | None = None) -> dict[tuple, int]:
    """{primary key: row digest} of one shard of a table.

    PostgreSQL computes the digests itself (`in_database`, the default there); elsewhere the
    rows are read, cleaned and digested in Python. Both give the same digest for the same row.
    """
    codec = RowCodec(spec)
    out: dict[tuple, int] = {}
    if in_database is None:
        in_database = engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        if in_database:
            keys = ", ".join(f't."{c}"' for c in spec.key)
            sql = f"SELECT {keys}, {codec.digest_sql()} {shard_from(conn, spec, shard)}"
            result = conn.execution_options(yield_per=batch).exec_driver_sql(sql)
            n = len(spec.key)
            for row in result:
                out[tuple(row[:n])] = int(row[n], 16)
            return out
        for part in partition_rows(conn, spec, shard, batch):
            for row in part:
                row = codec.clean(row)
                out[codec.key(row)] = codec.digest(row)
    return out


def checksum_in_database(engine: Engine, spec: TableSpec, shard: str) -> tuple[int, str]:
    """(rows, `checksum_of` their digests) of one shard of a PostgreSQL table, summed by
    PostgreSQL itself: one row comes back instead of a digest per row."""
    codec = RowCodec(spec)
    # The 256-bit digest as four 64-bit words, summed exactly as numeric (read as signed,
    # corrected below). OFFSET 0 keeps the digest one value per row instead of being inlined
    # into every word.
    words = ", ".join(f"('x' || substr(h, {1 + 16 * i}, 16))::bit(64)::bigint AS w{i}" for i in range(4))
    sums = ", ".join(f"coalesce(sum(w{i}::numeric), 0), count(*) FILTER (WHERE w{i} < 0)" for i in range(4))
    with engine.connect() as conn:
        row = conn.exec_driver_sql(
            f"SELECT count(*), {sums} FROM (SELECT {words} FROM "
            f"(SELECT {codec.digest_sql()} AS h {shard_from(conn, spec, shard)} OFFSET 0) d OFFSET 0) w"
        ).one()
    # A word read as negative stands for itself + 2**64.
    total = sum((int(row[1 + 2 * i]) + (int(row[2 + 2 * i]) << 64)) << (64 * (3 - i)) for i in range(4))
    return int(row[0]), format(total % _MOD, "064x")
