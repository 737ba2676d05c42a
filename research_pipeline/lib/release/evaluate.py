"""BEIR-style retrieval evaluation that runs a test collection through the real pipeline.

The corpus (corpus.jsonl) is ingested, chunked, embedded and indexed by the same library code
as papers (`ingest`, `chunk_documents`, `embed_missing`, `build_fts`, `build_vector_index`,
`Searcher`), into a SQLite database and object store under `work_dir` (default
``$RP_HOME/eval/<collection>``). Every step is idempotent and the indexes are kept with a
fingerprint of the chunks they cover, so a second run only queries.

Results are per paper: each hit's doc_id maps back to the collection's ``_id``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline.lib.core.util import sha256_file
from research_pipeline.lib.embed.vectors import (
    VectorIndex,
    build_vector_index,
    load_vector_index,
    write_vector_index,
)
from research_pipeline.lib.release.ir_metrics import (
    mrr_at_k,
    ndcg_at_k,
    percentile,
    recall_at_k,
)
from research_pipeline.lib.search import fts_tantivy
from research_pipeline.lib.search.fts import INDEX_FORMAT, build_fts
from research_pipeline.lib.search.searcher import MODES, Searcher

logger = logging.getLogger(__name__)

FTS_TABLE = "fts_eval"
#: Papers retrieved per query: enough for recall@100.
DEPTH = 100


def load_queries(beir_dir: Path, split: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The query texts and the judgments {query id: {corpus id: grade}} of one split."""
    qrels_path = beir_dir / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise FileNotFoundError(f"{qrels_path} not found: {beir_dir} has no '{split}' split (look in {beir_dir / 'qrels'})")
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0] == "query-id":
                continue
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries: dict[str, str] = {}
    with open(beir_dir / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                if str(rec["_id"]) in qrels:
                    queries[str(rec["_id"])] = rec["text"]
    missing = set(qrels) - set(queries)
    if missing:
        raise ValueError(f"{len(missing)} judged queries of {qrels_path} are not in queries.jsonl, e.g. {min(missing)}")
    return queries, qrels


@dataclass
class EvalIndex:
    """A collection ingested and indexed under a work dir, ready to query."""

    engine: Engine
    fts_table: str
    vectors: VectorIndex | None
    corpus_id: dict[str, str]  # doc_id -> the collection's _id
    documents: int
    chunks: int
    fulltext: Any = None  # the Tantivy index (search.fts_tantivy) of the same chunks


def _ingest_corpus(engine: Engine, beir_dir: Path) -> None:
    from research_pipeline.lib.ingest.pipeline import ingest
    from research_pipeline.lib.ingest.sources import sources_for

    ingest(engine, sources_for(beir_dir))


def _chunk(engine: Engine, embedder: Any) -> None:
    from research_pipeline.lib.ingest.chunking import chunk_documents

    chunk_documents(engine, embedder.count_tokens, max_tokens=embedder.max_seq_length)


def _embed(engine: Engine, embedder: Any) -> None:
    from research_pipeline.lib.embed.embeddings import embed_missing

    embed_missing(engine, embedder)


def _load_embeddings(engine: Engine, model_id: str, hashes: list[str]) -> np.ndarray:
    from research_pipeline.lib.embed.embeddings import load_embeddings

    return load_embeddings(engine, model_id, hashes)


def _corpus_ids(engine: Engine) -> dict[str, str]:
    """doc_id -> collection _id, from the record metadata ingest keeps in documents.extra."""
    out: dict[str, str] = {}
    with engine.connect() as conn:
        for doc_id, extra in conn.execute(sa.select(store.documents.c.doc_id, store.documents.c.extra)):
            meta = json.loads(extra) if extra else {}
            rid = meta.get("record_id")
            if rid is not None:
                out[doc_id] = str(rid)
    return out


def _default_embedder() -> Any:
    from research_pipeline.config import Settings
    from research_pipeline.lib.embed.model import load_embedder

    settings = Settings.from_env()
    return load_embedder(settings.model, settings.device)


def _fingerprint(chunk_ids: list[str], salt: str) -> str:
    return util.sha256_hex(salt + "\n" + "\n".join(sorted(chunk_ids)))


def prepare(
    beir_dir: Path | str,
    work_dir: Path | str | None = None,
    embedder: Any = None,
    need_vectors: bool = True,
) -> EvalIndex:
    """Ingest, chunk, embed (when `need_vectors`) and index a BEIR collection under `work_dir`."""
    beir_dir = Path(beir_dir)
    corpus = beir_dir / "corpus.jsonl"
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus} not found: a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/")
    if work_dir is None:
        from research_pipeline.config import Settings

        work_dir = Settings.from_env().home / "eval" / beir_dir.resolve().name
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if embedder is None:
        embedder = _default_embedder()

    engine = store.make_engine(f"sqlite:///{work_dir / 'eval.db'}")
    store.create_schema(engine)
    state_path = work_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}

    def save_state() -> None:
        store_dir = LocalObjectStore(work_dir)
        store_dir.put_bytes("state.json", json.dumps(state, indent=1, sort_keys=True).encode())

    corpus_sha = sha256_file(corpus)
    if state.get("corpus_sha256") != corpus_sha:
        started = time.perf_counter()
        _ingest_corpus(engine, beir_dir)
        state["corpus_sha256"] = corpus_sha
        save_state()
        logger.info("%s: ingested in %.1fs", beir_dir.name, time.perf_counter() - started)
    _chunk(engine, embedder)

    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(store.chunks.c.chunk_id, store.chunks.c.content_hash).order_by(store.chunks.c.chunk_id)
        ).all()
        n_docs = conn.execute(sa.select(sa.func.count()).select_from(store.documents)).scalar_one()
    chunk_ids = [r[0] for r in rows]
    hashes = [r[1] for r in rows]

    fts_fp = _fingerprint(chunk_ids, f"fts{INDEX_FORMAT}")
    if state.get("fts") != fts_fp or not _table_exists(engine, FTS_TABLE):
        build_fts(engine, FTS_TABLE)
        state["fts"] = fts_fp
        save_state()

    # The generation's full-text engine (search/fts_tantivy), keyed on its format and field weights.
    ft_salt = f"tantivy{fts_tantivy.FORMAT}{sorted(fts_tantivy.FIELD_WEIGHTS.items())}"
    fulltext = work_dir / "fulltext" / _fingerprint(chunk_ids, ft_salt)[:16]
    if not fulltext.is_dir():
        fts_tantivy.build_index(engine, fulltext)

    vectors = None
    if need_vectors:
        objects = LocalObjectStore(work_dir / "objects")
        vec_fp = _fingerprint(chunk_ids, embedder.model_id)
        prefix = f"vectors/{vec_fp[:16]}"
        key = f"{prefix}/manifest.json"
        if not objects.exists(key):
            _embed(engine, embedder)
            unique = list(dict.fromkeys(hashes))
            table = _load_embeddings(engine, embedder.model_id, unique) if unique else np.zeros((0, embedder.dim), np.float32)
            row_of = {h: i for i, h in enumerate(unique)}
            matrix = table[[row_of[h] for h in hashes]] if hashes else table
            index, params = build_vector_index(matrix)
            key = write_vector_index(objects, prefix, index, chunk_ids, {"model": embedder.model_id, "build_params": params})
        vectors = load_vector_index(objects, key)

    return EvalIndex(
        engine=engine,
        fts_table=FTS_TABLE,
        vectors=vectors,
        corpus_id=_corpus_ids(engine),
        documents=int(n_docs),
        chunks=len(chunk_ids),
        fulltext=fts_tantivy.FulltextIndex(fulltext),
    )


def _table_exists(engine: Engine, table: str) -> bool:
    return sa.inspect(engine).has_table(table)


def run_queries(
    index: EvalIndex,
    searcher: Searcher,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    mode: str,
) -> dict[str, Any]:
    """Search every judged query and average nDCG@10, recall@100 and MRR@10; latency per query."""
    if queries:
        searcher.search(next(iter(queries.values())), k=DEPTH, mode=mode)  # warm caches, untimed
    ndcg, recall, mrr, latency = [], [], [], []
    for qid, text in queries.items():
        started = time.perf_counter()
        hits = searcher.search(text, k=DEPTH, mode=mode)
        latency.append((time.perf_counter() - started) * 1000.0)
        ranked = [index.corpus_id.get(h.doc_id, h.doc_id) for h in hits]
        judged = qrels[qid]
        ndcg.append(ndcg_at_k(ranked, judged, 10))
        recall.append(recall_at_k(ranked, judged, 100))
        mrr.append(mrr_at_k(ranked, judged, 10))
    n = len(ndcg)
    return {
        "ndcg@10": round(sum(ndcg) / n, 4) if n else 0.0,
        "recall@100": round(sum(recall) / n, 4) if n else 0.0,
        "mrr@10": round(sum(mrr) / n, 4) if n else 0.0,
        "queries": n,
        "latency_ms_p50": round(percentile(latency, 50), 2),
        "latency_ms_p95": round(percentile(latency, 95), 2),
    }


def evaluate(
    beir_dir: Path | str,
    split: str = "test",
    mode: str = "hybrid",
    work_dir: Path | str | None = None,
    embedder: Any = None,
    fulltext_engine: str = "tantivy",
    **tuning: Any,
) -> dict[str, Any]:
    """nDCG@10, recall@100, MRR@10 and latency p50/p95 of `mode` on one split of a BEIR folder.

    `tuning` overrides the Searcher's fusion parameters (see lib/search/searcher.py);
    `fulltext_engine` "sql" searches the SQL full-text table instead of the Tantivy index.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    beir_dir = Path(beir_dir)
    queries, qrels = load_queries(beir_dir, split)
    need_vectors = mode != "bm25"
    if embedder is None:
        embedder = _default_embedder()
    index = prepare(beir_dir, work_dir, embedder, need_vectors)
    fulltext = index.fulltext if fulltext_engine == "tantivy" else None
    searcher = Searcher(
        index.engine, index.fts_table, index.vectors, embedder if need_vectors else None, fulltext=fulltext, **tuning
    )
    result = run_queries(index, searcher, queries, qrels, mode)
    result.update(
        {"dataset": beir_dir.resolve().name, "split": split, "mode": mode, "fulltext": searcher.fulltext_engine,
         "documents": index.documents, "chunks": index.chunks}
    )
    index.engine.dispose()
    return result


class _SweepSearcher(Searcher):
    """A Searcher whose candidate lists are shared across a sweep of fusion parameters.

    The BM25 and dense candidates of a query depend only on the query, the depth and the field
    weights, so a sweep over fusion settings computes them once.
    """

    def __init__(self, *args: Any, candidates: dict, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._candidates = candidates

    def _bm25(self, query: str, depth: int) -> list[tuple[str, float]]:
        key = ("bm25", query, depth, json.dumps(self.tuning["field_weights"], sort_keys=True))
        if key not in self._candidates:
            self._candidates[key] = super()._bm25(query, depth)
        return self._candidates[key]

    def _dense(self, query: str, depth: int) -> list[tuple[str, float]]:
        key = ("dense", query, depth)
        if key not in self._candidates:
            self._candidates[key] = super()._dense(query, depth)
        return self._candidates[key]


def tune(
    beir_dir: Path | str,
    grid: list[dict[str, Any]],
    split: str = "train",
    work_dir: Path | str | None = None,
    embedder: Any = None,
) -> list[dict[str, Any]]:
    """Evaluate hybrid search for every tuning dict of `grid` on `split` (never tune on test).

    Returns one result per grid entry ({"params", "ndcg@10", "recall@100", "mrr@10"}), best
    first. Candidate lists are computed once for the whole sweep, so latencies are not
    comparable with `evaluate`'s.
    """
    beir_dir = Path(beir_dir)
    if split == "test":
        raise ValueError("tune on a train or dev split: test figures must stay unseen")
    queries, qrels = load_queries(beir_dir, split)
    embedder = embedder or _default_embedder()
    need_vectors = any(p.get("mode", "hybrid") != "bm25" for p in grid)
    index = prepare(beir_dir, work_dir, embedder, need_vectors)
    candidates: dict = {}
    results = []
    for params in grid:
        mode = params.get("mode", "hybrid")
        tuning = {k: v for k, v in params.items() if k != "mode"}
        searcher = _SweepSearcher(
            index.engine, index.fts_table, index.vectors, embedder, fulltext=index.fulltext, candidates=candidates, **tuning
        )
        metrics = run_queries(index, searcher, queries, qrels, mode)
        row = {"params": params, **{k: metrics[k] for k in ("ndcg@10", "recall@100", "mrr@10")}}
        logger.info("%s", json.dumps(row, sort_keys=True))
        results.append(row)
    index.engine.dispose()
    return sorted(results, key=lambda r: -r["ndcg@10"])
