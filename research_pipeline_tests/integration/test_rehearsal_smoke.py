"""`bench/rehearsal.py --smoke`: the production topology up on loopback, a few searches, one scrape, down.

Runs the rehearsal as `make rehearsal` does (a subprocess) in its smoke mode: a PostgreSQL
primary + streaming replica, Redis, moto's S3 server, Dagster's code server, webserver and
daemon on PostgreSQL storage, 3 search replicas on the standby behind nginx, the exporters and
Prometheus with the shipped alert rules; two papers are indexed into the primary + S3. The
test reads the summary (the last line of output) and checks what the smoke promises, then that
no process of the topology is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from research_pipeline_tests.shared import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NEEDED = ("redis-server", "prometheus", "promtool", "prometheus-postgres-exporter", "prometheus-redis-exporter",
          "prometheus-nginx-exporter")


def test_rehearsal_smoke_brings_the_topology_up_serves_scrapes_and_stops(tmp_path):
    missing = [b for b in NEEDED if shutil.which(b) is None]
    assert not missing, f"not installed: {missing} (make setup installs the Debian packages)"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.rehearsal", "--smoke", "--keep-logs", str(tmp_path / "logs")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RP_", "DAGSTER_"))},
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the rehearsal stops its topology on SIGTERM
        stdout, stderr = proc.communicate(timeout=120)
        pytest.fail(f"the smoke did not finish in 600 s:\n{stderr[-4000:]}")
    lines = stdout.strip().splitlines()
    assert lines, stderr[-4000:]
    summary = json.loads(lines[-1])
    assert summary.get("failure") is None, summary["failure"]
    assert summary["replicas_ready"] == 3
    assert summary["smoke_searches_ok"] == 5 and summary["errors"] == 0
    assert summary["targets_down"] == 0 and summary["targets_total"] >= 9
    assert summary["rules_loaded"] > 0 and summary["alert_tests_passed"] is True
    assert summary["replica_lag_s"] is not None
    security = summary["security"]
    assert security["internal_refused_outside"] and not security["exposed"]
    assert security["oversized_status"] == 413
    assert security["flood"]["flood_statuses"].get("429", 0) > 0
    assert security["flood"]["other_client_status"] == 200
    assert summary["leftover_processes"] == []
    assert summary["ok"] is True and proc.returncode == 0
