"""A published deployment on each backend and the search service running over it on loopback.

The sample corpus (four demo papers, ingested, chunked and embedded by the project's own code)
is copied into a fresh SQLite or PostgreSQL database; a generation is built, gated and
published; the papers' PDFs sit in the deployment's inbox. The service runs in this process
under a real uvicorn server on a free port and is spoken to over HTTP.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline.lib.release import publish
from research_pipeline_tests.conftest import (
    DEMO_PAPERS,
    drop_pg_database,
    make_pg_database,
)
from research_pipeline_tests.lib.test_generations import (
    SAMPLE,
    SEARCH_GROUP,
    gated,
    load_corpus_rows,
    sample_corpus,
)

#: The test modules of this folder share the sample corpus with the search tests' worker.
API_GROUP = pytest.mark.xdist_group(SEARCH_GROUP)
#: A title and a text that are HTML and script: the page must show them as text.
HOSTILE_TITLE = '<script>alert("title")</script><img src=x onerror=alert(1)> PyCM & co'
HOSTILE_TEXT = '<img src=x onerror=alert(2)><b>quuxinjected</b> confusion matrix </p><script>alert(3)</script> '
#: A word only the hostile text holds: a query for it puts that text in the snippet.
HOSTILE_WORD = "quuxinjected"


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def deployment(request, tmp_path_factory, embedder):
    """(Settings, facts) of a published deployment on each backend, with its PDFs in the inbox."""
    from research_pipeline.config import Settings

    root = tmp_path_factory.mktemp(f"deploy_{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'rp.db'}"
    else:
        request.getfixturevalue("pg_server")
        url = make_pg_database("rp_api")
    engine = store.make_engine(url)
    store.create_schema(engine)
    corpus = sample_corpus(tmp_path_factory)
    inbox = root / "inbox"
    inbox.mkdir()
    for name in SAMPLE:
        shutil.copy(DEMO_PAPERS / name, inbox / name)
    load_corpus_rows(engine, corpus)
    src = store.document_sources
    with engine.begin() as conn:
        for row in corpus["document_sources"]:
            name = Path(row["uri"]).name
            conn.execute(sa.update(src).where(src.c.uri == row["uri"]).values(uri=str(inbox / name)))
    by_name = {Path(r["uri"]).name: r["doc_id"] for r in corpus["document_sources"]}
    pycm = by_name[SAMPLE[0]]
    docs, chunks = store.documents, store.chunks
    with engine.begin() as conn:
        conn.execute(sa.update(docs).where(docs.c.doc_id == pycm).values(
            title=HOSTILE_TITLE, authors=json.dumps(["<b>Haghighi</b>", "O'Brien \"Q\""])))
        first = conn.execute(
            sa.select(chunks.c.chunk_id, chunks.c.text).where(chunks.c.doc_id == pycm).order_by(chunks.c.ordinal)
        ).first()
        conn.execute(sa.update(chunks).where(chunks.c.chunk_id == first.chunk_id).values(text=HOSTILE_TEXT + first.text))
    # Built after the edits, so the full-text index holds the hostile text too.
    objects = LocalObjectStore(root / "objects")
    gen = gated(engine, objects, embedder, probes=1)
    publish.publish(engine, gen["gen_id"], store=objects)
    engine.dispose()
    settings = Settings(home=root, inbox=inbox, database_url=url, object_store_url=str(root / "objects"))
    yield settings, {"backend": request.param, "gen_id": gen["gen_id"], "doc_ids": by_name, "pycm": pycm,
                     "root": root}
    if request.param == "postgresql":
        drop_pg_database(url)


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
