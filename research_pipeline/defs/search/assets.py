"""The search assets: each reindex run builds a candidate index generation and publishes it.

`fts_index` and `vector_index` build the two halves of one candidate generation beside the
live one (the generation id is derived from the run, so both steps of a run write the same
candidate). The blocking release gates in `checks.py` judge the candidate; `published_index`
only runs when they passed, and flips the live pointer.

Incremental: both halves are built from one corpus digest (every chunk id and text hash, the
papers' titles and abstracts, the model). When it equals the digest the live generation was
built from, neither half is built, so the gates and the publish are skipped too: an unchanged
corpus makes no new generation. Set `force: true` in the run config to build one anyway.
"""

from collections.abc import Iterator
from datetime import timedelta

import dagster as dg
import sqlalchemy as sa

from research_pipeline.defs.ingest.assets import reflected_schema, table_metadata
from research_pipeline.defs.resources import (
    TRANSIENT_RETRY,
    DatabaseResource,
    EmbedderResource,
    ObjectStoreResource,
    ReleaseGatesResource,
)
from research_pipeline.lib.core import store, util
from research_pipeline.lib.release import build, publish, registry

CHUNKS = dg.AssetKey("chunks")
CHUNK_EMBEDDINGS = dg.AssetKey("chunk_embeddings")
OWNERS = ["team:search"]
#: The run tag naming the index generation a run builds (set on the run as soon as it is known).
GEN_ID_TAG = "research_pipeline/gen_id"


class IndexBuildConfig(dg.Config):
    """Run-time knobs of a generation build."""

    #: Build a new generation even if the corpus is the one the live generation was built from.
    force: bool = False


def run_generation_id(context: dg.AssetExecutionContext) -> str:
    """The candidate generation id of this run: its creation time plus a hash of the run id.

    A re-execution (e.g. "from failure") uses its root run, so the step it re-runs finishes the
    same candidate as the steps it reuses. The run is tagged with the id, so the Runs page can
    be filtered by generation.
    """
    root = context.run.root_run_id or context.run_id
    record = context.instance.get_run_record_by_id(root)
    when = record.create_timestamp if record is not None else None
    gen_id = registry.new_generation_id(when=when, salt=root)
    if context.run.tags.get(GEN_ID_TAG) != gen_id:
        context.instance.add_run_tags(context.run_id, {GEN_ID_TAG: gen_id})
    return gen_id


def latest_generation_id(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    """The `gen_id` metadata of the latest materialization of `key` (None if never materialized)."""
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("gen_id")
    return None if value is None else str(value.value)


def corpus_digest(engine: sa.Engine, model: str) -> str:
    """A digest of what a generation is built from: every chunk (id, text hash), the papers' titles
    and abstracts, and the embedding model. Equal digests build equal generations."""
    c, d = store.chunks, store.documents
    digest = util.sha256_hex(model.encode())
    with engine.connect() as conn:
        rows = conn.execute(sa.select(c.c.chunk_id, c.c.content_hash).order_by(c.c.chunk_id)).all()
        docs = conn.execute(
            sa.select(d.c.doc_id, d.c.title, d.c.abstract)
            .where(sa.exists().where(c.c.doc_id == d.c.doc_id))
            .order_by(d.c.doc_id)
        ).all()
    parts = [digest, *(f"{r.chunk_id}:{r.content_hash}" for r in rows)]
    parts += [f"{r.doc_id}\0{r.title or ''}\0{r.abstract or ''}" for r in docs]
    return util.sha256_hex("\n".join(parts).encode())[:32]


def live_corpus_digest(instance: dg.DagsterInstance, engine: sa.Engine) -> tuple[str | None, str | None]:
    """(live generation id, the corpus digest it was built from); the digest is None when unknown
    (no generation live, or built outside this Dagster instance)."""
    live = store.live_generation(engine)
    if live is None:
        return None, None
    records = instance.fetch_materializations(dg.AssetKey("vector_index"), limit=100).records
    for record in records:
        metadata = record.asset_materialization.metadata if record.asset_materialization else {}
        gen = metadata.get("gen_id")
        if gen is not None and gen.value == live["gen_id"] and "corpus_digest" in metadata:
            return live["gen_id"], str(metadata["corpus_digest"].value)
    return live["gen_id"], None


def unchanged_since_live(
    context: dg.AssetExecutionContext, engine: sa.Engine, embedder: EmbedderResource, force: bool
) -> tuple[bool, str]:
    """(whether this build can be skipped, the current corpus digest)."""
    digest = corpus_digest(engine, embedder.model)
    if force:
        return False, digest
    live_id, live_digest = live_corpus_digest(context.instance, engine)
    if live_digest == digest:
        context.log.info(
            f"corpus unchanged since live generation {live_id} (digest {digest}): no new generation is built"
        )
        return True, digest
    return False, digest


def _int_or_absent(metadata: dict[str, dg.MetadataValue], key: str, value: object) -> None:
    # An unknown count is left out rather than plotted as 0.
    if value is not None:
        metadata[key] = dg.MetadataValue.int(int(value))


def generation_metadata(gen: dict) -> dict[str, dg.MetadataValue]:
    """The figures of a generation row as plottable metadata (unknown figures left out)."""
    metadata = {
        "gen_id": dg.MetadataValue.text(gen["gen_id"]),
        "status": dg.MetadataValue.text(str(gen["status"])),
    }
    for key, column in (("documents", "n_documents"), ("chunks", "n_chunks"), ("fts_rows", "n_fts_rows"), ("vectors", "n_vectors")):
        _int_or_absent(metadata, key, gen.get(column))
    return metadata


@dg.asset(
    group_name="search",
    kinds={"sql"},
    deps=[CHUNKS],
    owners=OWNERS,
    code_version="fts-v1",
    retry_policy=TRANSIENT_RETRY,
    output_required=False,
)
def fts_index(
    context: dg.AssetExecutionContext,
    config: IndexBuildConfig,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    embedder: EmbedderResource,
) -> Iterator[dg.MaterializeResult]:
    """The full-text (BM25) table of this run's candidate index generation, `fts_<gen_id>`,
    and its Tantivy index under `indexes/<gen_id>/fulltext/` in the object store (what searches read).

    Built beside the live generation's table from the current chunks and their papers'
    titles and abstracts; searches keep using the live table until `published_index` flips
    the pointer. Not built when the corpus is the live generation's (see the module docstring).
    """
    engine = database.get_engine()
    skip, digest = unchanged_since_live(context, engine, embedder, config.force)
    if skip:
        return
    gen_id = run_generation_id(context)
    try:
        part = build.build_fts_part(engine, gen_id, object_store=object_store.get_store())
    except build.OutOfSpaceError as exc:  # the same disk fails a retry: an operator frees space first
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(digest),
        metadata={
            "gen_id": dg.MetadataValue.text(gen_id),
            "corpus_digest": dg.MetadataValue.text(digest),
            "dagster/table_name": dg.MetadataValue.text(part.fts_table),
            "dagster/column_schema": dg.MetadataValue.table_schema(reflected_schema(engine, part.fts_table)),
            "dagster/row_count": dg.MetadataValue.int(part.n_fts_rows),
            "fts_table": dg.MetadataValue.text(part.fts_table),
            "fts_rows": dg.MetadataValue.int(part.n_fts_rows),
            "seconds": dg.MetadataValue.float(float(part.seconds)),
        },
    )


@dg.asset(
    group_name="search",
    kinds={"faiss"},
    deps=[CHUNKS, CHUNK_EMBEDDINGS],
    owners=OWNERS,
    code_version="vectors-v1",
    retry_policy=TRANSIENT_RETRY,
    output_required=False,
)
def vector_index(
    context: dg.AssetExecutionContext,
    config: IndexBuildConfig,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    embedder: EmbedderResource,
) -> Iterator[dg.MaterializeResult]:
    """The FAISS index of this run's candidate generation, under `indexes/<gen_id>/` in the object store.

    One vector per current chunk, read from `chunk_embeddings` (which must cover every shard:
    the build fails, naming the shards, if a chunk has no vector). Exact search below 50k
    vectors, HNSW above (see the build parameters in the manifest). Not built when the corpus
    is the live generation's (see the module docstring).
    """
    engine = database.get_engine()
    skip, digest = unchanged_since_live(context, engine, embedder, config.force)
    if skip:
        return
    model = embedder.get_embedder()
    try:
        # Embeds nothing: chunk_embeddings is the one producer of vectors (the graph's lineage).
        missing = build.missing_vectors(engine, model.model_id)
        if missing:
            raise build.MissingVectorsError(model.model_id, missing)
        gen_id = run_generation_id(context)
        part = build.build_vector_part(engine, object_store.get_store(), model, gen_id)
    except (build.MissingVectorsError, build.OutOfSpaceError) as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    params = part.build_params or {}
    metadata = {
        "gen_id": dg.MetadataValue.text(gen_id),
        "corpus_digest": dg.MetadataValue.text(digest),
        "manifest_key": dg.MetadataValue.text(part.vector_key),
        "dagster/row_count": dg.MetadataValue.int(part.n_vectors),
        "vectors": dg.MetadataValue.int(part.n_vectors),
        "chunks": dg.MetadataValue.int(part.n_chunks),
        "documents": dg.MetadataValue.int(part.n_documents),
        "seconds": dg.MetadataValue.float(float(part.seconds)),
    }
    if params.get("type"):
        metadata["index_type"] = dg.MetadataValue.text(str(params["type"]))
    yield dg.MaterializeResult(data_version=dg.DataVersion(digest), metadata=metadata)


#: When automation publishes: after the candidate's halves were built (eager), or when its blocking
#: gates newly pass without a publish in between (a gate re-run from the UI) - and only while they pass.
_gates_passed = dg.AutomationCondition.all_deps_blocking_checks_passed()
PUBLISH_CONDITION = (
    dg.AutomationCondition.eager()
    | (_gates_passed.newly_true() & ~dg.AutomationCondition.newly_updated() & ~dg.AutomationCondition.in_progress())
) & _gates_passed


@dg.asset(
    group_name="search",
    kinds={"sql"},
    deps=[fts_index, vector_index],
    owners=OWNERS,
    code_version="publish-v1",
    retry_policy=TRANSIENT_RETRY,
    metadata=table_metadata(store.index_pointer),
    automation_condition=PUBLISH_CONDITION,
    # The age of the live generation: a week without a new one means no new papers were indexed.
    freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(days=14), warn_window=timedelta(days=7)),
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
    Its `live_gen_id` metadata names the live generation; a rollback records an observation
    with the same key, so the asset's page always shows which generation is live.
    """
    gen_id = latest_generation_id(context.instance, vector_index.key)
    fts_gen = latest_generation_id(context.instance, fts_index.key)
    if gen_id is None or gen_id != fts_gen:
        raise dg.Failure(
            description=(
                f"vector_index (generation {gen_id}) and fts_index (generation {fts_gen}) were not built by the "
                "same run: materialize both in one run (reindex_job)"
            ),
            allow_retries=False,
        )
    if context.run.tags.get(GEN_ID_TAG) != gen_id:
        context.instance.add_run_tags(context.run_id, {GEN_ID_TAG: gen_id})
    engine = database.get_engine()
    try:
        outcome = publish.publish(engine, gen_id, keep=release_gates.keep_generations, store=object_store.get_store())
    except registry.GenerationError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    previous, retired = outcome.previous_gen_id, list(outcome.retired)
    gen = registry.get_generation(engine, gen_id)
    context.log.info(
        f"live generation: {gen_id} (previous {previous}); retired {retired or 'none'}"
    )
    metadata = generation_metadata(gen)
    metadata.update(
        {
            "live_gen_id": dg.MetadataValue.text(gen_id),
            "action": dg.MetadataValue.text("publish"),
            "retired": dg.MetadataValue.int(len(retired)),
            "changed": dg.MetadataValue.int(int(outcome.changed)),
            "dagster/row_count": dg.MetadataValue.int(pointer_rows(engine)),
        }
    )
    if previous:
        metadata["previous_gen_id"] = dg.MetadataValue.text(str(previous))
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(gen_id))


def pointer_rows(engine: sa.Engine) -> int:
    """Rows of `index_pointer` (the table published_index is stored in)."""
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(store.index_pointer)).scalar_one())


def record_live_generation(instance: dg.DagsterInstance, engine: sa.Engine, action: str) -> str | None:
    """Record the live generation as an observation of `published_index` (e.g. after a CLI rollback).

    Returns the live generation id (None, and nothing recorded, before the first publish). The
    observation carries the same `live_gen_id` key as a publish, so the asset page shows the
    generation that is live however the pointer moved.
    """
    live = store.live_generation(engine)
    if live is None:
        return None
    metadata = generation_metadata(live)
    metadata["live_gen_id"] = dg.MetadataValue.text(live["gen_id"])
    metadata["action"] = dg.MetadataValue.text(action)
    if live.get("previous_gen_id"):
        metadata["previous_gen_id"] = dg.MetadataValue.text(live["previous_gen_id"])
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key=published_index.key, metadata=metadata, tags={GEN_ID_TAG: live["gen_id"]})
    )
    return live["gen_id"]
