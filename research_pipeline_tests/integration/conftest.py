"""Fixtures of the migration tests: a moto S3 server and a real demo deployment to migrate."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from research_pipeline.lib import store
from research_pipeline.lib.objectstore import LocalObjectStore
from research_pipeline_tests.conftest import DEMO_PAPERS
from research_pipeline_tests.moto_server import s3_endpoint  # noqa: F401 - a fixture

#: Demo papers the migration source is built from: the first answers of examples/queries.tsv,
#: so a fixed query set has real hits on both sides.
N_PAPERS = 3


@dataclass
class DemoSource:
    """A SQLite + local files deployment with a published index generation."""

    url: str
    engine: object
    store: LocalObjectStore
    inbox: Path
    queries: list[str]


def _demo_selection() -> tuple[list[str], list[str]]:
    with open(DEMO_PAPERS.parent / "queries.tsv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    files: list[str] = []
    queries: list[str] = []
    for row in rows:
        for name in row["files"].split(";"):
            name = name.strip()
            if name and name not in files and len(files) < N_PAPERS:
                files.append(name)
        if all(n.strip() in files for n in row["files"].split(";") if n.strip()):
            queries.append(row["query"])
    return files, queries


def _ingest(engine, inbox: Path) -> None:  # noqa: ANN001
    """Engineer A's ingest when it is there; else the PDFs' text layer in the agreed row shapes."""
    try:
        from research_pipeline.lib.ingest import ingest
        from research_pipeline.lib.sources import sources_for
    except ImportError:
        ingest = None
    if ingest is not None:
        ingest(engine, sources_for(inbox), workers=1, ocr=False)
        return
    import pypdfium2

    now = store.utcnow()
    docs, sources = [], []
    for path in sorted(inbox.glob("*.pdf")):
        data = path.read_bytes()
        doc_id = store.sha256_hex(data)
        pdf = pypdfium2.PdfDocument(data)
        pages = [pdf[i].get_textpage().get_text_range() for i in range(len(pdf))]
        offsets, pos = [], 0
        for page in pages:
            offsets.append(pos)
            pos += len(page) + 3
        text = "\n\f\n".join(pages)
        docs.append(
            dict(doc_id=doc_id, shard=doc_id[0], source_kind="pdf", title=text.strip().split("\n")[0][:200],
                 authors="[]", year=None, abstract=None, doi=None, arxiv_id=None, language="en",
                 page_count=len(pages), text=text, page_offsets=store.dumps(offsets), parser="pypdfium2",
                 parser_version="5", quality=1.0, garbled_ratio=0.0, empty_pages=0, ocr_pages=0, extra=None,
                 ingested_at=now)
        )
        stat = path.stat()
        sources.append(dict(uri=str(path), doc_id=doc_id, size=stat.st_size, mtime=stat.st_mtime, seen_at=now))
    with engine.begin() as conn:
        store.upsert(conn, store.documents, docs, ["doc_id"])
        store.upsert(conn, store.document_sources, sources, ["uri"])


def build_demo_source(home: Path, embedder) -> DemoSource:  # noqa: ANN001
    """Ingest, chunk, embed, index and publish a few demo papers with the pipeline's own code."""
    from research_pipeline.lib import generations
    from research_pipeline.lib.chunking import chunk_documents
    from research_pipeline.lib.embeddings import embed_missing

    files, queries = _demo_selection()
    inbox = home / "inbox"
    inbox.mkdir(parents=True)
    for name in files:
        shutil.copy2(DEMO_PAPERS / name, inbox / name)
    url = f"sqlite:///{home / 'rp.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    objects = LocalObjectStore(home / "objects")
    _ingest(engine, inbox)
    chunk_documents(engine, embedder.count_tokens)
    embed_missing(engine, embedder)
    gen = generations.build_generation(engine, objects, embedder)
    # The release gates are engineer D's subject, not the migration's: record them as passed so
    # this fixture can publish; the migration copies whatever the source recorded.
    generations.record_gates(
        engine,
        gen["gen_id"],
        {g: {"passed": True, "description": "migration test fixture"} for g in generations.REQUIRED_GATES},
    )
    generations.publish(engine, gen["gen_id"], store=objects)
    return DemoSource(url, engine, objects, inbox, queries[:5])


@pytest.fixture(scope="module")
def embedder():
    from research_pipeline.lib.embedder import load_embedder
    from research_pipeline.lib.settings import DEFAULT_MODEL

    return load_embedder(DEFAULT_MODEL, "cpu")


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory, embedder) -> DemoSource:
    src = build_demo_source(tmp_path_factory.mktemp("demo_source"), embedder)
    yield src
    src.engine.dispose()
