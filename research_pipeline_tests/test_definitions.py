"""The code location loads, and every job, schedule, sensor and asset in it resolves and follows the house rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from research_pipeline.lib.core import store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def defs() -> dg.Definitions:
    from research_pipeline.definitions import defs as loaded

    return loaded


def test_every_job_schedule_and_sensor_resolves(defs):
    jobs = {job.name: job for job in defs.resolve_all_job_defs()}
    assert {"ingest_job", "embed_job"} <= set(jobs)
    for name in jobs:
        assert name == "__ASSET_JOB" or name.endswith("_job"), f"job {name} must be named <verb>_job"
    repo = defs.get_repository_def()
    for schedule in repo.schedule_defs:
        assert schedule.name.startswith("nightly_"), f"schedule {schedule.name} must be named nightly_<job>"
        assert schedule.job_name in jobs
    sensor_names = [s.name for s in repo.sensor_defs]
    assert "new_papers_sensor" in sensor_names
    for sensor in repo.sensor_defs:
        assert sensor.name.endswith("_sensor"), f"sensor {sensor.name} must be named <event>_sensor"
        for target in sensor.targets:
            assert target.job_name in jobs, f"{sensor.name} targets unknown job {target.job_name}"
    assert [t.job_name for t in defs.resolve_sensor_def("new_papers_sensor").targets] == ["reindex_job"]


def test_every_asset_has_a_group_kinds_and_a_description(defs):
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.is_external:
            continue
        assert node.group_name and node.group_name != "default", f"{key.to_user_string()} has no group_name"
        assert node.kinds, f"{key.to_user_string()} has no kinds"
        assert node.description, f"{key.to_user_string()} has no docstring"


def test_ingest_and_embedding_assets_are_wired(defs):
    graph = defs.resolve_asset_graph()
    documents, chunks, embeddings = (dg.AssetKey(k) for k in ("documents", "chunks", "chunk_embeddings"))
    assert graph.get(documents).group_name == graph.get(chunks).group_name == "ingest"
    assert documents in graph.get(chunks).parent_keys
    node = graph.get(embeddings)
    assert node.group_name == "embeddings"
    assert chunks in node.parent_keys
    assert list(node.partitions_def.get_partition_keys()) == list(store.SHARDS)
    assert node.backfill_policy.max_partitions_per_run >= 1
    embed_job = defs.resolve_job_def("embed_job")
    assert embed_job.partitions_def.get_partition_keys() == list(store.SHARDS)


def test_resources_cover_every_requirement(defs):
    # Resolving the implicit asset job validates that each asset's resource keys are provided.
    defs.resolve_implicit_global_asset_job_def()
    assert {"database", "object_store", "inbox", "embedder"} <= set(defs.resources)


def test_dagster_cli_validates_the_code_location(tmp_path):
    env = dict(os.environ, RP_HOME=str(tmp_path / "rp"), DAGSTER_HOME=str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-m", "research_pipeline.definitions"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Validation successful" in proc.stdout + proc.stderr


def test_assets_carry_code_references_owners_versions_and_table_schemas(defs):
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}
    for key, spec in specs.items():
        [ref] = spec.metadata["dagster/code_references"].code_references
        assert Path(ref.file_path).is_file() and ref.line_number > 0, f"{key} has no code reference"
    for key in ("documents", "chunks", "chunk_embeddings", "fts_index", "vector_index", "published_index"):
        assert specs[key].owners, f"{key} has no owner"
        assert specs[key].code_version, f"{key} has no code version"
    for key, table in (("documents", store.documents), ("chunks", store.chunks)):
        schema = specs[key].metadata["dagster/column_schema"]
        assert [c.name for c in schema.columns] == [c.name for c in table.columns]
    for key in ("documents", "published_index"):
        assert specs[key].freshness_policy is not None, f"{key} has no freshness policy"
