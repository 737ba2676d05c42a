"""`chunk_embeddings`: shard partitions embed only their own documents' chunks, one run may cover a range of
shards, re-runs reuse vectors, and a failed step is retried."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from research_pipeline.defs.embeddings.assets import ALL_SHARDS_TAGS, chunk_embeddings
from research_pipeline.defs.ingest.assets import chunks, documents
from research_pipeline.defs.resources import EmbedderResource, build_resources
from research_pipeline.lib.core import store
from research_pipeline_tests.shared import (
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
            assert md["backlog"] == 0 and md["numeric_path"] == resources["embedder"].get_embedder().numeric_path
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


def test_one_run_over_a_range_of_shards_embeds_every_shard(tmp_path, sqlite_url):
    """A run over a partition range (what a multi_run(2) backfill run and reindex_job launch) embeds each shard."""
    settings = make_settings(tmp_path, sqlite_url, small_papers(2))
    resources = build_resources(settings)
    model_id = resources["embedder"].get_embedder().model_id
    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize([documents, chunks], resources=resources, instance=instance, run_config=RUN_CONFIG).success
        engine = store.make_engine(sqlite_url)
        try:
            all_hashes = set().union(*(_distinct_hashes(engine, s) for s in store.SHARDS))
            two = dg.materialize(
                [chunk_embeddings],
                resources=resources,
                instance=instance,
                tags={ASSET_PARTITION_RANGE_START_TAG: "0", ASSET_PARTITION_RANGE_END_TAG: "1"},
            )
            assert two.success
            assert instance.get_materialized_partitions(chunk_embeddings.key) == {"0", "1"}
            assert _embedded_hashes(engine, model_id) == _distinct_hashes(engine, "0") | _distinct_hashes(engine, "1")

            every = dg.materialize([chunk_embeddings], resources=resources, instance=instance, tags=ALL_SHARDS_TAGS)
            assert every.success
            assert instance.get_materialized_partitions(chunk_embeddings.key) == set(store.SHARDS)
            assert _embedded_hashes(engine, model_id) == all_hashes
            md = metadata_of_range(every)
            assert md["shards"] == ",".join(store.SHARDS)
            assert md["embedded"] + md["cached"] == md["dagster/row_count"]
            assert md["cached"] >= len(_distinct_hashes(engine, "0")), "the first run's shards were not embedded again"
        finally:
            engine.dispose()


def metadata_of_range(result: dg.ExecuteInProcessResult) -> dict:
    """The metadata of a range run (one materialization per shard, all with the run's totals)."""
    mats = result.asset_materializations_for_node("chunk_embeddings")
    values = [{k: v.value for k, v in m.metadata.items()} for m in mats]
    assert all(v == values[0] for v in values)
    return values[0]


class FlakyEmbedderResource(EmbedderResource):
    """The real embedder, whose first encode call in a test fails as a killed worker would."""

    marker: str

    def get_embedder(self):
        real = super().get_embedder()
        marker = Path(self.marker)

        class Flaky:
            def __getattr__(self, name):
                return getattr(real, name)

            def encode(self, texts, **kwargs):
                if not marker.exists():
                    marker.touch()
                    raise RuntimeError("worker lost (injected)")
                return real.encode(texts, **kwargs)

        return Flaky()


def test_a_failed_embedding_step_is_retried(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url, small_papers(1))
    resources = build_resources(settings)
    model_id = resources["embedder"].get_embedder().model_id
    marker = tmp_path / "failed-once"
    flaky = FlakyEmbedderResource(model=resources["embedder"].model, marker=str(marker))
    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize([documents, chunks], resources=resources, instance=instance, run_config=RUN_CONFIG).success
        result = dg.materialize(
            [chunk_embeddings], resources={**resources, "embedder": flaky}, instance=instance, tags=ALL_SHARDS_TAGS
        )
        assert result.success
        assert marker.exists(), "the first attempt failed"
        retried = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
        assert len(retried) == 1
        assert instance.get_materialized_partitions(chunk_embeddings.key) == set(store.SHARDS)
    engine = store.make_engine(sqlite_url)
    try:
        all_hashes = set().union(*(_distinct_hashes(engine, s) for s in store.SHARDS))
        assert _embedded_hashes(engine, model_id) == all_hashes
    finally:
        engine.dispose()
