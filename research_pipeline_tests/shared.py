"""Helpers shared by test modules (instead of test modules importing one another).

Paths of the shared data and demo corpus, fresh PostgreSQL databases, the search sample corpus
(built once per session, shared across xdist workers through a file lock), the ingest and
embedding test helpers, the search service on loopback, the deployed-topology process helpers
and moto's S3 server. Fixtures live in the conftest.py files.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store, util
from research_pipeline.lib.core.objectstore import fsync_write
from research_pipeline.lib.release import build, gates, registry

if TYPE_CHECKING:
    import dagster as dg

    from research_pipeline.config import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RP_SHARED_DATA", REPO.parent / "shared" / "data"))
PAPERS = SHARED_DATA / "papers"
HOSTILE = SHARED_DATA / "hostile"
IR = SHARED_DATA / "ir"
DEMO_PAPERS = REPO / "examples" / "papers"
PG_ADMIN_URL = os.environ.get("RP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
#: The directory of this interpreter's console scripts (dagster, dagster-webserver, dagster-daemon).
BIN = Path(sys.executable).parent


def write_deployed_instance(home: Path) -> Path:
    """docker/dagster.yaml in `home`, its run launcher swapped for Dagster's default one.

    Compose launches each run in a container (DockerRunLauncher); this machine has no Docker
    engine, so the loopback topology runs each run as a process of the code server instead.
    Everything else (PostgreSQL storage, queue limits, retries, monitoring, python logs) is the
    shipped file's.
    """
    import yaml

    config = yaml.safe_load((REPO / "docker" / "dagster.yaml").read_text())
    config["run_launcher"] = {"module": "dagster._core.launcher", "class": "DefaultRunLauncher"}
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def require_shared(path: Path) -> Path:
    """`path` if the shared test data holds it; otherwise the test fails saying where it belongs."""
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (expected ../shared/data beside the repo)")
    return path


def pg_admin() -> sa.Engine:
    """An AUTOCOMMIT engine on the admin database of the test PostgreSQL."""
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def make_pg_database(prefix: str = "rp_test") -> str:
    """Create a fresh PostgreSQL database and return its URL; drop it with `drop_pg_database`."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with pg_admin().connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    """Drop the database of `url` (made by `make_pg_database`), closing its connections."""
    name = sa.engine.make_url(url).database
    with pg_admin().connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- The search sample corpus -----------------------------------------------------------------

#: Small demo papers that answer four of the bundled probe queries (q01 PyCM, q02 NiaAML,
#: q07 CFD Python, q19 game theory).
SAMPLE = (
    "joss-2018-pycm-multiclass-confusion-matrix-library-python.pdf",
    "joss-2021-niaaml-automl-framework-based-stochastic.pdf",
    "jose-2018-cfd-python-12-steps-navier-stokes.pdf",
    "jose-2021-game-theory-python-educational-tutorial-game.pdf",
)
CORPUS_TABLES = (store.documents, store.document_sources, store.chunks, store.embeddings)
#: The machine is shared: latency is the subject of its own test, the others must not trip on it.
RELAXED = gates.GateThresholds(latency_p95_ms=600_000.0)
#: One worker runs every module that uses the sample corpus, so it is built once.
SEARCH_GROUP = "search_sample_corpus"


def build_corpus_rows(tmp_dir, embedder) -> dict[str, list[dict]]:
    """Ingest, chunk and embed SAMPLE with the project's own code; the rows of the corpus tables."""
    from research_pipeline.lib.embed.embeddings import embed_missing
    from research_pipeline.lib.ingest.chunking import chunk_documents
    from research_pipeline.lib.ingest.pipeline import ingest
    from research_pipeline.lib.ingest.sources import sources_for

    inbox = tmp_dir / "inbox"
    inbox.mkdir()
    for name in SAMPLE:
        shutil.copy(DEMO_PAPERS / name, inbox / name)
    engine = store.make_engine(f"sqlite:///{tmp_dir / 'corpus.db'}")
    store.create_schema(engine)
    report = ingest(engine, sources_for(inbox), workers=1, ocr=False)
    assert report.documents_new == len(SAMPLE), report
    chunk_documents(engine, embedder.count_tokens)
    embed_missing(engine, embedder)
    with engine.connect() as conn:
        rows = {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t))] for t in CORPUS_TABLES}
    engine.dispose()
    return rows


def load_corpus_rows(engine, rows) -> None:
    """Insert corpus-table rows (as `sample_corpus` returns them) into `engine`."""
    with engine.begin() as conn:
        for t in CORPUS_TABLES:
            if rows[t.name]:
                conn.execute(sa.insert(t), rows[t.name])


_CORPUS: dict[str, list[dict]] = {}


def sample_corpus(tmp_path_factory) -> dict[str, list[dict]]:
    """The SAMPLE corpus rows, built once per test session and shared by the search test modules.

    Under xdist every worker's temp folder sits in one session folder: the first worker builds
    the rows under a file lock and pickles them there; the others (and later modules) load them.
    Callers must not modify the rows.
    """
    if _CORPUS:
        return _CORPUS
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    data = root / "rp_sample_corpus.pickle"
    with open(root / "rp_sample_corpus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if data.exists():
            rows = pickle.loads(data.read_bytes())
        else:
            from research_pipeline.lib.embed.model import load_embedder

            with tempfile.TemporaryDirectory(prefix="rp_sample_corpus_") as tmp:
                rows = build_corpus_rows(Path(tmp), load_embedder())
            fsync_write(data, pickle.dumps(rows))
    _CORPUS.update(rows)
    return _CORPUS


def gated(engine, obj, embedder, thresholds=RELAXED, probes=4) -> dict:
    """A new candidate generation with its gates evaluated and recorded."""
    gen = build.build_generation(engine, obj, embedder)
    gates.evaluate_generation(engine, obj, embedder, gen["gen_id"], thresholds=thresholds, max_probe_queries=probes)
    return registry.get_generation(engine, gen["gen_id"])


# -- Ingest, chunking and embedding ------------------------------------------------------------


#: Run config of the ingest asset tests: one parse worker.
RUN_CONFIG = {"ops": {"documents": {"config": {"workers": 1}}}}


def small_papers(n: int):
    """The n smallest demo papers (fast to parse, still real multi-page PDFs)."""
    return sorted(DEMO_PAPERS.glob("*.pdf"), key=lambda p: p.stat().st_size)[:n]


def make_settings(tmp_path, db_url, papers) -> Settings:
    """Settings of a fresh deployment under tmp_path whose inbox holds copies of `papers`."""
    from research_pipeline.config import Settings

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for pdf in papers:
        shutil.copy(pdf, inbox / pdf.name)
    return Settings(
        home=tmp_path / "rp",
        inbox=inbox,
        database_url=db_url,
        object_store_url=str(tmp_path / "objects"),
    )


def metadata_of(result: dg.ExecuteInProcessResult, key: str) -> dict:
    [mat] = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in mat.metadata.items()}


def ingest_demo(names: list[str], workdir: Path) -> dict[str, dict]:
    """documents rows of demo papers, by file name, made by the real ingest (parse, clean, metadata)."""
    from research_pipeline.lib.ingest.pipeline import ingest
    from research_pipeline.lib.ingest.sources import sources_for

    inbox = workdir / "inbox"
    inbox.mkdir(parents=True)
    for name in names:
        shutil.copyfile(DEMO_PAPERS / name, inbox / name)
    engine = store.make_engine(f"sqlite:///{workdir / 'ingest.db'}")
    store.create_schema(engine)
    report = ingest(engine, sources_for(inbox), workers=1, ocr=False)
    assert report.documents_new == len(names), report
    d, s = store.documents, store.document_sources
    with engine.connect() as conn:
        rows = conn.execute(sa.select(s.c.uri, d).join(d, d.c.doc_id == s.c.doc_id)).mappings().all()
    engine.dispose()
    out = {}
    for row in rows:
        name = next(n for n in names if row["uri"].endswith(n))
        out[name] = {k: v for k, v in row.items() if k != "uri"}
    return out


#: Two short demo papers the embedding tests embed.
SHORT = ["joss-2018-pycm-multiclass-confusion-matrix-library-python.pdf", "jose-2018-short-course-about-fitting-models-scipy.pdf"]


def add_documents(engine, docs, count_tokens, max_tokens=256) -> list[dict]:
    """Upsert `docs` and their chunks (the real chunker); the chunk rows."""
    from research_pipeline.lib.ingest.chunking import chunk_document

    rows = [r for doc in docs for r in chunk_document(doc, count_tokens, max_tokens, max_tokens // 8)]
    with engine.begin() as conn:
        store.upsert(conn, store.documents, docs, ["doc_id"])
        store.upsert(conn, store.chunks, rows, ["chunk_id"])
    return rows


def scifact_records(n: int) -> list[dict]:
    """The first `n` SciFact abstracts (real text)."""
    corpus = require_shared(IR / "scifact" / "corpus.jsonl")
    out = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def load_records(engine: sa.Engine, records: list[dict]) -> dict[str, str]:
    """Documents and one chunk per record in the agreed row shapes; returns chunk_id -> _id."""
    now = util.utcnow()
    docs, chunks, ids = [], [], {}
    for rec in records:
        doc_id = util.sha256_hex(json.dumps(rec, sort_keys=True))
        text = rec["text"]
        content_hash = util.sha256_hex(text)
        chunk_id = util.sha256_hex(f"{doc_id}|0|{content_hash}")
        docs.append(
            dict(doc_id=doc_id, shard=doc_id[0], source_kind="record", title=rec["title"], authors="[]",
                 year=None, abstract=None, text=text, page_offsets="[0]", parser="test", parser_version="1",
                 quality=1.0, page_count=1, extra=json.dumps({"_id": rec["_id"]}), ingested_at=now)
        )
        chunks.append(
            dict(chunk_id=chunk_id, doc_id=doc_id, shard=doc_id[0], ordinal=0, section="Body", is_references=False,
                 page_start=1, page_end=1, char_start=0, char_end=len(text), n_tokens=len(text.split()),
                 content_hash=content_hash, text=text)
        )
        ids[chunk_id] = rec["_id"]
    with engine.begin() as conn:
        store.upsert(conn, store.documents, docs, ["doc_id"])
        store.upsert(conn, store.chunks, chunks, ["chunk_id"])
    return ids


# -- The search service -----------------------------------------------------------------------

#: The api test modules share the sample corpus with the search tests' worker.
API_GROUP = pytest.mark.xdist_group(SEARCH_GROUP)
#: A title and a text that are HTML and script: the page must show them as text.
HOSTILE_TITLE = '<script>alert("title")</script><img src=x onerror=alert(1)> PyCM & co'
HOSTILE_TEXT = '<img src=x onerror=alert(2)><b>quuxinjected</b> confusion matrix </p><script>alert(3)</script> '
#: A word only the hostile text holds: a query for it puts that text in the snippet.
HOSTILE_WORD = "quuxinjected"


class Running:
    """A service on loopback: its port, its SearchService and a small HTTP client."""

    def __init__(self, port: int, service):
        self.port = port
        self.service = service

    def get(self, path: str, params: dict | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict, bytes]:
        """(status, headers with lower-case names, body) of GET path?params."""
        if params:
            path = path + "?" + urlencode(params)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, path: str, params: dict | None = None) -> tuple[int, dict]:
        status, _, body = self.get(path, params)
        return status, json.loads(body)


@contextlib.contextmanager
def running_service(settings, options=None):
    """The app under a real uvicorn server on a free loopback port, stopped (lifespan closed) on exit."""
    import uvicorn

    from research_pipeline.api.app import create_app

    app = create_app(settings, options)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on", access_log=False))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        assert thread.is_alive(), "the server thread died while starting"
        assert time.monotonic() < deadline, "the service did not start in 300 s"
        time.sleep(0.05)
    try:
        yield Running(sock.getsockname()[1], app.state.service)
    finally:
        server.should_exit = True
        thread.join(120)
        sock.close()


# -- The deployed topology (gRPC code server, webserver, daemon) -------------------------------

WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name jobs { name } sensors { name } } }
          ... on PythonError { message }
        }
      }
    }
  }
}
"""

LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

RELOAD_MUTATION = """
mutation Reload($name: String!) {
  reloadRepositoryLocation(repositoryLocationName: $name) { __typename }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } }
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        out = json.loads(resp.read())
    assert "errors" not in out, out.get("errors")
    return out["data"]


def wait_for(predicate, timeout: float, what: str, procs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode} while waiting for {what}"
        result = predicate()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def webserver_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def stop_process_groups(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM each process group (the process and any run workers it spawned), then SIGKILL stragglers."""
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for proc in procs.values():
        # The group outlives its leader while any child lives; give children a moment, then kill.
        for _ in range(50):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)


# -- A real S3 endpoint (moto's standalone server) --------------------------------------------

#: Credentials moto accepts; set in the environment so every boto3 client in the test process
#: (ours and dagster-aws's) signs requests the same way without touching real AWS.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """moto's standalone S3 server running as a child process; `url` is its endpoint.

    Tests talk to it over HTTP with the real boto3 client, exactly as production talks to S3; no
    in-process mocking is involved.
    """

    def __init__(self, log_dir: Path):
        self.log_path = Path(log_dir) / "moto_server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, attempts: int = 3, timeout_s: float = 60.0) -> str:
        # Another process may grab the port between probing and binding: try a few ports.
        for _ in range(attempts):
            port = free_port()
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


# -- Logging ----------------------------------------------------------------------------------


class _Callback(logging.Handler):
    def __init__(self, fn: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.fn = fn

    def emit(self, record: logging.LogRecord) -> None:
        self.fn(record.getMessage())


@contextlib.contextmanager
def on_log(logger_name: str, fn: Callable[[str], None]) -> Iterator[None]:
    """Call `fn(message)` for every INFO+ record of `logger_name` while the block runs."""
    logger = logging.getLogger(logger_name)
    handler = _Callback(fn)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
