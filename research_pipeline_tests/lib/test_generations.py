"""Index generations on both backends: build beside live, gate, publish, roll back, retire, swap under load.

Four small demo papers are ingested, chunked and embedded once per module (real parser, real
model) into SQLite; each test copies those rows into a fresh SQLite or PostgreSQL database.
"""

import json
import logging
import threading
import time
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline.lib.embed import embeddings
from research_pipeline.lib.release import build, gates, publish, registry, searchers
from research_pipeline_tests.shared import (
    RELAXED,
    SAMPLE,
    SEARCH_GROUP,
    gated,
    load_corpus_rows,
    sample_corpus,
)

pytestmark = pytest.mark.xdist_group(SEARCH_GROUP)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return sample_corpus(tmp_path_factory)


@pytest.fixture
def env(engine, corpus, tmp_path):
    """(engine with the sample corpus, object store) on each backend."""
    load_corpus_rows(engine, corpus)
    return engine, LocalObjectStore(tmp_path / "objects")


def doc_id_of(corpus, filename) -> str:
    return next(s["doc_id"] for s in corpus["document_sources"] if s["uri"].endswith(filename))


def fts_exists(engine, table) -> bool:
    return sa.inspect(engine).has_table(table)


def test_publish_rollback_and_retention(env, corpus, embedder):
    engine, obj = env
    pycm = doc_id_of(corpus, SAMPLE[0])
    assert store.live_generation(engine) is None
    with pytest.raises(registry.GenerationError, match="no index generation is live"):
        searchers.open_searcher(engine, obj, embedder)

    first = gated(engine, obj, embedder)
    assert first["status"] == "candidate"
    n_chunks = len(corpus["chunks"])
    assert first["n_chunks"] == first["n_fts_rows"] == first["n_vectors"] == n_chunks
    assert first["n_documents"] == len(SAMPLE)
    assert all(c["passed"] for c in first["checks"].values()), first["checks"]
    publish.publish(engine, first["gen_id"], keep=2, store=obj)
    searcher = searchers.open_searcher(engine, obj, embedder)
    assert searcher.gen_id == first["gen_id"]
    assert searcher.search("multi-class confusion matrix statistics", k=3)[0].doc_id == pycm
    # Publishing the live generation again is a no-op (a retried publish step).
    assert publish.publish(engine, first["gen_id"], store=obj).changed is False

    # An ungated candidate cannot go live.
    second = build.build_generation(engine, obj, embedder)
    with pytest.raises(registry.GenerationError, match="missing gates: volume, latency, quality"):
        publish.publish(engine, second["gen_id"], store=obj)
    gates.evaluate_generation(engine, obj, embedder, second["gen_id"], thresholds=RELAXED, max_probe_queries=1)
    out = publish.publish(engine, second["gen_id"], keep=2, store=obj)
    assert (out.gen_id, out.previous_gen_id, out.retired) == (second["gen_id"], first["gen_id"], [])
    # The Searcher opened before the swap still answers from its own generation.
    assert searcher.search("multi-class confusion matrix statistics", k=3)[0].doc_id == pycm

    assert publish.rollback(engine) == first["gen_id"]
    live = store.live_generation(engine)
    assert (live["gen_id"], live["previous_gen_id"]) == (first["gen_id"], second["gen_id"])
    assert publish.rollback(engine, second["gen_id"]) == second["gen_id"]

    third = gated(engine, obj, embedder, probes=1)
    fourth = gated(engine, obj, embedder, probes=1)
    # keep=2 retains live (third) and previous (second): first is retired, its files are gone.
    assert publish.publish(engine, third["gen_id"], keep=2, store=obj).retired == [first["gen_id"]]
    assert publish.publish(engine, fourth["gen_id"], keep=2, store=obj).retired == [second["gen_id"]]
    statuses = {g["gen_id"]: g["status"] for g in registry.list_generations(engine)}
    assert statuses[first["gen_id"]] == "retired"
    assert statuses[fourth["gen_id"]] == statuses[third["gen_id"]] == "published"
    assert not fts_exists(engine, first["fts_table"])
    assert list(obj.list(registry.vector_prefix(first["gen_id"]) + "/")) == []
    assert fts_exists(engine, third["fts_table"])
    assert [g["gen_id"] for g in registry.list_generations(engine) if g["live"]] == [fourth["gen_id"]]
    with pytest.raises(registry.GenerationError, match="retired"):
        publish.rollback(engine, first["gen_id"])
    assert publish.rollback(engine) == third["gen_id"]


def test_failed_gate_rejects_and_keeps_live(env, corpus, embedder):
    engine, obj = env
    # Built before the live one, so it is stale once that is published.
    old = gated(engine, obj, embedder, probes=1)
    live = gated(engine, obj, embedder, probes=1)
    publish.publish(engine, live["gen_id"], store=obj)
    broken = build.build_generation(engine, obj, embedder)
    results = gates.evaluate_generation(
        engine, obj, embedder, broken["gen_id"], thresholds=gates.GateThresholds(ndcg_floor=1.01, latency_p95_ms=600_000.0), max_probe_queries=2
    )
    assert not results["quality"]["passed"]
    assert "below the floor" in results["quality"]["description"]
    assert results["volume"]["passed"] and results["latency"]["passed"]
    assert registry.get_generation(engine, broken["gen_id"])["status"] == "rejected"
    with pytest.raises(registry.GenerationError, match="rejected by its release gates .*quality"):
        publish.publish(engine, broken["gen_id"], store=obj)
    searcher = searchers.open_searcher(engine, obj, embedder)
    assert searcher.gen_id == live["gen_id"]
    assert searcher.search("AutoML nature-inspired optimisation", k=3)
    # A candidate older than the live generation is stale and refused.
    assert old["status"] == "candidate"
    with pytest.raises(registry.GenerationError, match="older than the live generation"):
        publish.publish(engine, old["gen_id"], store=obj)
    assert store.live_generation(engine)["gen_id"] == live["gen_id"]


def test_a_passing_rerun_of_the_failed_gates_lets_a_rejected_candidate_publish(env, embedder):
    """A transient gate failure is not final: re-running the failed gates alone re-admits the candidate."""
    engine, obj = env
    gen_id = build.build_generation(engine, obj, embedder)["gen_id"]
    # The latency SLA missed (an SLA nothing meets) and nDCG@10 under a floor nothing reaches.
    strict = gates.GateThresholds(latency_p95_ms=0.0, ndcg_floor=1.01)
    first = gates.evaluate_generation(engine, obj, embedder, gen_id, thresholds=strict, max_probe_queries=2)
    assert first["volume"]["passed"] and not first["latency"]["passed"] and not first["quality"]["passed"]
    assert registry.get_generation(engine, gen_id)["status"] == "rejected"
    with pytest.raises(registry.GenerationError, match="rejected by its release gates"):
        publish.publish(engine, gen_id, store=obj)
    recorded = registry.get_generation(engine, gen_id)["checks"]

    # Only the latency gate re-runs (as from the UI); quality still fails, so it stays rejected.
    rerun = gates.evaluate_generation(engine, obj, embedder, gen_id, thresholds=RELAXED, max_probe_queries=2,
                                      only=["latency"])
    assert set(rerun) == {"latency"} and rerun["latency"]["passed"]
    gen = registry.get_generation(engine, gen_id)
    assert gen["status"] == "rejected"
    assert gen["checks"]["quality"] == recorded["quality"] and gen["checks"]["volume"] == recorded["volume"]
    assert gen["checks"]["latency"]["passed"] is True

    # Quality re-run under the real floor: every blocking gate passes, the candidate publishes.
    gates.evaluate_generation(engine, obj, embedder, gen_id, thresholds=RELAXED, max_probe_queries=2, only=["quality"])
    assert registry.get_generation(engine, gen_id)["status"] == "candidate"
    assert publish.publish(engine, gen_id, store=obj).gen_id == gen_id
    assert store.live_generation(engine)["gen_id"] == gen_id
    with pytest.raises(ValueError, match="unknown release gates"):
        gates.evaluate_generation(engine, obj, embedder, gen_id, only=["speed"])


def test_a_rejected_generation_without_its_files_stays_rejected(env, embedder):
    engine, obj = env
    old = build.build_generation(engine, obj, embedder)["gen_id"]
    gates.evaluate_generation(engine, obj, embedder, old, thresholds=gates.GateThresholds(latency_p95_ms=0.0),
                              max_probe_queries=1)
    assert registry.get_generation(engine, old)["status"] == "rejected"
    # A newer generation goes live: retention drops the older rejected one's files.
    publish.publish(engine, gated(engine, obj, embedder, probes=1)["gen_id"], store=obj)
    assert registry.get_generation(engine, old)["fts_table"] == ""
    rerun = gates.evaluate_generation(engine, obj, embedder, old, thresholds=RELAXED, max_probe_queries=1,
                                      only=["latency"])
    assert not rerun["latency"]["passed"] and "not a complete candidate" in rerun["latency"]["description"]
    assert registry.get_generation(engine, old)["status"] == "rejected"


def test_the_vector_half_embeds_nothing_and_names_the_shards_without_vectors(env, corpus, embedder):
    """Vectors come from the embedding step alone: a chunk without one stops the build, before
    anything is recorded, with the shards and what to run."""
    engine, obj = env
    e = store.embeddings
    gone = sorted({c["content_hash"] for c in corpus["chunks"]})[:2]
    with engine.begin() as conn:
        conn.execute(sa.delete(e).where(e.c.content_hash.in_(gone)))
        n_vectors = conn.execute(sa.select(sa.func.count()).select_from(e)).scalar_one()
    shards = {c["shard"] for c in corpus["chunks"] if c["content_hash"] in gone}
    gen_id = registry.new_generation_id()
    with pytest.raises(build.MissingVectorsError, match="materialize those chunk_embeddings partitions") as err:
        build.build_vector_part(engine, obj, embedder, gen_id)
    assert set(err.value.missing) == shards and sum(err.value.missing.values()) == len(gone)
    assert all(f"{s} (" in str(err.value) for s in shards)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(e)).scalar_one() == n_vectors, "nothing embedded"
    with pytest.raises(KeyError):
        registry.get_generation(engine, gen_id)
    # The embedding step (chunk_embeddings' call) stores them; then the build goes ahead.
    embeddings.embed_missing(engine, embedder)
    assert build.missing_vectors(engine, embedder.model_id) == {}
    assert build.build_vector_part(engine, obj, embedder, gen_id).n_vectors == len(corpus["chunks"])


def test_concurrent_searches_during_five_swaps(env, corpus, embedder):
    engine, obj = env
    first = gated(engine, obj, embedder, probes=1)
    publish.publish(engine, first["gen_id"], keep=3, store=obj)
    candidates = [gated(engine, obj, embedder, probes=1) for _ in range(5)]
    probe = gates.load_probe_set()
    present = {r["doc_id"] for r in corpus["documents"]}
    known = [probe.queries[q] for q, rel in sorted(probe.qrels.items()) if set(rel) & present]
    assert len(known) >= 3
    errors: list[BaseException] = []
    empty: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()

    def search_loop(offset: int) -> None:
        i = offset
        while not stop.is_set():
            try:
                searcher = searchers.open_searcher(engine, obj, embedder)
                seen.add(searcher.gen_id)
                query = known[i % len(known)]
                if not searcher.search(query, k=5):
                    empty.append(query)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
            i += 1

    threads = [threading.Thread(target=search_loop, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    try:
        for cand in candidates:
            # Swaps are paced apart like real publications: with keep=3 a generation is retired two
            # publications after it stopped being live, far longer than one search takes.
            time.sleep(1.0)
            publish.publish(engine, cand["gen_id"], keep=3, store=obj)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert not empty
    assert len(seen) >= 2, seen
    assert store.live_generation(engine)["gen_id"] == candidates[-1]["gen_id"]
    statuses = [g["status"] for g in registry.list_generations(engine)]
    assert statuses.count("published") == 3 and statuses.count("retired") == 3


def test_gate_results_are_recorded_on_the_generation(env, embedder):
    engine, obj = env
    gen = build.build_generation(engine, obj, embedder)
    gates.evaluate_generation(
        engine, obj, embedder, gen["gen_id"], thresholds=gates.GateThresholds(latency_p95_ms=0.0), max_probe_queries=1
    )
    with engine.connect() as conn:
        raw = conn.execute(
            sa.select(store.index_generations.c.checks).where(store.index_generations.c.gen_id == gen["gen_id"])
        ).scalar_one()
    checks = json.loads(raw)
    assert set(checks) == {"volume", "latency", "quality", "parse_quality", "freshness"}
    assert checks["latency"]["passed"] is False and checks["latency"]["blocking"] is True
    assert checks["latency"]["metadata"]["latency_ms_p95"] > 0.0
    assert "exceeds the SLA" in checks["latency"]["description"]
    assert checks["freshness"]["blocking"] is False


def test_halves_built_in_parallel_make_one_candidate(env, corpus, embedder, caplog):
    """fts_index and vector_index run as parallel steps of one run: whichever finishes last promotes it."""
    engine, obj = env
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    gen_id = registry.new_generation_id(when=started, salt="run-1234")
    # Every step of a run derives the same id from the run's start time and id.
    assert gen_id == registry.new_generation_id(when=started, salt="run-1234")
    assert gen_id.startswith("20260102T030405-")
    assert gen_id != registry.new_generation_id(when=started, salt="run-5678")
    errors: list[BaseException] = []

    def run(fn) -> None:  # noqa: ANN001
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    halves = [
        threading.Thread(target=run, args=(lambda: build.build_fts_part(engine, gen_id),)),
        threading.Thread(target=run, args=(lambda: build.build_vector_part(engine, obj, embedder, gen_id),)),
    ]
    for t in halves:
        t.start()
    for t in halves:
        t.join()
    assert not errors, errors
    gen = registry.get_generation(engine, gen_id)
    assert gen["status"] is registry.GenerationStatus.CANDIDATE
    assert gen["model_id"] == embedder.model_id
    assert gen["n_fts_rows"] == gen["n_vectors"] == len(corpus["chunks"])
    # A step retried within the run rebuilds its half of the same candidate, and says so on the
    # module's logger (which Dagster captures as the step's log).
    with caplog.at_level(logging.INFO, logger=build.__name__):
        build.build_fts_part(engine, gen_id)
    assert f"generation {gen_id}: full-text table {registry.fts_table_name(gen_id)} has" in caplog.text
    assert registry.get_generation(engine, gen_id)["status"] == "candidate"
