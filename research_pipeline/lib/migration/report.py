"""What verification found: the differences between source and target, and their summary."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from research_pipeline.lib.migration.errors import MigrationError


class DifferenceKind(enum.StrEnum):
    """What a difference is about."""

    ROW = "row"
    OBJECT = "object"
    TABLE = "table"
    STATE = "state"


@dataclass(frozen=True)
class Difference:
    """One thing that differs between source and target."""

    kind: DifferenceKind
    where: str  # table name or object family
    shard: str
    key: str
    problem: str

    def __str__(self) -> str:
        if self.kind is DifferenceKind.OBJECT:
            return f"object {self.key}: {self.problem}"
        if self.kind is DifferenceKind.ROW:
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


class MigrationNotVerified(MigrationError):
    """Verification found differences between source and target; the cutover is refused."""

    def __init__(self, report: VerifyReport):
        self.report = report
        super().__init__(report.summary())


def _fmt_key(key: tuple) -> str:
    return key[0] if len(key) == 1 else "|".join(str(k) for k in key)


def diff_rows(table: str, shard: str, source: Mapping[tuple, int], target: Mapping[tuple, int]) -> list[Difference]:
    """The rows that are missing, extra or different on the target, by {key: digest}."""
    row = DifferenceKind.ROW
    out = [Difference(row, table, shard, _fmt_key(k), "missing on target") for k in source.keys() - target.keys()]
    out += [Difference(row, table, shard, _fmt_key(k), "extra on target (not in source)")
            for k in target.keys() - source.keys()]
    out += [Difference(row, table, shard, _fmt_key(k), "differs from source")
            for k in source.keys() & target.keys() if source[k] != target[k]]
    return sorted(out, key=lambda d: d.key)
