"""Fixtures shared by the lib test modules."""

from __future__ import annotations

import pytest

from research_pipeline_tests.shared import DEMO_PAPERS, SHORT, ingest_demo


@pytest.fixture(scope="module")
def papers(tmp_path_factory) -> dict[str, dict]:
    """documents rows of SHORT and every JOSE demo paper, by file name, ingested once per module."""
    names = sorted({*SHORT, *(p.name for p in DEMO_PAPERS.glob("jose-*.pdf"))})
    return ingest_demo(names, tmp_path_factory.mktemp("demo"))
