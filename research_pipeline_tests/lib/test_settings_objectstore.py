"""Settings from the environment and the local object store."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from research_pipeline.config import DEFAULT_MODEL, Settings
from research_pipeline.lib.core.objectstore import (
    LocalObjectStore,
    S3ObjectStore,
    open_object_store,
)


def test_defaults_live_under_rp_home(tmp_path):
    s = Settings.from_env({"RP_HOME": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path / 'rp.db'}"
    assert Path(s.object_store_url) == tmp_path / "objects"
    assert s.model == DEFAULT_MODEL and s.device == "cpu" and s.redis_url is None
    assert (s.inbox / "ATTRIBUTION.tsv").exists()


def test_environment_overrides_defaults(tmp_path):
    s = Settings.from_env(
        {
            "RP_HOME": str(tmp_path),
            "RP_INBOX": str(tmp_path / "in"),
            "RP_DATABASE_URL": "postgresql+psycopg://u@h/db",
            "RP_OBJECT_STORE_URL": "s3://bucket/prefix",
            "RP_REDIS_URL": "redis://127.0.0.1:6379/0",
        }
    )
    assert s.inbox == tmp_path / "in"
    assert s.database_url.startswith("postgresql")
    assert s.object_store_url == "s3://bucket/prefix"
    assert s.redis_url.endswith("/0")


def test_bad_device_names_the_setting():
    with pytest.raises(ValueError, match="RP_DEVICE"):
        Settings.from_env({"RP_DEVICE": "tpu"})


def test_local_store_round_trip_and_atomic_overwrite(tmp_path):
    objects = LocalObjectStore(tmp_path / "objects")
    objects.put_bytes("indexes/g1/index.faiss", b"one")
    objects.put_bytes("indexes/g1/index.faiss", b"two")
    assert objects.get_bytes("indexes/g1/index.faiss") == b"two"
    assert objects.size("indexes/g1/index.faiss") == 3
    assert list(objects.list("indexes/")) == ["indexes/g1/index.faiss"]
    # No temporary files are left beside the object.
    assert [p.name for p in (tmp_path / "objects/indexes/g1").iterdir()] == ["index.faiss"]
    objects.delete("indexes/g1/index.faiss")
    assert not objects.exists("indexes/g1/index.faiss")
    with pytest.raises(KeyError):
        objects.get_bytes("indexes/g1/index.faiss")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/./b", "", "a//b"])
def test_local_store_rejects_keys_leaving_the_root(tmp_path, key):
    with pytest.raises(ValueError, match="invalid object key"):
        LocalObjectStore(tmp_path).put_bytes(key, b"x")


def test_open_object_store_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="RP_OBJECT_STORE_URL"):
        open_object_store("ftp://host/x")
    with pytest.raises(ValueError, match="no bucket"):
        open_object_store("s3:///prefix")


@pytest.mark.parametrize("prefix", ["", "indexes/", "indexes/g1/", "indexes/g", "papers", "nothing/"])
def test_s3_and_local_stores_list_the_same_keys(tmp_path, s3_endpoint, prefix):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"list-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    stores = [LocalObjectStore(tmp_path / "objects"), S3ObjectStore(bucket, "rp/live", client=client)]
    keys = ["indexes/g1/index.faiss", "indexes/g1/manifest.json", "indexes/g2/index.faiss", "papers/ab.pdf"]
    for store in stores:
        for key in keys:
            store.put_bytes(key, key.encode())
    local, s3 = ([*store.list(prefix)] for store in stores)
    assert sorted(s3) == local == sorted(k for k in keys if k.startswith(prefix))
    with pytest.raises(ValueError, match="prefix"):
        list(stores[1].list("../other"))
