"""One managed child process of the topology: start in its own process group, wait until ready
by polling a probe (bounded), stop the whole group (SIGTERM, then SIGKILL) and check none is left.

Every service of the rehearsal (Redis, moto, Dagster, search replicas, nginx, Prometheus, the
exporters) is one `Proc` with a readiness probe; the orchestrator starts several, then waits.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The address every internal service listens on (pg.py's clusters listen there too).
INTERNAL_HOST = "127.0.0.1"
#: The "public" address: only nginx listens there (see bench/rehearsal.py's security checks).
PUBLIC_HOST = "127.0.0.2"
POLL_S = 0.2


class TopologyError(RuntimeError):
    """A process of the topology did not start, died, or did not become ready in time."""


def free_port(host: str = INTERNAL_HOST) -> int:
    """A port nothing listens on at `host` now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(host: str, port: int, path: str, timeout: float = 5.0,
             headers: dict | None = None, source: str | None = None) -> tuple[int, bytes]:
    """(status, body) of GET http://host:port/path; `source` binds the client's own address."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_ok(host: str, port: int, path: str, timeout: float = 3.0) -> bool:
    """True when GET path answers 200 (False on any connection error or other status)."""
    try:
        return http_get(host, port, path, timeout)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def poll(predicate: Callable[[], Any], timeout_s: float, what: str,
         alive: Sequence[Proc] = ()) -> Any:
    """The first truthy value of `predicate()`, polled every POLL_S for at most `timeout_s`.

    Fails at once when one of `alive` exits (with the tail of its log), else after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in alive:
            proc.check_alive(what)
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p.name} ---\n{p.log_tail()}" for p in alive)
            raise TopologyError(f"timed out after {timeout_s:.0f}s waiting for {what}{tails}")
        time.sleep(POLL_S)


class Proc:
    """A child process in its own session (process group), logging to `log_dir/<name>.log`."""

    #: Seconds given to SIGTERM before the group is killed.
    stop_timeout_s = 20.0

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, *, env: dict | None = None,
                 cwd: Path | None = None, ready: Callable[[], Any] | None = None, ready_timeout_s: float = 60.0):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = env
        self.cwd = cwd
        self.ready = ready
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        #: Where it listens, when it does (set by the factories in services.py and dagster.py).
        self.host = ""
        self.port = 0
        self.url = ""

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self, what: str = "") -> None:
        if self.proc is None:
            raise TopologyError(f"{self.name} was never started")
        if self.proc.poll() is not None:
            raise TopologyError(
                f"{self.name} exited with {self.proc.returncode}"
                f"{' while waiting for ' + what if what else ''}; its log ({self.log_path}):\n{self.log_tail()}"
            )

    def wait_ready(self, timeout_s: float | None = None) -> Proc:
        """Poll the readiness probe until it answers (bounded); fail if the process exits."""
        if self.ready is not None:
            poll(self.ready, timeout_s or self.ready_timeout_s, f"{self.name} to be ready", [self])
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def group_alive(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self) -> None:
        """SIGTERM the group, wait for the leader, then SIGKILL the group until nothing is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Children (run workers, uvicorn workers, nginx workers) may outlive the leader briefly.
        deadline = time.monotonic() + 5
        while self.group_alive():
            if time.monotonic() > deadline:
                _signal_group(pgid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(POLL_S)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Stack:
    """Processes stopped in reverse start order; `leftovers()` names any group still alive."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.cleanups: list[Callable[[], None]] = []

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def start(self, proc: Proc) -> Proc:
        return self.add(proc).start()

    def callback(self, fn: Callable[[], None]) -> None:
        self.cleanups.append(fn)

    def stop_all(self) -> list[str]:
        """Stop everything (errors of one stop do not keep the others running); the errors."""
        errors = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                errors.append(f"{proc.name}: {exc}")
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"cleanup: {exc}")
        return errors

    def leftovers(self) -> list[str]:
        return [p.name for p in self.procs if p.group_alive()]
