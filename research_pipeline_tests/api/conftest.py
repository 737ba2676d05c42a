"""A published deployment on each backend and the search service running over it on loopback.

The sample corpus (four demo papers, ingested, chunked and embedded by the project's own code)
is copied into a fresh SQLite or PostgreSQL database; a generation is built, gated and
published; the papers' PDFs sit in the deployment's inbox. The tests run the service over it with
`research_pipeline_tests.shared.running_service` (a real uvicorn server on a free loopback port).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline.lib.release import publish
from research_pipeline_tests.shared import (
    DEMO_PAPERS,
    HOSTILE_TEXT,
    HOSTILE_TITLE,
    SAMPLE,
    drop_pg_database,
    gated,
    load_corpus_rows,
    make_pg_database,
    sample_corpus,
)


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
