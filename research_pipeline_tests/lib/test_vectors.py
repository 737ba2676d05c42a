"""FAISS vector index: exact/HNSW choice, HNSW recall on real embeddings, atomic verified storage."""

from __future__ import annotations

import json

import boto3
import faiss
import numpy as np
import pytest

from research_pipeline.lib.core.objectstore import LocalObjectStore, S3ObjectStore
from research_pipeline.lib.embed import vectors
from research_pipeline.lib.embed.model import load_embedder
from research_pipeline_tests.shared import IR, require_shared


@pytest.fixture(scope="module")
def title_vectors() -> tuple[list[str], np.ndarray]:
    """Real MiniLM embeddings of 150 SciFact titles, with ids."""
    ids, titles = [], []
    with open(require_shared(IR / "scifact" / "corpus.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            ids.append(f"c{rec['_id']}")
            titles.append(rec["title"])
            if len(ids) >= 150:
                break
    return ids, load_embedder().encode(titles)


def test_small_index_is_exact_and_finds_each_vector_first(title_vectors):
    ids, vecs = title_vectors
    index, params = vectors.build_vector_index(vecs)
    assert params["type"] == "flat_ip" and isinstance(index, faiss.IndexFlatIP)
    vi = vectors.VectorIndex(index, ids)
    for i in range(0, len(ids), 10):
        hits = vi.search(vecs[i], 3)
        assert hits[0][0] == ids[i]
        assert hits[0][1] == pytest.approx(1.0, abs=1e-4)  # normalised: self-similarity is 1
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert len(vi.search(vecs[0], 10_000)) == len(ids)  # k beyond the index size is clipped


def test_above_threshold_builds_hnsw(title_vectors):
    _, vecs = title_vectors
    index, params = vectors.build_vector_index(vecs, exact_threshold=100)
    assert params["type"] == "hnsw_flat" and params["M"] == vectors.HNSW_M
    assert index.ntotal == len(vecs)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="2-D"):
        vectors.build_vector_index(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="metric"):
        vectors.build_vector_index(np.zeros((2, 4), dtype=np.float32), metric="l2")


def _roundtrip(store, title_vectors, exact_threshold):
    ids, vecs = title_vectors
    index, params = vectors.build_vector_index(vecs, exact_threshold=exact_threshold)
    key = vectors.write_vector_index(store, "gen1/vectors", index, ids, {"model": "m@256", "build_params": params})
    assert key == "gen1/vectors/manifest.json"
    loaded = vectors.load_vector_index(store, key)
    assert loaded.ntotal == len(ids) and loaded.chunk_ids == ids
    m = loaded.manifest
    assert (m["model"], m["dim"], m["count"], m["index_type"]) == ("m@256", vecs.shape[1], len(ids), params["type"])
    assert set(m["files"]) == {vectors.INDEX_NAME, vectors.IDS_NAME}
    in_memory = vectors.VectorIndex(index, ids)
    for i in (0, 17, 99):
        assert loaded.search(vecs[i], 5) == in_memory.search(vecs[i], 5)
    return key


@pytest.mark.parametrize("exact_threshold", [vectors.EXACT_THRESHOLD, 100])
def test_local_roundtrip(tmp_path, title_vectors, exact_threshold):
    store = LocalObjectStore(tmp_path / "objects")
    _roundtrip(store, title_vectors, exact_threshold)
    assert not [p for p in (tmp_path / "objects").rglob("*.tmp")]  # no temp files left behind


def test_s3_roundtrip(s3_endpoint, title_vectors):  # noqa: F811
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="vectors")
    _roundtrip(S3ObjectStore("vectors", "idx", client=client), title_vectors, vectors.EXACT_THRESHOLD)


def test_corrupt_or_missing_files_are_refused(tmp_path, title_vectors):
    store = LocalObjectStore(tmp_path)
    key = _roundtrip(store, title_vectors, vectors.EXACT_THRESHOLD)
    index_path = tmp_path / "gen1" / "vectors" / vectors.INDEX_NAME
    data = bytearray(index_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_path.write_bytes(bytes(data))
    with pytest.raises(vectors.VectorIndexError, match="sha256"):
        vectors.load_vector_index(store, key)
    index_path.unlink()
    with pytest.raises(vectors.VectorIndexError, match="missing"):
        vectors.load_vector_index(store, key)
    with pytest.raises(vectors.VectorIndexError, match="not found"):
        vectors.load_vector_index(store, "nope/manifest.json")


class FailingStore(LocalObjectStore):
    """A local store whose writes of one object name fail, like a disk filling up mid-write."""

    def __init__(self, root, fail_on: str):
        super().__init__(root)
        self.fail_on = fail_on

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith(self.fail_on):
            raise OSError(f"no space left writing {key}")
        super().put_bytes(key, data)


@pytest.mark.parametrize("fail_on", [vectors.INDEX_NAME, vectors.IDS_NAME])
def test_failed_write_leaves_no_manifest(tmp_path, title_vectors, fail_on):
    ids, vecs = title_vectors
    index, _ = vectors.build_vector_index(vecs)
    store = FailingStore(tmp_path, fail_on)
    with pytest.raises(OSError):
        vectors.write_vector_index(store, "g/vectors", index, ids, {})
    assert not store.exists("g/vectors/manifest.json")
    with pytest.raises(ValueError, match="chunk ids"):
        vectors.write_vector_index(LocalObjectStore(tmp_path), "h", index, ids[:-1], {})
