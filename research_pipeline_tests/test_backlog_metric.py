"""The embedding backlog: chunk texts not yet embedded for the configured model, in the
chunk_embeddings metadata's model id and as the exporter's rp_embedding_backlog_chunks."""

from __future__ import annotations

import dagster as dg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from research_pipeline.defs.embeddings.assets import recorded_model_id
from research_pipeline.lib.core import store
from research_pipeline.lib.embed.embeddings import embed_missing
from research_pipeline.ops.metrics import PipelineCollector
from research_pipeline_tests.shared import SHORT, add_documents, ingest_demo

CONFIG = "all-MiniLM-L6-v2@cpu"


@pytest.fixture(scope="module")
def papers(tmp_path_factory) -> dict[str, dict]:
    return ingest_demo(list(SHORT[:2]), tmp_path_factory.mktemp("demo"))


def _backlog(collector) -> dict[tuple[str, str], float]:  # noqa: ANN001
    registry = CollectorRegistry()
    registry.register(collector)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == "rp_embedding_backlog_chunks":
                out[(s.labels["model_id"], s.labels["shard"])] = s.value
    return out


def test_backlog_per_shard_for_the_recorded_model(engine, embedder, papers, tmp_path):
    first, second = papers[SHORT[0]], papers[SHORT[1]]
    assert first["shard"] != second["shard"]
    rows = add_documents(engine, [first, second], embedder.count_tokens, max_tokens=64)
    texts = {s: len({r["content_hash"] for r in rows if r["shard"] == s}) for s in (first["shard"], second["shard"])}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        collector = PipelineCollector(None, engine, embedding_model=lambda: recorded_model_id(instance, CONFIG))
        # No chunk_embeddings run with this configuration yet: every text is backlog.
        before = _backlog(collector)
        assert len(before) == 16 and {m for m, _ in before} == {"unrecorded"}
        assert {s: before[("unrecorded", s)] for s in texts} == texts
        assert sum(before.values()) == sum(texts.values())

        stats = embed_missing(engine, embedder, shard=first["shard"], batch_size=16)
        assert stats["backlog"] == 0
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "chunk_embeddings", partition=first["shard"],
                metadata={"model_id": embedder.model_id, "embedder_config": CONFIG, "backlog": stats["backlog"]},
            )
        )
        after = _backlog(collector)
        assert after[(embedder.model_id, first["shard"])] == 0
        assert after[(embedder.model_id, second["shard"])] == texts[second["shard"]]
        assert sum(after.values()) == texts[second["shard"]]

        # Another configuration (a GPU, another model) has recorded nothing: unrecorded again.
        other = PipelineCollector(None, engine, embedding_model=lambda: recorded_model_id(instance, "x@cuda"))
        assert sum(_backlog(other).values()) == sum(texts.values())


def test_an_unreadable_model_id_leaves_the_backlog_out(sqlite_url):
    engine = store.make_engine(sqlite_url)
    store.create_schema(engine)

    def broken():  # noqa: ANN202
        raise OSError("dagster storage down")

    assert _backlog(PipelineCollector(None, engine, embedding_model=broken)) == {}
    assert len(_backlog(PipelineCollector(None, engine, embedding_model=lambda: None))) == 16
    engine.dispose()
