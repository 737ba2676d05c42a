"""`chunk_embeddings`: shard partitions embed only their own documents' chunks, and re-runs reuse vectors."""

from __future__ import annotations

import dagster as dg
import sqlalchemy as sa

from research_pipeline.defs.embeddings.assets import chunk_embeddings
from research_pipeline.defs.ingest.assets import chunks, documents
from research_pipeline.defs.resources import build_resources
from research_pipeline.lib.core import store
from research_pipeline_tests.defs.test_ingest_assets import (
    RUN_CONFIG,
    make_settings,
    metadata_of,
    small_papers,
)


def _distinct_hashes(engine, shard: str) -> set[str]:
    c = store.chunks
    with engine.connect() as conn:
        return set(conn.execute(sa.select(c.c.content_hash).where(c.c.shard == shard)).scalars())


def _embedded_hashes(engine, model_id: str) -> set[str]:
    e = store.embeddings
    with engine.connect() as conn:
        return set(conn.execute(sa.select(e.c.content_hash).where(e.c.model_id == model_id)).scalars())


def test_two_shard_partitions_embed_their_own_chunks_once(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, small_papers(1))
    resources = build_resources(settings)
    model_id = resources["embedder"].get_embedder().model_id
    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize([documents, chunks], resources=resources, instance=instance, run_config=RUN_CONFIG).success

        engine = store.make_engine(db_url)
        try:
            with engine.connect() as conn:
                shards = sorted(set(conn.execute(sa.select(store.chunks.c.shard)).scalars()))
            assert shards, "the papers produced chunks"
            busy = shards[0]
            idle = next(s for s in store.SHARDS if s not in shards)
            expected = _distinct_hashes(engine, busy)

            first = dg.materialize([chunk_embeddings], partition_key=busy, resources=resources, instance=instance)
            md = metadata_of(first, "chunk_embeddings")
            assert md["embedded"] + md["cached"] == len(expected)
            assert md["embedded"] == len(expected), "a fresh store has no cached vectors"
            assert md["chunks_per_s"] > 0 and md["seconds"] > 0
            assert md["model_id"] == model_id
            assert _embedded_hashes(engine, model_id) == expected, "only the partition's own shard is embedded"

            empty = dg.materialize([chunk_embeddings], partition_key=idle, resources=resources, instance=instance)
            md_empty = metadata_of(empty, "chunk_embeddings")
            assert md_empty["embedded"] == 0 and md_empty["cached"] == 0

            again = dg.materialize([chunk_embeddings], partition_key=busy, resources=resources, instance=instance)
            md_again = metadata_of(again, "chunk_embeddings")
            assert md_again["embedded"] == 0 and md_again["cached"] == len(expected)
            with engine.connect() as conn:
                rows = conn.execute(sa.select(sa.func.count()).select_from(store.embeddings)).scalar_one()
            assert rows == len(expected), "re-materializing wrote no duplicate vectors"
        finally:
            engine.dispose()

        materialized = instance.get_materialized_partitions(dg.AssetKey("chunk_embeddings"))
        assert materialized == {busy, idle}
