"""The release gates of a candidate index generation, as asset checks on `vector_index`.

The three blocking checks (volume, latency, quality) stop `published_index` from running when
one fails, in the same run and (through its automation condition) in later runs; the live
generation stays as it was. Two advisory checks warn without blocking. All of them run in one
step because they share one loaded candidate Searcher; each gate's figures are its metadata
and its description says why it failed and what to do.
"""

from collections.abc import Iterator

import dagster as dg

from research_pipeline.defs.resources import (
    TRANSIENT_RETRY,
    DatabaseResource,
    EmbedderResource,
    ObjectStoreResource,
    ReleaseGatesResource,
)
from research_pipeline.defs.search.assets import (
    fts_index,
    latest_generation_id,
    vector_index,
)
from research_pipeline.lib.core import store
from research_pipeline.lib.release import gates

_DESCRIPTIONS = {
    "volume": "Blocking: enough documents, document drop vs live within bounds, chunks == fts rows == vectors == embeddings.",
    "latency": "Blocking: p95 latency of the bundled probe queries on the candidate is within the SLA.",
    "quality": (
        "Blocking: known-item probes drawn from the candidate corpus found in every search mode (success@10, "
        "MRR@10) and agreeing with live (rank-biased overlap); nDCG@10 on the bundled probe set where its papers are."
    ),
    "parse_quality": "Advisory: quarantine share and parse-quality distribution of the corpus.",
    "freshness": "Advisory: age of the newest document and of the live generation.",
}


def check_name(gate: str) -> str:
    return f"{vector_index.key.path[-1]}_{gate}"


def thresholds_of(release_gates: ReleaseGatesResource) -> gates.GateThresholds:
    return release_gates.thresholds()


class ReleaseGatesConfig(dg.Config):
    """Run-time knobs of the gate step."""

    #: Probe queries to run (0: the whole bundled set); answerable ones are kept first.
    max_probe_queries: int = 0


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            name=check_name(gate),
            asset=vector_index,
            # The gates judge the whole candidate, so they wait for its full-text half too.
            additional_deps=[fts_index],
            blocking=gate in gates.BLOCKING_GATES,
            description=_DESCRIPTIONS[gate],
        )
        for gate in (*gates.BLOCKING_GATES, *gates.ADVISORY_GATES)
    ],
    # Each gate can be re-run on its own from the UI (the gates share one evaluation).
    can_subset=True,
    retry_policy=TRANSIENT_RETRY,
)
def release_gates_check(
    context: dg.AssetCheckExecutionContext,
    config: ReleaseGatesConfig,
    database: DatabaseResource,
    object_store: ObjectStoreResource,
    embedder: EmbedderResource,
    release_gates: ReleaseGatesResource,
) -> Iterator[dg.AssetCheckResult]:
    """Evaluates every release gate on the candidate generation built by the latest `vector_index`."""
    gen_id = latest_generation_id(context.instance, vector_index.key)
    if gen_id is None:
        raise dg.Failure(description="vector_index has never been materialized: run reindex_job")
    engine = database.get_engine()
    live = store.live_generation(engine)
    gate_of = {check_name(gate): gate for gate in (*gates.BLOCKING_GATES, *gates.ADVISORY_GATES)}
    selected = [gate_of[key.name] for key in context.selected_asset_check_keys]
    # Only the selected gates run and are recorded on the generation; the others keep their
    # recorded result. A re-run in which every blocking gate passes makes a candidate that the
    # gates had rejected publishable again (lib/release/registry.record_gates).
    results = gates.evaluate_generation(
        engine,
        object_store.get_store(),
        embedder.get_embedder(),
        gen_id,
        thresholds=thresholds_of(release_gates),
        max_probe_queries=config.max_probe_queries,
        only=selected,
    )
    for gate, res in results.items():
        metadata: dict[str, dg.MetadataValue] = {"gen_id": dg.MetadataValue.text(gen_id)}
        if live is not None:
            # Which generation stays live if this gate blocks the candidate.
            metadata["live_gen_id"] = dg.MetadataValue.text(live["gen_id"])
        for key, value in res["metadata"].items():
            if isinstance(value, str):  # e.g. live_status: "compared", "unreadable: <reason>"
                metadata[key] = dg.MetadataValue.text(value)
            else:
                metadata[key] = dg.MetadataValue.int(value) if isinstance(value, int) else dg.MetadataValue.float(float(value))
        if not res["passed"]:
            context.log.warning(f"{check_name(gate)} on generation {gen_id}: {res['description']}")
        yield dg.AssetCheckResult(
            asset_key=vector_index.key,
            check_name=check_name(gate),
            passed=bool(res["passed"]),
            severity=dg.AssetCheckSeverity.ERROR if res["blocking"] else dg.AssetCheckSeverity.WARN,
            metadata=metadata,
            description=res["description"],
        )
