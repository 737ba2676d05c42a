"""The search assets: each reindex run builds a candidate index generation and publishes it.

`fts_index` and `vector_index` build the two halves of one candidate generation beside the
live one (the generation id is derived from the run, so both steps of a run write the same
candidate). The blocking release gates in `checks.py` judge the candidate; `published_index`
only runs when they passed, and flips the live pointer.
"""

import dagster as dg

from research_pipeline.defs.resources import (
    DatabaseResource,
    EmbedderResource,
    ObjectStoreResource,
    ReleaseGatesResource,
)
from research_pipeline.lib.release import generations

CHUNKS = dg.AssetKey("chunks")
CHUNK_EMBEDDINGS = dg.AssetKey("chunk_embeddings")


def run_generation_id(context: dg.AssetExecutionContext) -> str:
    """The candidate generation id of this run: its creation time plus a hash of the run id.

    A re-execution (e.g. "from failure") uses its root run, so the step it re-runs finishes the
    same candidate as the steps it reuses.
    """
    root = context.run.root_run_id or context.run_id
    record = context.instance.get_run_record_by_id(root)
    when = record.create_timestamp if record is not None else None
    return generations.new_generation_id(when=when, salt=root)


def latest_generation_id(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    """The `gen_id` metadata of the latest materialization of `key` (None if never materialized)."""
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("gen_id")
    return None if value is None else str(value.value)


def generation_metadata(gen: dict) -> dict[str, dg.MetadataValue]:
    """The figures of a generation row as plottable metadata."""
    return {
        "gen_id": dg.MetadataValue.text(gen["gen_id"]),
        "status": dg.MetadataValue.text(gen["status"]),
        "documents": dg.MetadataValue.int(int(gen["n_documents"] or 0)),
        "chunks": dg.MetadataValue.int(int(gen["n_chunks"] or 0)),
        "fts_rows": dg.MetadataValue.int(int(gen["n_fts_rows"] or 0)),
        "vectors": dg.MetadataValue.int(int(gen["n_vectors"] or 0)),
    }


@dg.asset(
    group_name="search",
    kinds={"sql"},
    deps=[CHUNKS],
)
def fts_index(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
) -> dg.MaterializeResult:
    """The full-text (BM25) table of this run's candidate index generation, `fts_<gen_id>`.

    Built beside the live generation's table from the current chunks and their papers'
    titles and abstracts; searches keep using the live table until `published_index` flips
    the pointer.
    """
    gen_id = run_generation_id(context)
    part = generations.build_fts_part(database.get_engine(), gen_id, log=context.log.info)
    return dg.MaterializeResult(
        metadata={
            "gen_id": dg.MetadataValue.text(gen_id),
            "fts_table": dg.MetadataValue.text(part["fts_table"]),
            "fts_rows": dg.MetadataValue.int(part["n_fts_rows"]),
            "seconds": dg.MetadataValue.float(float(part["seconds"])),
        }
    )


@dg.asset(
    group_name="search",
    kinds={"faiss"},
    deps=[CHUNKS, CHUNK_EMBEDDINGS],
)
def vector_index(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """The FAISS index of this run's candidate generation, under `indexes/<gen_id>/` in the object store.

    One vector per current chunk, from the embedding cache; chunks that have no vector yet
    are embedded first (so it does not wait for a `chunk_embeddings` backfill). Exact search
    below 50k vectors, HNSW above (see the build parameters in the manifest).
    """
    gen_id = run_generation_id(context)
    part = generations.build_vector_part(
        database.get_engine(),
        object_store.get_store(),
        embedder.get_embedder(),
        gen_id,
        batch_size=embedder.batch_size,
        log=context.log.info,
    )
    params = part["build_params"] or {}
    return dg.MaterializeResult(
        metadata={
            "gen_id": dg.MetadataValue.text(gen_id),
            "manifest_key": dg.MetadataValue.text(part["vector_key"]),
            "index_type": dg.MetadataValue.text(str(params.get("type", ""))),
            "vectors": dg.MetadataValue.int(part["n_vectors"]),
            "chunks": dg.MetadataValue.int(part["n_chunks"]),
            "documents": dg.MetadataValue.int(part["n_documents"]),
            "embedded_now": dg.MetadataValue.int(part["embedded"]),
            "embeddings_cached": dg.MetadataValue.int(part["cached"]),
            "seconds": dg.MetadataValue.float(float(part["seconds"])),
        }
    )


@dg.asset(
    group_name="search",
    kinds={"sql"},
    deps=[fts_index, vector_index],
    automation_condition=dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed(),
)
def published_index(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    release_gates: ReleaseGatesResource,
) -> dg.MaterializeResult:
    """The index generation that searches use: the `live` pointer, flipped to the gated candidate.

    Only runs after the blocking release gates on `vector_index` passed (in this run, or in
    an earlier one when launched by automation). Publishing is one transaction; the previous
    generation stays retained for rollback and for searches still in flight on it, and
    generations beyond `RP_KEEP_GENERATIONS` are retired (table dropped, files deleted).
    """
    gen_id = latest_generation_id(context.instance, vector_index.key)
    fts_gen = latest_generation_id(context.instance, fts_index.key)
    if gen_id is None or gen_id != fts_gen:
        raise dg.Failure(
            description=(
                f"vector_index (generation {gen_id}) and fts_index (generation {fts_gen}) were not built by the "
                "same run: materialize both in one run (reindex_job)"
            )
        )
    engine = database.get_engine()
    try:
        outcome = generations.publish(engine, gen_id, keep=release_gates.keep_generations, store=object_store.get_store())
    except generations.GenerationError as exc:
        raise dg.Failure(description=str(exc)) from exc
    gen = generations.get_generation(engine, gen_id)
    context.log.info(
        f"live generation: {gen_id} (previous {outcome['previous_gen_id']}); retired {outcome['retired'] or 'none'}"
    )
    metadata = generation_metadata(gen)
    metadata.update(
        {
            "previous_gen_id": dg.MetadataValue.text(outcome["previous_gen_id"] or ""),
            "retired": dg.MetadataValue.int(len(outcome["retired"])),
            "changed": dg.MetadataValue.int(int(outcome["changed"])),
        }
    )
    return dg.MaterializeResult(metadata=metadata)
