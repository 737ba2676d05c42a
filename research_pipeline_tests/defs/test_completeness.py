"""What a Dagster user expects of every asset: owners, code versions, code references, column
schemas of the table assets, freshness policies, and migration assets that refuse at once,
naming the variable, on a deployment with no migration target."""

import dagster as dg
import pytest

from research_pipeline.config import Settings
from research_pipeline.defs.migration.assets import (
    migrated_objects,
    migrated_rows,
    migration,
)
from research_pipeline.defs.resources import build_resources
from research_pipeline.lib.core import store

#: The assets stored in one table of the corpus database, and that table.
TABLE_ASSETS = {
    "documents": store.documents,
    "chunks": store.chunks,
    "chunk_embeddings": store.embeddings,
    "published_index": store.index_pointer,
}


@pytest.fixture(scope="module")
def specs() -> dict[str, dg.AssetSpec]:
    from research_pipeline.definitions import defs

    return {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}


def test_every_asset_has_owners_a_code_version_and_a_source_link(specs):
    assert {"migrated_rows", "migrated_objects", "migration", "migration_cutover"} <= set(specs)
    for key, spec in specs.items():
        assert spec.owners, f"{key} has no owner"
        assert spec.code_version, f"{key} has no code version"
        [ref] = spec.metadata["dagster/code_references"].code_references
        assert ref.file_path.endswith(".py") and ref.line_number > 0, key


def test_table_assets_carry_their_column_schema(specs):
    for key, table in TABLE_ASSETS.items():
        schema = specs[key].metadata["dagster/column_schema"]
        assert [c.name for c in schema.columns] == [c.name for c in table.columns], key
        assert specs[key].metadata["dagster/table_name"] == table.name
        unique = {c.name for c in schema.columns if c.constraints.unique}
        if len(table.primary_key.columns) == 1:
            assert unique == {c.name for c in table.primary_key.columns}, key
    # A composite key's columns are not unique one by one (a text has one vector per model).
    embeddings = {c.name: c for c in specs["chunk_embeddings"].metadata["dagster/column_schema"].columns}
    assert not embeddings["content_hash"].constraints.unique
    assert not embeddings["vector"].constraints.nullable


def test_the_assets_users_rely_on_have_freshness_policies(specs):
    for key in ("documents", "published_index"):
        assert specs[key].freshness_policy is not None, key


@pytest.mark.parametrize(
    "asset, partition, variables",
    [
        (migrated_rows, "0", ["RP_TARGET_DATABASE_URL"]),
        (migrated_objects, "3", ["RP_TARGET_DATABASE_URL", "RP_S3_BUCKET"]),
        (migration, None, ["RP_TARGET_DATABASE_URL", "RP_S3_BUCKET"]),
    ],
)
def test_migration_without_a_target_fails_once_naming_the_variables(tmp_path, asset, partition, variables):
    """"Materialize all" on a deployment that is not migrating: a clear failure, not three retries."""
    settings = Settings(home=tmp_path, inbox=tmp_path / "inbox", database_url=f"sqlite:///{tmp_path / 'rp.db'}",
                        object_store_url=str(tmp_path / "objects"))
    (tmp_path / "inbox").mkdir()
    store.create_schema(store.make_engine(settings.database_url))
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], resources=build_resources(settings), partition_key=partition,
                                instance=instance, raise_on_error=False)
        assert not result.success
        description = result.failure_data_for_node(asset.op.name).user_failure_data.description
        assert all(v in description for v in variables), description
        retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
        assert retries == []
