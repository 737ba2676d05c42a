"""What the corpus database holds, row by row, to check a restore against: a manifest.

Taken before a disaster (or before a restore drill) and again after the restore: per table its
row count and an order-independent checksum of every row's digest (the same per-row sha256 the
migration verifies with, computed by PostgreSQL itself), plus the live index generation. Comparing
two manifests names the rows lost, changed or added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store
from research_pipeline.lib.migration.codec import checksum_of, digests_of
from research_pipeline.lib.migration.tables import TABLE_SPECS


@dataclass(frozen=True)
class TableManifest:
    rows: int
    checksum: str
    #: {primary key: row digest}; kept to name what differs, left out of equality and repr.
    digests: Mapping[tuple, int] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Manifest:
    tables: Mapping[str, TableManifest]
    live_generation: str | None

    def summary(self) -> dict[str, dict[str, object]]:
        """JSON-ready {table: {rows, checksum}} plus the live generation."""
        out: dict[str, dict[str, object]] = {
            name: {"rows": t.rows, "checksum": t.checksum} for name, t in self.tables.items()
        }
        out["_live_generation"] = {"gen_id": self.live_generation}
        return out


def take_manifest(engine: Engine) -> Manifest:
    """The manifest of the corpus tables in `engine`'s database (PostgreSQL or SQLite)."""
    tables: dict[str, TableManifest] = {}
    for spec in TABLE_SPECS:
        digests: dict[tuple, int] = {}
        for shard in spec.shards:
            digests.update(digests_of(engine, spec, shard))
        tables[spec.name] = TableManifest(rows=len(digests), checksum=checksum_of(digests.values()), digests=digests)
    live = store.live_generation(engine)
    return Manifest(tables=tables, live_generation=live["gen_id"] if live else None)


@dataclass(frozen=True)
class ManifestDiff:
    lost: Mapping[str, int]  # table -> rows in `before` missing from `after`
    changed: Mapping[str, int]  # table -> rows present in both with different content
    added: Mapping[str, int]  # table -> rows in `after` only
    live_generation_before: str | None
    live_generation_after: str | None

    @property
    def lost_rows(self) -> int:
        return sum(self.lost.values())

    @property
    def ok(self) -> bool:
        """Nothing lost, changed or added, and the same live generation."""
        return (
            not any(self.lost.values())
            and not any(self.changed.values())
            and not any(self.added.values())
            and self.live_generation_before == self.live_generation_after
        )

    def describe(self) -> str:
        parts = [
            f"{kind} {n} row(s) of {table}"
            for kind, by_table in (("lost", self.lost), ("changed", self.changed), ("added", self.added))
            for table, n in by_table.items()
            if n
        ]
        if self.live_generation_before != self.live_generation_after:
            parts.append(f"live generation {self.live_generation_before} -> {self.live_generation_after}")
        return "; ".join(parts) or "identical"


def compare(before: Manifest, after: Manifest) -> ManifestDiff:
    """What differs between two manifests of the same database."""
    lost: dict[str, int] = {}
    changed: dict[str, int] = {}
    added: dict[str, int] = {}
    for name, b in before.tables.items():
        a = after.tables.get(name, TableManifest(0, checksum_of(())))
        lost[name] = sum(1 for k in b.digests if k not in a.digests)
        changed[name] = sum(1 for k, d in b.digests.items() if k in a.digests and a.digests[k] != d)
        added[name] = sum(1 for k in a.digests if k not in b.digests)
    return ManifestDiff(lost, changed, added, before.live_generation, after.live_generation)
