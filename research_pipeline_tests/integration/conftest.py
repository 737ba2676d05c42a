"""Fixtures of the migration tests: a moto S3 server and a real demo deployment to migrate."""

from __future__ import annotations

import csv
import fcntl
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline_tests.shared import DEMO_PAPERS


@dataclass
class DemoSource:
    """A SQLite + local files deployment with a published index generation."""

    url: str
    engine: object
    store: LocalObjectStore
    inbox: Path
    queries: list[str]


def _demo_queries() -> list[str]:
    """The 20 real queries shipped with the demo corpus (examples/queries.tsv)."""
    with open(DEMO_PAPERS.parent / "queries.tsv", newline="", encoding="utf-8") as fh:
        return [row["query"] for row in csv.DictReader(fh, delimiter="\t")]


def build_demo_source(home: Path, embedder) -> None:  # noqa: ANN001
    """Ingest, chunk, embed, index and publish the whole demo corpus with the pipeline's own code."""
    from research_pipeline.lib.embed.embeddings import embed_missing
    from research_pipeline.lib.ingest.chunking import chunk_documents
    from research_pipeline.lib.ingest.pipeline import ingest
    from research_pipeline.lib.ingest.sources import sources_for
    from research_pipeline.lib.release import build, publish, registry

    files = sorted(p.name for p in DEMO_PAPERS.glob("*.pdf"))
    inbox = home / "inbox"
    inbox.mkdir(parents=True)
    for name in files:
        shutil.copy2(DEMO_PAPERS / name, inbox / name)
    url = f"sqlite:///{home / 'rp.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    objects = LocalObjectStore(home / "objects")
    report = ingest(engine, sources_for(inbox), workers=2, ocr=False)
    assert report.documents_new == len(files), report
    chunk_documents(engine, embedder.count_tokens)
    embed_missing(engine, embedder)
    gen = build.build_generation(engine, objects, embedder)
    # The release gates are engineer D's subject, not the migration's: record them as passed so
    # this fixture can publish; the migration copies whatever the source recorded.
    registry.record_gates(
        engine,
        gen["gen_id"],
        {g: {"passed": True, "description": "migration test fixture"} for g in registry.REQUIRED_GATES},
    )
    publish.publish(engine, gen["gen_id"], store=objects)
    engine.dispose()


def open_demo_source(home: Path) -> DemoSource:
    url = f"sqlite:///{home / 'rp.db'}"
    return DemoSource(url, store.make_engine(url), LocalObjectStore(home / "objects"), home / "inbox", _demo_queries())


@pytest.fixture(scope="module")
def demo_source(request, tmp_path_factory, worker_id) -> DemoSource:
    """The demo deployment, built once per test run and shared by the xdist workers.

    (pytest-xdist's loadgroup does not keep a group on one worker under this pytest, so a
    file lock in the run's shared temp folder makes the first worker build it.) Tests only
    read it.
    """
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    home = root / "migration_demo_source"
    with open(root / "migration_demo_source.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "built").exists():
            shutil.rmtree(home, ignore_errors=True)
            build_demo_source(home, request.getfixturevalue("embedder"))
            (home / "built").write_text("ok")
    src = open_demo_source(home)
    yield src
    src.engine.dispose()
