"""Opening a Searcher on an index generation, with a per-process cache of loaded indexes.

A Searcher holds its generation's table name, loaded vectors and full-text index, so a search
that started on it finishes on it even if another generation is published meanwhile. A
generation's files never change, so a process loads each index once however many Searchers it
opens; retention forgets them when it drops their files (`forget_vectors`).

The full-text list comes from the generation's Tantivy index (`release.fulltext`) where one was
published, fetched into a local cache folder (`cache_dir`, by default `DEFAULT_CACHE_DIR`) and
memory-mapped; a generation built before that is searched through its SQL table.
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store
from research_pipeline.lib.release import registry
from research_pipeline.lib.release.registry import GenerationError
from research_pipeline.lib.release.registry import GenerationStatus as S
from research_pipeline.lib.search.fts_tables import aux_tables

# Loaded vector indexes by (store url, manifest key).
_VECTORS: OrderedDict[tuple[str, str], Any] = OrderedDict()
_VECTORS_LOCK = threading.Lock()
_VECTORS_MAX = 4
# Opened full-text indexes by (store url, manifest key); their local folders.
_FULLTEXT: OrderedDict[tuple[str, str], Any] = OrderedDict()

#: Where replicas keep their copies of published full-text indexes.
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "rp-fulltext-cache"


def forget_vectors(key: str | None) -> None:
    """Drop the cached indexes of the generation whose vector manifest key is `key` (its files
    are being deleted): the vector index and the full-text index published beside it."""
    gen_prefix = key.rsplit("/", 1)[0] + "/" if key else None
    with _VECTORS_LOCK:
        for k in [k for k in _VECTORS if k[1] == key]:
            del _VECTORS[k]
        for k in [k for k in _FULLTEXT if gen_prefix and k[1].startswith(gen_prefix)]:
            del _FULLTEXT[k]


def load_fulltext(object_store: Any, key: str, cache_dir: Path | str | None = None) -> Any:
    """The opened full-text index of manifest `key`: fetched once into `cache_dir`, cached per process."""
    from research_pipeline.lib.release import fulltext
    from research_pipeline.lib.search.fts_tantivy import FulltextIndex

    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    ident = (getattr(object_store, "url", str(id(object_store))), key)
    with _VECTORS_LOCK:
        if ident in _FULLTEXT:
            _FULLTEXT.move_to_end(ident)
            return _FULLTEXT[ident]
    index = FulltextIndex(fulltext.fetch(object_store, key, cache_dir))
    with _VECTORS_LOCK:
        _FULLTEXT[ident] = index
        while len(_FULLTEXT) > _VECTORS_MAX:
            _FULLTEXT.popitem(last=False)
        in_use = {i.path for i in _FULLTEXT.values()}
    fulltext.prune_cache(cache_dir, in_use)
    return index


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


def open_searcher(
    engine: Engine,
    object_store: Any,
    embedder: Any,
    gen_id: str | None = None,
    cache_dir: Path | str | None = None,
    **tuning: Any,
) -> Any:
    """A Searcher over generation `gen_id` (the live one by default); it has `.gen_id` and `.generation`.

    Its full-text list comes from the generation's published Tantivy index where there is one
    (`.fulltext_engine` says which: "tantivy" or the SQL dialect).
    """
    from research_pipeline.lib.release import fulltext
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
    # A rejected generation keeps its files until retention drops them: its gates can re-run on it.
    if gen["status"] not in (S.PUBLISHED, *registry.JUDGEABLE) or not gen["fts_table"] or not gen["vector_key"]:
        raise GenerationError(
            f"index generation {gen['gen_id']} is {gen['status']} and cannot be searched; "
            "use a published, candidate or rejected generation (`research-pipeline index list`)"
        )
    if gen["model_id"] != embedder.model_id:
        raise GenerationError(
            f"index generation {gen['gen_id']} was built with {gen['model_id']} but the embedder is "
            f"{embedder.model_id}; set RP_MODEL to match or run reindex_job"
        )
    ft_key = fulltext.manifest_key(gen["gen_id"])
    ft_index = load_fulltext(object_store, ft_key, cache_dir) if object_store.exists(ft_key) else None
    if ft_index is not None:
        # The SQL table is the other half of the same full-text build (gates count it, it answers
        # query-time field weights): a generation without it is damaged, not half-searchable.
        meta = aux_tables(gen["fts_table"])["meta"]
        if not sa.inspect(engine).has_table(meta):
            raise LookupError(
                f"full-text table {gen['fts_table']!r} of generation {gen['gen_id']} is missing (no {meta!r}): "
                "rebuild the generation (reindex_job) or roll back to one that exists"
            )
    searcher = Searcher(
        engine, gen["fts_table"], load_vectors(object_store, gen["vector_key"]), embedder, fulltext=ft_index, **tuning
    )
    searcher.gen_id = gen["gen_id"]
    searcher.generation = gen
    return searcher
