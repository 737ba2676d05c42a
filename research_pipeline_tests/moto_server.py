"""A real S3 endpoint for tests: moto's standalone server in a subprocess on a free loopback port.

Tests talk to it over HTTP with the real boto3 client, exactly as production talks to S3; no
in-process mocking is involved.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Credentials moto accepts; set in the environment so every boto3 client in the test process
#: (ours and dagster-aws's) signs requests the same way without touching real AWS.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """moto's standalone S3 server running as a child process; `url` is its endpoint."""

    def __init__(self, log_dir: Path):
        self.log_path = Path(log_dir) / "moto_server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, attempts: int = 3, timeout_s: float = 60.0) -> str:
        # Another process may grab the port between probing and binding: try a few ports.
        for _ in range(attempts):
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it until stop()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **TEST_CREDENTIALS},
            )
            log.close()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2).close()
                    return self.url
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(0.2)
            self.stop()
        raise RuntimeError(f"moto server did not start; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """The HTTP endpoint of a moto S3 server shared by the tests of one module."""
    saved = {k: os.environ.get(k) for k in TEST_CREDENTIALS}
    os.environ.update(TEST_CREDENTIALS)
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server.start()
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
