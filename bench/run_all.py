"""Run every benchmark (or those named in BENCH=...) and rebuild docs/BENCHMARKS.md.

Each bench/bench_<area>.py compares the pipeline against the raw primitive in the same run and
writes its figures to docs/bench/<area>.md; this script runs them in order and concatenates the
sections into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AREAS = ("ingest", "embed", "search", "gates", "migrate")


def merge_docs() -> Path:
    """Concatenate docs/bench/*.md (in AREAS order) into docs/BENCHMARKS.md."""
    parts = [
        "# Benchmarks\n",
        "Latest figures, each measured against the raw primitive in the same run on the 2-core, "
        "24 GiB development machine (no GPU unless stated). Re-run all with `make bench`, one area "
        "with `make bench BENCH=<area>` (areas: " + ", ".join(AREAS) + ").\n",
    ]
    for area in AREAS:
        section = REPO / "docs" / "bench" / f"{area}.md"
        if section.exists():
            parts.append(section.read_text().strip() + "\n")
    out = REPO / "docs" / "BENCHMARKS.md"
    out.write_text("\n".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    wanted = [a for a in (os.environ.get("BENCH") or "").replace(",", " ").split() if a] or list(AREAS)
    unknown = sorted(set(wanted) - set(AREAS))
    if unknown:
        print(f"unknown benchmark area(s) {unknown}; choose from {AREAS}", file=sys.stderr)
        return 2
    failed = []
    for area in wanted:
        print(f"\n== bench_{area} ==", flush=True)
        try:
            importlib.import_module(f"bench.bench_{area}").main()
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
            print(f"bench_{area} failed: {exc!r}", file=sys.stderr)
            failed.append(area)
    print(f"\nwrote {merge_docs()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
