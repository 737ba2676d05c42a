"""Metadata of the assets leaves out figures that do not exist instead of writing 0, -1 or ""."""

import dagster as dg

from research_pipeline.defs.ingest.assets import chunk_stats
from research_pipeline.defs.migration.assets import as_metadata
from research_pipeline.lib.core import store


def test_an_empty_chunks_table_has_counts_but_no_share_or_mean(tmp_path):
    engine = store.make_engine(f"sqlite:///{tmp_path / 'rp.db'}")
    store.create_schema(engine)
    assert chunk_stats(engine) == {"chunks": 0, "documents_with_chunks": 0}
    engine.dispose()


def test_migration_metadata_leaves_out_values_that_do_not_exist():
    out = as_metadata({"rows": 0, "seconds": 1.5, "target": "postgresql", "skipped_reason": None, "verified": True})
    assert set(out) == {"rows", "seconds", "target", "verified"}
    assert out["rows"] == dg.MetadataValue.int(0) and out["verified"] == dg.MetadataValue.text("True")
