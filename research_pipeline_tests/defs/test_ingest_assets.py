"""The `documents` and `chunks` assets materialized through Dagster on real demo papers, on both backends."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from research_pipeline.config import Settings
from research_pipeline.defs.ingest.assets import chunks, documents
from research_pipeline.defs.resources import build_resources
from research_pipeline.lib.core import store
from research_pipeline.lib.ingest.pdf import REASONS as QUARANTINE_REASONS
from research_pipeline_tests.shared import (
    RUN_CONFIG,
    make_settings,
    metadata_of,
    small_papers,
)


def test_documents_and_chunks_materialize_and_rematerialize_idempotently(tmp_path, db_url):
    papers = small_papers(3)
    settings = make_settings(tmp_path, db_url, papers)
    resources = build_resources(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        first = dg.materialize([documents, chunks], resources=resources, instance=instance, run_config=RUN_CONFIG)
        assert first.success
        docs_md = metadata_of(first, "documents")
        chunks_md = metadata_of(first, "chunks")

        engine = store.make_engine(db_url)
        try:
            counts = store.counts(engine)
            with engine.connect() as conn:
                chunk_ids = set(conn.execute(sa.select(store.chunks.c.chunk_id)).scalars())
                tokens = conn.execute(sa.select(store.chunks.c.n_tokens)).scalars().all()
                refs = conn.execute(
                    sa.select(sa.func.count()).where(store.chunks.c.is_references.is_(True))
                ).scalar_one()
        finally:
            engine.dispose()

        # Every paper either became a document or is in quarantine with a reason: nothing lost.
        assert counts["documents"] + counts["quarantined"] == len(papers)
        assert counts["documents"] >= 1, "the demo papers have a text layer"
        assert docs_md["documents"] == counts["documents"] == docs_md["new"]
        assert docs_md["unchanged"] == 0
        assert docs_md["pages"] == counts["pages"] > 0
        assert docs_md["seconds"] > 0 and docs_md["pages_per_s"] > 0
        for reason in QUARANTINE_REASONS:
            assert docs_md[f"quarantine_{reason}"] == counts["quarantine"].get(reason, 0)

        assert chunks_md["chunks"] == counts["chunks"] == len(chunk_ids) > 0
        assert chunks_md["documents_chunked"] == counts["documents"]
        assert chunks_md["mean_tokens"] == pytest.approx(sum(tokens) / len(tokens))
        assert chunks_md["references_chunks_share"] == pytest.approx(refs / len(tokens))

        again = dg.materialize([documents, chunks], resources=resources, instance=instance, run_config=RUN_CONFIG)
        assert again.success
        docs_again = metadata_of(again, "documents")
        chunks_again = metadata_of(again, "chunks")
        assert docs_again["new"] == 0
        assert docs_again["unchanged"] == counts["documents"]
        assert docs_again["documents"] == counts["documents"]
        assert chunks_again["documents_chunked"] == 0 and chunks_again["chunks_new"] == 0
        assert chunks_again["chunks"] == counts["chunks"]

        engine = store.make_engine(db_url)
        try:
            assert store.counts(engine) == counts
            with engine.connect() as conn:
                assert set(conn.execute(sa.select(store.chunks.c.chunk_id)).scalars()) == chunk_ids
        finally:
            engine.dispose()


def test_missing_inbox_fails_with_the_fix(tmp_path, sqlite_url):
    settings = Settings(
        home=tmp_path / "rp", inbox=tmp_path / "nowhere", database_url=sqlite_url,
        object_store_url=str(tmp_path / "objects"),
    )
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [documents], resources=build_resources(settings), instance=instance, raise_on_error=False
        )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "RP_INBOX" in failure.step_failure_data.error.message or "RP_INBOX" in str(
        failure.step_failure_data.user_failure_data
    )
