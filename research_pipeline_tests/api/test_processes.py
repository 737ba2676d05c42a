"""The service as real processes: SIGTERM drains (readiness false first), several workers share a port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline_tests.shared import API_GROUP, Running

pytestmark = [API_GROUP, pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
QUERY = "navier stokes finite difference"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(settings) -> dict:
    env = dict(os.environ, RP_HOME=str(settings.home), RP_INBOX=str(settings.inbox),
               RP_DATABASE_URL=settings.database_url, RP_OBJECT_STORE_URL=settings.object_store_url)
    for name in ("RP_REDIS_URL", "DAGSTER_HOME", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    return env


def _wait_ready(svc: Running, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the service exited with {proc.returncode}: {proc.stdout.read()[-3000:]}"
        try:
            if svc.get("/readyz", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the service did not become ready"
        time.sleep(0.2)


def _logged(url: str) -> list[str]:
    engine = store.make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(store.query_log.c.query)).scalars())
    finally:
        engine.dispose()


def test_sigterm_turns_readiness_false_then_finishes_and_flushes(deployment):
    settings, facts = deployment
    if facts["backend"] != "sqlite":
        pytest.skip("shutdown does not depend on the database backend")
    port = _free_port()
    code = (
        "import sys; from pathlib import Path\n"
        "from research_pipeline.config import Settings\n"
        "from research_pipeline.api.app import ServiceOptions, serve\n"
        "s = Settings.from_env()\n"
        f"serve(s, port={port}, workers=1, options=ServiceOptions(drain_s=3.0))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    svc = Running(port, None)
    try:
        _wait_ready(svc, proc)
        proc.send_signal(signal.SIGTERM)
        # Draining: not ready any more, but still answering, for drain_s.
        status, body = svc.json("/readyz")
        assert status == 503 and "draining" in body["reason"]
        status, answer = svc.json("/search", {"q": QUERY, "k": 2})
        assert status == 200 and answer["results"]
        assert svc.get("/healthz")[0] == 200
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert QUERY in _logged(settings.database_url), "the search answered while draining was logged on exit"


def test_cli_serve_with_two_workers_sums_metrics_over_workers(deployment):
    settings, facts = deployment
    if facts["backend"] != "postgresql":
        pytest.skip("one multi-worker run is enough; PostgreSQL is the multi-process deployment")
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("research-pipeline")), "serve", "--port", str(port), "--workers", "2"],
        cwd=REPO, env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    svc = Running(port, None)
    try:
        _wait_ready(svc, proc)
        for i in range(8):
            status, body = svc.json("/search", {"q": f"{QUERY} {i}"})
            assert status == 200, body
        text = svc.get("/metrics")[2].decode()
        # Whichever worker answers the scrape, the counters are the sum over both workers.
        assert 'rp_search_requests_total{outcome="ok"} 8.0' in text, text[-2000:]
        assert "rp_search_latency_seconds_count 8.0" in text
        assert "rp_database_up 1.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logged = _logged(settings.database_url)
    assert all(f"{QUERY} {i}" in logged for i in range(8)), "both workers flushed their query logs"
