"""The full-text index as an immutable Tantivy directory, built once per index generation.

Tantivy (the Rust Lucene) answers a BM25 top-k with block-max WAND: it skips the postings
blocks whose best possible score cannot enter the top k, so a query with everyday words does
not score half the corpus as FTS5 and the SQL of `fts_postgres` do. The directory is plain
files, written once, published beside the FAISS files and memory-mapped by every replica; SQLite
and PostgreSQL deployments search the same files, so their rankings are the same by
construction.

What is indexed (one document per chunk, numbered as `fts_tables.analyzed_rows` numbers rows):

- `text`: the terms of our shared analyzer (`analyzer.analyze`), joined by spaces and split again
  by Tantivy's ``whitespace`` tokenizer, which cannot change them: the paper's title terms
  `FIELD_WEIGHTS["title"]` (3) times, then the abstract terms (first chunk only) and the body
  terms. Repeating the title is how a field weight enters a single-field BM25: the term
  frequency is ``3 * title + abstract + body``, as in FTS5's ``bm25()`` with weights (3, 1, 1),
  with one saturation per term. Three fields with query-time boosts (Tantivy's per-field BM25,
  summed) scored 0.605 nDCG@10 on SciFact train against 0.707 for this layout (both with
  title weight 2; docs/SEARCH.md).
- `rid`: the row id (fast field), mapped to the chunk id by ``chunk_ids.json``.

Differences from `bm25` (the SQL backends' exact FTS5 formula), all inside Tantivy's scorer:
IDF is Lucene's ``ln(1 + (N - n + 0.5) / (n + 0.5))``; the row length counts the title terms
as often as they are repeated; row lengths are stored in one byte (exact up to 40 terms, then
about 1 in 8). Field weights are fixed when the index is built (whole numbers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tantivy
from sqlalchemy.engine import Engine

from research_pipeline.lib.search import bm25
from research_pipeline.lib.search.analyzer import query_terms
from research_pipeline.lib.search.fts_tables import analyzed_rows

logger = logging.getLogger(__name__)

#: Version of what `build_index` writes; an index of another version is refused.
FORMAT = 1
ENGINE = "tantivy"
TEXT = "text"
RID = "rid"
#: Files beside Tantivy's own in the index folder.
IDS_NAME = "chunk_ids.json"
INFO_NAME = "rp_fulltext.json"
#: Field weights of the index (whole numbers: how often a field's terms are written). Title 3
#: was the best on SciFact train and Cranfield together (bm25 mode, docs/SEARCH.md); the SQL
#: backends' FTS5 formula has its best at 2 (`bm25.FIELD_WEIGHTS`).
FIELD_WEIGHTS: dict[str, float] = {"title": 3.0, "abstract": 1.0, "body": 1.0}
#: Memory of the (single-threaded, deterministic) index writer before it writes a segment.
WRITER_HEAP_BYTES = 1_000_000_000


class FulltextIndexError(RuntimeError):
    """A full-text index folder is missing, partial, of another format or unreadable."""


def repeats(weights: Mapping[str, float] | None = None) -> tuple[int, int, int]:
    """How often the title, abstract and body terms are written for `weights` (whole numbers >= 1)."""
    w = {**FIELD_WEIGHTS, **(weights or {})}
    out = []
    for key in bm25.FIELDS:
        value = float(w[key])
        if value < 1 or value != int(value):
            raise ValueError(
                f"the Tantivy index takes whole field weights >= 1 (fixed when it is built), got {key}={value}"
            )
        out.append(int(value))
    return out[0], out[1], out[2]


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    # Frequencies without positions: BM25 needs no more, and the postings stay small.
    builder.add_text_field(TEXT, tokenizer_name="whitespace", index_option="freq")
    builder.add_unsigned_field(RID, fast=True)
    return builder.build()


class IndexBuilder:
    """Writes one index folder from analyzed rows given in row-id order (`add`), then `finish`.

    The index is written in a temporary folder beside `path` and renamed into place by
    `finish`, so `path` holds either a complete index or nothing (`abort` removes the
    temporary folder). One writer thread: the same rows give the same documents in the same order.
    """

    def __init__(self, path: Path | str, weights: Mapping[str, float] | None = None):
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists: a full-text index folder is written once")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repeats = repeats(weights)
        self._started = time.perf_counter()
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._writer = tantivy.Index(_schema(), str(self._tmp), reuse=False).writer(WRITER_HEAP_BYTES, 1)
        self.chunk_ids: list[str] = []
        self.tokens = 0

    def add(self, rid: int, chunk_id: str, fields: list[list[str]]) -> None:
        """Index row `rid` (rows are numbered 1, 2, ... as `fts_tables.analyzed_rows` numbers them)."""
        if rid != len(self.chunk_ids) + 1:
            raise ValueError(f"rows must come in row-id order: got {rid} after {len(self.chunk_ids)}")
        rt, ra, rb = self._repeats
        title, abstract, body = fields
        terms = title * rt + abstract * ra + body * rb
        self.chunk_ids.append(chunk_id)
        self.tokens += len(terms)
        doc = tantivy.Document()
        doc.add_unsigned(RID, rid)
        doc.add_text(TEXT, " ".join(terms))
        self._writer.add_document(doc)

    def finish(self) -> dict[str, Any]:
        """Commit, write the chunk ids and info, move the folder into place; returns the info."""
        try:
            self._writer.commit()
            self._writer.wait_merging_threads()
            (self._tmp / IDS_NAME).write_text(json.dumps(self.chunk_ids), "utf-8")
            info = {
                "engine": ENGINE,
                "format": FORMAT,
                "tantivy": tantivy.__version__,
                "rows": len(self.chunk_ids),
                "tokens": self.tokens,
                "weights": dict(zip(bm25.FIELDS, (float(r) for r in self._repeats))),
                "seconds": round(time.perf_counter() - self._started, 3),
            }
            (self._tmp / INFO_NAME).write_text(json.dumps(info, sort_keys=True), "utf-8")
            os.rename(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        info["bytes"] = folder_bytes(self.path)
        logger.info(
            "full-text index %s: %d rows, %.1f MiB (%.1fs)", self.path, info["rows"], info["bytes"] / 2**20, info["seconds"]
        )
        return info

    def abort(self) -> None:
        """Remove the unfinished index (nothing was put at `path`)."""
        shutil.rmtree(self._tmp, ignore_errors=True)


def build_index(engine: Engine, path: Path | str, weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Build the index of the current chunks into the new folder `path` alone; returns its info.

    (A generation's build feeds the same rows to its SQL table and this index in one pass:
    `release.fulltext.build_fts_and_publish`.)
    """
    builder = IndexBuilder(path, weights)
    try:
        with engine.connect() as conn:
            for rid, chunk_id, fields in analyzed_rows(conn):
                builder.add(rid, chunk_id, fields)
    except BaseException:
        builder.abort()
        raise
    return builder.finish()


def folder_bytes(path: Path | str) -> int:
    """Total size of the files directly in `path`."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


class FulltextIndex:
    """An opened (memory-mapped) full-text index folder; safe to search from many threads."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.info = json.loads((self.path / INFO_NAME).read_text("utf-8"))
            self.chunk_ids: list[str] = json.loads((self.path / IDS_NAME).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise FulltextIndexError(f"{self.path} is not a complete full-text index: {exc}") from exc
        if self.info.get("engine") != ENGINE or self.info.get("format") != FORMAT:
            raise FulltextIndexError(
                f"{self.path} holds a {self.info.get('engine')} index of format {self.info.get('format')}; "
                f"this version reads {ENGINE} format {FORMAT}: rebuild the generation (reindex_job)"
            )
        try:
            self._index = tantivy.Index.open(str(self.path))
        except (OSError, ValueError) as exc:
            raise FulltextIndexError(f"{self.path}: Tantivy cannot open the index: {exc}") from exc
        self._schema = self._index.schema
        self._searcher = self._index.searcher()
        if self._searcher.num_docs != len(self.chunk_ids):
            raise FulltextIndexError(
                f"{self.path}: {self._searcher.num_docs} documents but {len(self.chunk_ids)} chunk ids: rebuild it"
            )
        self.weights: dict[str, float] = {k: float(v) for k, v in self.info["weights"].items()}

    @property
    def rows(self) -> int:
        return len(self.chunk_ids)

    def accepts(self, weights: Mapping[str, float] | None) -> bool:
        """Whether a search with field `weights` (None: the index's own) can run on this index."""
        if weights is None:
            return True
        wanted = {**bm25.FIELD_WEIGHTS, **weights}
        return all(float(wanted[k]) == self.weights[k] for k in bm25.FIELDS)

    def search(self, query: str, k: int = 100) -> list[tuple[str, float]]:
        """The `k` best chunks for `query` as (chunk_id, score), higher is better.

        An OR of the query's analyzed terms (BM25's bag of words), top-k by block-max WAND;
        `bm25.TIE_MARGIN` extra hits are read so that ties at the cut go to the lower row id,
        scores rounded as `bm25.top` does. Never raises on user text.
        """
        terms = query_terms(query)
        k = int(k)
        if not terms or k <= 0:
            return []
        clauses = [(tantivy.Occur.Should, tantivy.Query.term_query(self._schema, TEXT, t)) for t in terms]
        # count=False: counting every match would turn the pruning off.
        hits = self._searcher.search(tantivy.Query.boolean_query(clauses), k + bm25.TIE_MARGIN, count=False).hits
        if not hits:
            return []
        rids = self._searcher.fast_field_values(RID, [address for _, address in hits])
        return bm25.top([(self.chunk_ids[rid - 1], rid, score) for (score, _), rid in zip(hits, rids)], k)

