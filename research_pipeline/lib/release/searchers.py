"""Opening a Searcher on an index generation, with a per-process cache of loaded vector indexes.

A Searcher holds its generation's table name and loaded vectors, so a search that started on
it finishes on it even if another generation is published meanwhile. A generation's files
never change, so a process loads each vector index once however many Searchers it opens;
retention forgets an index when it drops its files (`forget_vectors`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store
from research_pipeline.lib.release import registry
from research_pipeline.lib.release.registry import GenerationError
from research_pipeline.lib.release.registry import GenerationStatus as S

# Loaded vector indexes by (store url, manifest key).
_VECTORS: OrderedDict[tuple[str, str], Any] = OrderedDict()
_VECTORS_LOCK = threading.Lock()
_VECTORS_MAX = 4


def forget_vectors(key: str | None) -> None:
    """Drop the cached vector index of manifest key `key` (its files are being deleted)."""
    with _VECTORS_LOCK:
        for k in [k for k in _VECTORS if k[1] == key]:
            del _VECTORS[k]


def load_vectors(object_store: Any, key: str) -> Any:
    """The loaded VectorIndex of a manifest key (cached per process)."""
    from research_pipeline.lib.embed import vectors

    ident = (getattr(object_store, "url", str(id(object_store))), key)
    with _VECTORS_LOCK:
        if ident in _VECTORS:
            _VECTORS.move_to_end(ident)
            return _VECTORS[ident]
    index = vectors.load_vector_index(object_store, key)
    with _VECTORS_LOCK:
        _VECTORS[ident] = index
        while len(_VECTORS) > _VECTORS_MAX:
            _VECTORS.popitem(last=False)
    return index


def open_searcher(engine: Engine, object_store: Any, embedder: Any, gen_id: str | None = None, **tuning: Any) -> Any:
    """A Searcher over generation `gen_id` (the live one by default); it has `.gen_id` and `.generation`."""
    from research_pipeline.lib.search.searcher import Searcher

    if gen_id is None:
        live = store.live_generation(engine)
        if live is None:
            raise GenerationError(
                "no index generation is live yet: run reindex_job (or `research-pipeline demo`) to build and publish one"
            )
        gen = registry.record(live)
    else:
        gen = registry.get_generation(engine, gen_id)
    if gen["status"] not in (S.PUBLISHED, S.CANDIDATE) or not gen["fts_table"] or not gen["vector_key"]:
        raise GenerationError(
            f"index generation {gen['gen_id']} is {gen['status']} and cannot be searched; "
            "use a published or candidate generation (`research-pipeline index list`)"
        )
    if gen["model_id"] != embedder.model_id:
        raise GenerationError(
            f"index generation {gen['gen_id']} was built with {gen['model_id']} but the embedder is "
            f"{embedder.model_id}; set RP_MODEL to match or run reindex_job"
        )
    searcher = Searcher(engine, gen["fts_table"], load_vectors(object_store, gen["vector_key"]), embedder, **tuning)
    searcher.gen_id = gen["gen_id"]
    searcher.generation = gen
    return searcher
