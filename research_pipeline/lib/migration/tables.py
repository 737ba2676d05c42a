"""How each table is split into the shards of the content-hash space, and reading one shard.

documents, document_sources and chunks go by `doc_id[0]`, embeddings by `content_hash[0]`,
quarantine by `sha256(uri)[0]`; the small bookkeeping tables (index_generations,
index_pointer, query_log, schema_version) all go to shard '0', so every shard key stays a plain
hex digit shared with the rest of the pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from research_pipeline.lib.core import store

#: The shard that holds the small bookkeeping tables in full.
SMALL_TABLES_SHARD = "0"
#: migration_state.table_name of the two object families.
OBJECT_FAMILIES = ("s3:papers", "s3:indexes")


@dataclass(frozen=True)
class TableSpec:
    """How one table is split into shards: by the first hex digit of `by` (a column or sha256 of one).

    `outside_text`: the table's free text comes from outside the pipeline (papers, records,
    search queries), so text PostgreSQL cannot store is normalised there on copy; everywhere
    else (identifiers, tables the pipeline writes itself) it is refused by name.
    """

    table: sa.Table
    by: str | None  # None: the whole table lives in SMALL_TABLES_SHARD
    hash_key: bool = False  # True: shard = sha256(by)[0] instead of by[0]
    outside_text: bool = False

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

    @property
    def normalised_columns(self) -> frozenset[str]:
        """The text columns normalised on copy: free text from outside, never keys or shard columns."""
        if not self.outside_text:
            return frozenset()
        fixed = {*self.key, self.by}
        return frozenset(c.name for c in self.table.columns if isinstance(c.type, sa.String) and c.name not in fixed)

    def shard_of_row(self, row: Mapping[str, Any]) -> str:
        if self.by is None:
            return SMALL_TABLES_SHARD
        value = row[self.by]
        if not self.hash_key:
            return str(value)[:1]
        # surrogatepass: a key PostgreSQL cannot store still reaches the codec, which names it.
        return hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()[0]

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
    TableSpec(store.documents, "doc_id", outside_text=True),
    TableSpec(store.document_sources, "doc_id", outside_text=True),
    TableSpec(store.chunks, "doc_id", outside_text=True),
    TableSpec(store.quarantine, "uri", hash_key=True, outside_text=True),
    TableSpec(store.embeddings, "content_hash"),
    TableSpec(store.index_generations, None),
    TableSpec(store.index_pointer, None),
    TableSpec(store.query_log, None, outside_text=True),
    TableSpec(store.schema_version, None),
)
SPECS_BY_NAME = {s.name: s for s in TABLE_SPECS}


def expected_states(shards: Sequence[str] = store.SHARDS) -> list[tuple[str, str]]:
    """The (table or object family, shard) pairs a complete migration of `shards` marks verified."""
    pairs = [(spec.name, s) for spec in TABLE_SPECS for s in shards if s in spec.shards]
    return pairs + [(family, s) for family in OBJECT_FAMILIES for s in shards]


def check_shard(shard: str) -> str:
    """`shard`, or ValueError when it is not one of the hex shards."""
    if shard not in store.SHARDS:
        raise ValueError(f"unknown shard {shard!r}: use one of {''.join(store.SHARDS)}")
    return shard


def partition_rows(conn: sa.Connection, spec: TableSpec, shard: str, batch: int) -> Iterator[list[Sequence[Any]]]:
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


def shard_from(conn: sa.Connection, spec: TableSpec, shard: str) -> str:
    """`FROM <table> AS t WHERE <the shard's rows>` as literal SQL for `conn`'s dialect."""
    pred = spec.predicate(shard, conn.dialect.name)
    where = str(pred.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    where = where.replace(f'"{spec.name}".', "t.").replace(f"{spec.name}.", "t.")
    return f'FROM "{spec.name}" AS t WHERE {where}'
