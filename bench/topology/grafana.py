"""Checks a Grafana dashboard JSON against a live Prometheus: every panel query must return data."""

from __future__ import annotations

import json
from pathlib import Path

from bench.topology import checks


def dashboard_queries(path: Path) -> list[tuple[str, str, str]]:
    """(row, panel title, expr) of every Prometheus target in the dashboard, in order."""
    dash = json.loads(Path(path).read_text())
    out, row = [], ""
    for panel in dash["panels"]:
        if panel.get("type") == "row":
            row = panel["title"]
            continue
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((row, panel["title"], target["expr"]))
    return out


def check_dashboard(path: Path, prom_url: str) -> dict:
    """How many of the dashboard's queries return at least one series, and which do not."""
    queries = dashboard_queries(path)
    empty = []
    for row, title, expr in queries:
        try:
            if not checks.query(prom_url, expr):
                empty.append(f"{row} / {title}: {expr}")
        except Exception as exc:  # noqa: BLE001 - a bad query is reported with the rest
            empty.append(f"{row} / {title}: {expr} ({exc})")
    rows = sorted({r for r, _, _ in queries})
    return {"queries": len(queries), "with_data": len(queries) - len(empty), "empty": empty, "rows": rows,
            "ok": bool(queries) and not empty}
