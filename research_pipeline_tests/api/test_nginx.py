"""deploy/nginx/nginx.conf for real: Debian's nginx in front of two replicas on loopback."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from research_pipeline_tests.shared import API_GROUP, Running, make_settings, running_service

pytestmark = [API_GROUP, pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_conf(prefix: Path, listen: int, replicas: list[int]) -> Path:
    """The shipped config with its upstream servers and listen port pointed at loopback ports."""
    text = CONF.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;\n" for p in replicas)
    text, n = re.subn(r"(upstream search_replicas \{\n\s+least_conn;\n)(?:\s+server [^\n]+\n)+", r"\g<1>" + servers, text)
    assert n == 1, "the upstream block of deploy/nginx/nginx.conf changed shape"
    text, n = re.subn(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen};", text)
    assert n == 1
    # One worker: upstream state (round robin, failure counts) is per worker without a zone.
    text, n = re.subn(r"worker_processes auto;", "worker_processes 1;", text)
    assert n == 1
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    out = prefix / "nginx.conf"
    out.write_text(text)
    return out


def _nginx(prefix: Path, conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-g", f"pid {prefix}/nginx.pid; error_log {prefix}/logs/error.log;", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )


def _front(stack: ExitStack, prefix: Path, replicas: list[int]) -> Running:
    """nginx with the shipped config in front of `replicas`, stopped when `stack` closes."""
    port = _free_port()
    conf = local_conf(prefix, port, replicas)
    started = _nginx(prefix, conf)
    assert started.returncode == 0, started.stderr
    stack.callback(lambda: _nginx(prefix, conf, "-s", "stop"))
    front = Running(port, None)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return front
        except OSError:
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.1)


@pytest.fixture
def nginx_bin():
    if NGINX is None:
        pytest.fail("Debian's nginx is not installed: apt-get install -y nginx")
    return NGINX


def test_shipped_config_passes_nginx_t(nginx_bin, tmp_path):
    proc = _nginx(tmp_path, local_conf(tmp_path, _free_port(), [_free_port(), _free_port()]), "-t")
    assert proc.returncode == 0, proc.stderr
    assert "syntax is ok" in proc.stderr


def test_nginx_spreads_searches_over_replicas_and_limits_clients(nginx_bin, deployment, tmp_path):
    settings, facts = deployment
    if facts["backend"] != "sqlite":
        pytest.skip("the front does not depend on the database backend")
    with ExitStack() as stack:
        replicas = [stack.enter_context(running_service(settings)) for _ in range(2)]
        front = _front(stack, tmp_path, [r.port for r in replicas])

        for i in range(6):
            status, headers, body = front.get("/search", {"q": f"confusion matrix {i}"})
            assert status == 200, body
            assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
            assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), "nginx's $request_id reaches the replica"
            assert "server" not in headers or "nginx/" not in headers["server"]
        served = [r.service.metrics.requests.labels("ok")._value.get() for r in replicas]
        assert all(n > 0 for n in served) and sum(served) == 6, served

        assert front.get("/metrics")[0] == 404, "metrics are not public"
        assert front.get("/search", {"q": "x" * 20_000})[0] == 414
        statuses = [front.get("/")[0] for _ in range(150)]
        assert 429 in statuses and statuses[0] == 200, "a client past its burst is limited"

    # Outside the stack nginx is stopped and both replicas are closed.


def test_a_replica_answering_503_is_retried_and_not_ejected(nginx_bin, deployment, tmp_path):
    """A 503 (queue full, draining, not ready) is retried on another replica, and does not count
    against the replica's max_fails: under a burst every replica may answer 503 for a moment,
    and ejecting them all turned that into 502 "no live upstreams" for every client."""
    from research_pipeline.lib.core import store

    settings, facts = deployment
    if facts["backend"] != "sqlite":
        pytest.skip("the front does not depend on the database backend")
    # A real replica with no published generation: it answers every search 503 (Retry-After).
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    store.create_schema(store.make_engine(url))
    unready = make_settings(tmp_path, url, [])
    with ExitStack() as stack:
        busy = stack.enter_context(running_service(unready))
        ready = stack.enter_context(running_service(settings))
        assert busy.get("/search", {"q": "confusion matrix"})[0] == 503
        before = busy.service.metrics.requests.labels("not_ready")._value.get()
        # local_conf gives each replica max_fails=1 fail_timeout=30s: counted, one 503 would
        # take the replica out for the rest of the test.
        front = _front(stack, tmp_path / "front", [busy.port, ready.port])
        statuses = [front.get("/search", {"q": f"confusion matrix {i}"})[0] for i in range(8)]
        assert statuses == [200] * 8, statuses
        tried = busy.service.metrics.requests.labels("not_ready")._value.get() - before
        assert tried >= 4, f"the 503 replica was tried {tried} times in 8 searches: nginx ejected it"

    # Every replica answering 503: the client gets the 503 and its Retry-After, not a 502.
    with ExitStack() as stack:
        replicas = [stack.enter_context(running_service(unready)) for _ in range(2)]
        front = _front(stack, tmp_path / "front2", [r.port for r in replicas])
        for i in range(4):
            status, headers, _ = front.get("/search", {"q": f"confusion matrix {i}"})
            assert (status, "retry-after" in headers) == (503, True), (status, headers)
