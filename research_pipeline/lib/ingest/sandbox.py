"""The sandboxed parse pool: `parse_pdf` in killable child processes, under memory and time limits.

Every file is parsed in a worker process of its own process group, under an address-space
limit (RLIMIT_AS) and a wall-clock deadline enforced by the parent, so a hostile file can
hang, explode or crash a worker but never the ingest. The parent kills the whole process
group (the worker and any `tesseract` it started) on a timeout, and closes every worker
when it is done, so no process is ever left behind.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from research_pipeline.lib.ingest.pdf import OCR_DPI, ParseResult, fail, parse_pdf


def _worker_main(read_fd: int, write_fd: int, memory_mb: int, ocr: bool, ocr_dpi: int,
                 progress_fd: int = -1) -> None:
    """Serve parse jobs from the parent: receive (job_id, path), report progress, send the result."""
    try:
        import ctypes

        # Die with the parent (PR_SET_PDEATHSIG = 1), so a SIGKILLed ingest leaves no worker.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    record = _ProgressRecord(progress_fd) if progress_fd >= 0 else None
    while True:
        try:
            job = inbox.recv()
        except EOFError:
            job = None
        if job is None:
            # Nothing is buffered (every send is a write) and nothing needs tearing down: exit
            # now rather than after the interpreter's shutdown, which the parent would wait for.
            os._exit(0)
        job_id, path = job
        try:
            result = parse_pdf(path, ocr=ocr, ocr_dpi=ocr_dpi, progress=record.write if record else None)
        except MemoryError:
            result = fail("memory", f"{Path(path).name} needs more than {memory_mb} MiB to parse")
        except Exception as exc:  # noqa: BLE001 - any parser failure is a corrupt file, not a crash
            result = fail("corrupt", f"{Path(path).name}: {type(exc).__name__}: {exc}")
        outbox.send(("done", job_id, result))


class _ProgressRecord:
    """The page a worker is on and when it started it, in memory shared with the parent.

    The worker writes it at every page; the parent reads it only when a deadline comes up, so
    a page costs neither side a message. A sequence number (odd while a write is under way)
    keeps the parent from reading half of a write.
    """

    SIZE = 24  # sequence, page, time.monotonic_ns() of the page's start: three int64

    def __init__(self, fd: int):
        self._map = mmap.mmap(fd, self.SIZE)
        self._slots = memoryview(self._map).cast("q")

    @classmethod
    def create(cls) -> tuple[int, _ProgressRecord]:
        """A new record and the file descriptor that shares it with a child process."""
        try:
            fd = os.memfd_create("rp-parse-progress")
        except (AttributeError, OSError):  # not Linux: an unlinked temporary file
            import tempfile

            with tempfile.TemporaryFile() as fh:
                fd = os.dup(fh.fileno())
        os.ftruncate(fd, cls.SIZE)
        return fd, cls(fd)

    def write(self, page: int) -> None:
        slots = self._slots
        slots[0] += 1
        slots[1] = page
        slots[2] = time.monotonic_ns()
        slots[0] += 1

    def read(self) -> tuple[int, float] | None:
        """(page, time.monotonic() at its start) of the latest write, or None before any."""
        slots = self._slots
        for _ in range(1000):
            seq = slots[0]
            if seq & 1:
                continue
            page, started_ns = slots[1], slots[2]
            if slots[0] == seq:
                return (page, started_ns / 1e9) if seq else None
        return None  # the worker stopped in the middle of a write

    def close(self) -> None:
        self._slots.release()
        self._map.close()


class _Worker:
    """One worker process in its own process group, with its pipes and current job."""

    def __init__(self, memory_mb: int, ocr: bool, ocr_dpi: int):
        # Imported here, in the parent only: the configuration module loads SQLAlchemy and the
        # release gates, which would add ~0.5 s to every worker's start (it imports this module).
        from research_pipeline.config import child_process_env

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        progress_fd, self.progress = _ProgressRecord.create()
        self.proc = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from research_pipeline.lib.ingest.sandbox import _worker_main; "
             "_worker_main(*map(int, sys.argv[1:3]), int(sys.argv[3]), sys.argv[4] == '1', int(sys.argv[5]), "
             "int(sys.argv[6]))",
             str(to_child_r), str(from_child_w), str(memory_mb), "1" if ocr else "0", str(ocr_dpi),
             str(progress_fd)],
            pass_fds=(to_child_r, from_child_w, progress_fd),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=os.getcwd(),
            # Tesseract's OpenMP threads would fight the other worker for the cores (6x slower).
            env=child_process_env(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_THREAD_LIMIT="1"),
        )
        os.close(to_child_r)
        os.close(from_child_w)
        os.close(progress_fd)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        self.job: Any = None
        self.path: str | None = None
        self.started = 0.0
        self.last_progress = 0.0
        self.page = -1

    def start(self, job_key: Any, path: str) -> None:
        self.job, self.path, self.page = job_key, path, -1
        self.started = self.last_progress = time.monotonic()
        self.send_conn.send((id(job_key), path))

    def read_progress(self) -> None:
        """Update `page` and `last_progress` from what the worker has written for this job."""
        latest = self.progress.read()
        if latest is not None and latest[1] >= self.started:  # not a write of its previous job
            self.page, self.last_progress = latest

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.close_pipes()

    def close_pipes(self) -> None:
        for conn in (self.send_conn, self.recv_conn):
            try:
                conn.close()
            except OSError:
                pass
        self.progress.close()

    def ask_to_stop(self) -> None:
        try:
            self.send_conn.send(None)
        except (OSError, ValueError):
            pass

    def stop(self, deadline: float | None = None) -> None:
        """Ask the worker to exit (unless asked already, with `deadline` the time to wait
        until), then make sure its whole process group is gone."""
        if deadline is None:
            self.ask_to_stop()
            deadline = time.monotonic() + 2
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _death_result(worker: _Worker, memory_mb: int) -> ParseResult:
    rc = worker.proc.wait()
    worker.read_progress()
    name = Path(worker.path or "").name
    where = f"page {worker.page + 1}" if worker.page >= 0 else "opening"
    # pdfium aborts (SIGABRT) when an allocation fails under RLIMIT_AS, and the kernel's OOM
    # killer sends SIGKILL; a segfault is a parser crash on broken input.
    if rc in (-signal.SIGABRT, -signal.SIGKILL):
        return fail("memory", f"{name}: the parser ran out of its {memory_mb} MiB at {where}; "
                    "raise memory_mb if the file is genuine")
    return fail("corrupt", f"{name}: the parser crashed at {where} (exit {rc}); re-export or repair the file")


class ParsePool:
    """A bounded pool of parse workers that enforces per-file timeouts and memory limits.

    `timeout_s` bounds the time a worker may go without finishing a page (text extraction or
    OCR of one page); `file_timeout_s` (default 10x) bounds a whole file. Use as a context
    manager: leaving it stops every worker and its process group.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 60,
        memory_mb: int = 2048,
        ocr: bool = True,
        ocr_dpi: int = OCR_DPI,
        file_timeout_s: float | None = None,
    ):
        self.n_workers = max(1, int(workers))
        self.timeout_s = timeout_s
        self.file_timeout_s = file_timeout_s or timeout_s * 10
        self.memory_mb = memory_mb
        self.ocr = ocr
        self.ocr_dpi = ocr_dpi
        self._workers: list[_Worker] = []

    def __enter__(self) -> ParsePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        # All workers are asked first, so that they exit at the same time.
        for w in self._workers:
            w.ask_to_stop()
        deadline = time.monotonic() + 2
        for w in self._workers:
            w.stop(deadline)
        self._workers = []

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _new_worker(self) -> _Worker:
        w = _Worker(self.memory_mb, self.ocr, self.ocr_dpi)
        self._workers.append(w)
        return w

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)

    def imap_unordered(
        self,
        jobs: Iterable[tuple[Any, str]],
        before_wait: Callable[[], float | None] | None = None,
    ) -> Iterator[tuple[Any, ParseResult]]:
        """Parse (key, path) jobs, yielding (key, result) as each file finishes.

        At most `workers` files are in flight, and one job more is pulled ahead: a worker that
        finishes starts its next file at once, while the caller commits the result and the
        next job is pulled (the caller's work per file then costs no worker time).
        `before_wait` is called each time the pool is about to wait for its workers and
        returns the most seconds it may wait before the next call (None: no limit), e.g.
        to commit the results held back for a batch.
        """
        pending = iter(jobs)
        exhausted = False
        ahead: list[tuple[Any, str]] = []
        idle: list[_Worker] = [w for w in self._workers if w.job is None]
        busy: list[_Worker] = [w for w in self._workers if w.job is not None]
        # A worker sends one message, its result; page progress is in its `_ProgressRecord`.
        poller = select.poll()
        for w in busy:
            poller.register(w.recv_conn.fileno(), select.POLLIN)

        def pull() -> bool:
            """Have the next job in hand; False when there is none left."""
            nonlocal exhausted
            if not ahead and not exhausted:
                try:
                    ahead.append(next(pending))
                except StopIteration:
                    exhausted = True
            return bool(ahead)

        def dispatch() -> None:
            while len(busy) < self.n_workers and pull():
                key, path = ahead.pop()
                w = idle.pop() if idle else self._new_worker()
                w.start(key, str(path))
                busy.append(w)
                poller.register(w.recv_conn.fileno(), select.POLLIN)

        while True:
            dispatch()
            pull()
            if not busy:
                return
            wait_limit = before_wait() if before_wait is not None else None
            now = time.monotonic()
            deadline = min(
                min(w.last_progress + self.timeout_s, w.started + self.file_timeout_s) for w in busy
            )
            wait_s = max(0.0, deadline - now if wait_limit is None else min(deadline - now, wait_limit))
            # Milliseconds, rounded up as multiprocessing's `wait` does; POLLHUP (a dead worker) too.
            ready = {fd for fd, _event in poller.poll(math.ceil(wait_s * 1000))}
            finished: list[tuple[_Worker, ParseResult, bool]] = []
            for w in busy:
                if w.recv_conn.fileno() not in ready:
                    continue
                try:
                    _kind, _job_id, result = w.recv_conn.recv()
                    finished.append((w, result, True))
                except (EOFError, OSError, pickle.UnpicklingError):
                    finished.append((w, _death_result(w, self.memory_mb), False))
            now = time.monotonic()
            done_workers = {id(w) for w, _, _ in finished}
            for w in busy:
                if id(w) in done_workers:
                    continue
                w.read_progress()
                if now >= w.last_progress + self.timeout_s or now >= w.started + self.file_timeout_s:
                    where = f"page {w.page + 1}" if w.page >= 0 else "opening"
                    limit = self.timeout_s if now >= w.last_progress + self.timeout_s else self.file_timeout_s
                    finished.append((w, fail("timeout", f"{Path(w.path or '').name}: no progress within "
                                             f"{limit:.0f} s at {where}; the worker was killed. Raise "
                                             "timeout_s if the file is genuine"), False))
            results = []
            for w, result, alive in finished:
                results.append((w.job, result))
                busy.remove(w)
                poller.unregister(w.recv_conn.fileno())
                if alive:
                    w.job = None
                    idle.append(w)
                else:
                    self._replace(w)
            dispatch()
            yield from results
