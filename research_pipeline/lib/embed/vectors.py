"""FAISS vector index over chunk embeddings, stored atomically in the object store.

Vectors are L2-normalised, so inner product is cosine similarity. Below `EXACT_THRESHOLD`
vectors the index is exact (IndexFlatIP: a brute-force scan is fast and perfect at that size);
above it, HNSW with parameters that keep recall@10 >= 0.95 against exact search on real
MiniLM embeddings (tested in research_pipeline_tests/lib/test_vectors.py).

On the object store an index is three objects under one prefix: the serialized FAISS index,
the chunk-id list (row i of the index is chunk_ids[i]) and a manifest naming both with their
sha256. The manifest is written last and only after both files were read back and checked, so
a manifest never points at a missing or partial index.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from research_pipeline.lib.core.objectstore import ObjectStore

#: Up to this many vectors the index is exact (IndexFlatIP).
EXACT_THRESHOLD = 50_000

#: HNSW graph degree and build/search beam widths (recall measured in test_vectors.py).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.faiss"
IDS_NAME = "chunk_ids.json"
FORMAT_VERSION = 1


class VectorIndexError(RuntimeError):
    """A stored vector index is missing, partial or does not match its manifest."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    mat = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if mat.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (n, dim), got shape {mat.shape}")
    return mat


def build_vector_index(
    vectors: np.ndarray,
    metric: str = "ip",
    exact_threshold: int = EXACT_THRESHOLD,
    hnsw_m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
) -> tuple[faiss.Index, dict[str, Any]]:
    """A FAISS index over `vectors` (rows L2-normalised) and the parameters it was built with.

    Exact inner product up to `exact_threshold` rows, HNSW above.
    """
    if metric != "ip":
        raise ValueError(f"metric {metric!r} is not supported: embeddings are normalised, use 'ip'")
    mat = _as_matrix(vectors)
    n, dim = mat.shape
    if dim == 0:
        raise ValueError("vectors have dimension 0")
    if n <= exact_threshold:
        index = faiss.IndexFlatIP(dim)
        params: dict[str, Any] = {"type": "flat_ip", "metric": metric}
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params = {
            "type": "hnsw_flat",
            "metric": metric,
            "M": hnsw_m,
            "efConstruction": ef_construction,
            "efSearch": ef_search,
        }
    if n:
        index.add(mat)
    params["exact_threshold"] = exact_threshold
    return index, params


def describe_index(index: faiss.Index) -> dict[str, Any]:
    """The build parameters of an index read back from the index itself."""
    if hasattr(index, "hnsw"):
        return {
            "type": "hnsw_flat",
            "metric": "ip",
            "M": int(index.hnsw.nb_neighbors(1)),
            "efConstruction": int(index.hnsw.efConstruction),
            "efSearch": int(index.hnsw.efSearch),
        }
    if isinstance(index, faiss.IndexFlatIP):
        return {"type": "flat_ip", "metric": "ip"}
    return {"type": type(index).__name__}


@dataclass
class VectorIndex:
    """A loaded FAISS index with the chunk ids of its rows and its manifest."""

    index: faiss.Index
    chunk_ids: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, query_vec: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The `k` nearest chunks to one query vector as (chunk_id, inner product), best first."""
        k = min(int(k), self.ntotal)
        if k <= 0:
            return []
        q = _as_matrix(np.asarray(query_vec, dtype=np.float32).reshape(1, -1))
        if q.shape[1] != self.dim:
            raise ValueError(f"query vector has dimension {q.shape[1]}, index has {self.dim}")
        scores, ids = self.index.search(q, k)
        return [(self.chunk_ids[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]


def write_vector_index(
    store: ObjectStore,
    prefix: str,
    index: faiss.Index,
    chunk_ids: list[str],
    extra: dict[str, Any] | None = None,
) -> str:
    """Write `index` and its chunk ids under `prefix`; returns the manifest's key.

    Each file is written atomically (the store's temp+fsync+rename, or one S3 PUT), read back
    and verified; the manifest goes last.
    """
    prefix = prefix.strip("/")
    if int(index.ntotal) != len(chunk_ids):
        raise ValueError(f"index has {index.ntotal} vectors but {len(chunk_ids)} chunk ids were given")
    index_bytes = faiss.serialize_index(index).tobytes()
    ids_bytes = json.dumps(list(chunk_ids)).encode("utf-8")
    files = {}
    for name, data in ((INDEX_NAME, index_bytes), (IDS_NAME, ids_bytes)):
        key = f"{prefix}/{name}"
        store.put_bytes(key, data)
        digest = _sha256(data)
        if _sha256(store.get_bytes(key)) != digest:
            raise VectorIndexError(f"{key} read back different bytes from what was written to {store.url}")
        files[name] = {"key": key, "sha256": digest, "bytes": len(data)}
    reloaded = faiss.deserialize_index(np.frombuffer(store.get_bytes(files[INDEX_NAME]["key"]), dtype=np.uint8))
    if reloaded.ntotal != index.ntotal:
        raise VectorIndexError(f"{files[INDEX_NAME]['key']} reloads with {reloaded.ntotal} vectors, wrote {index.ntotal}")
    extra = dict(extra or {})
    build_params = dict(extra.pop("build_params", None) or describe_index(index))
    manifest = {
        "format": FORMAT_VERSION,
        "dim": int(index.d),
        "count": int(index.ntotal),
        "index_type": build_params.get("type", type(index).__name__),
        "build_params": build_params,
        "files": files,
        **extra,
    }
    manifest_key = f"{prefix}/{MANIFEST_NAME}"
    store.put_bytes(manifest_key, json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8"))
    return manifest_key


def load_vector_index(store: ObjectStore, manifest_key: str) -> VectorIndex:
    """Load the index a manifest names, verifying every file's sha256 and the vector count."""
    try:
        manifest = json.loads(store.get_bytes(manifest_key))
    except KeyError:
        raise VectorIndexError(
            f"vector index manifest {manifest_key!r} not found in {store.url}: rebuild the index "
            "(materialize vector_index) or roll back to a generation that exists"
        ) from None
    blobs = {}
    for name in (INDEX_NAME, IDS_NAME):
        entry = manifest["files"][name]
        try:
            data = store.get_bytes(entry["key"])
        except KeyError:
            raise VectorIndexError(
                f"{entry['key']} named by {manifest_key} is missing from {store.url}: rebuild the index"
            ) from None
        if _sha256(data) != entry["sha256"]:
            raise VectorIndexError(
                f"{entry['key']} does not match the sha256 in {manifest_key} (corrupt or partial "
                "write): rebuild the index or roll back to the previous generation"
            )
        blobs[name] = data
    index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_NAME], dtype=np.uint8))
    chunk_ids = json.loads(blobs[IDS_NAME])
    if index.ntotal != len(chunk_ids) or index.ntotal != manifest["count"]:
        raise VectorIndexError(
            f"{manifest_key}: index holds {index.ntotal} vectors, {len(chunk_ids)} chunk ids, "
            f"manifest says {manifest['count']}: rebuild the index"
        )
    ef = manifest.get("build_params", {}).get("efSearch")
    if ef and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef)
    return VectorIndex(index=index, chunk_ids=chunk_ids, manifest=manifest)
