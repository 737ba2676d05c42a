"""Ingestion: sources -> parsed documents or quarantine rows, idempotent and crash-safe.

Identity is content: a PDF's doc_id is the sha256 of its bytes, a record's the sha256 of its
canonical JSON. Parsed documents are written with their source rows in transactions of whole
documents, at most `DOC_BATCH_S` after their workers finish, so a killed ingest loses only
in-flight files and the results of that last moment, and a re-run picks up where it stopped.
Inputs whose (uri, size, mtime) match a recorded source, and quarantined files whose bytes
have not changed, are skipped without parsing.

Text from the inputs (document text, metadata, uris, messages) is stored through
`pg_safe_text`, so no file or record can hold a character that stops a write or a migration.
After a complete listing of an inbox, what it no longer holds is marked gone and every
document's retirement is recomputed (`lifecycle`), so new generations follow the inbox.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util
from research_pipeline.lib.core.util import pg_safe_text, sha256_file
from research_pipeline.lib.ingest import lifecycle
from research_pipeline.lib.ingest.metadata import record_metadata
from research_pipeline.lib.ingest.pdf import (
    PARSER,
    PARSER_VERSION,
    REASONS,
    ParseResult,
)
from research_pipeline.lib.ingest.sandbox import ParsePool
from research_pipeline.lib.ingest.sources import SourceItem, iter_items, record_bytes

#: JSONL records are committed in batches of this many rows (they need no parsing).
RECORD_BATCH = 500
#: Parsed documents are committed together, at most this many seconds after the first of them
#: arrived (or when DOC_BATCH have): a transaction per document costs the parent, which shares
#: the cores with the parse workers, more CPU than the statements themselves.
DOC_BATCH_S = 0.25
DOC_BATCH = 64

logger = logging.getLogger(__name__)



@dataclass
class IngestReport:
    """What one ingest run did."""

    documents_new: int = 0  # documents inserted by this run
    documents_unchanged: int = 0  # inputs that were already a known document (skipped or same bytes)
    sources_recorded: int = 0  # document_sources rows written (new names, moved or changed files)
    pages: int = 0  # pages of the new documents
    ocr_pages: int = 0  # of which read by OCR
    seconds: float = 0.0
    pages_per_s: float = 0.0
    quarantined: dict[str, int] = field(default_factory=dict)  # reason -> files quarantined by this run
    released: int = 0  # files that left quarantine because their new bytes became a document
    sources_gone: int = 0  # recorded files a complete listing no longer found
    retired: int = 0  # documents this run took out of new generations (gone, removed, retracted)
    restored: int = 0  # retired documents that are live again (a file put back)
    live_documents: int = 0  # documents new generations hold after this run

    def as_metadata(self) -> dict[str, int | float]:
        """Plain numbers for Dagster metadata and `status --json`."""
        out: dict[str, int | float] = {
            "documents_new": self.documents_new,
            "documents_unchanged": self.documents_unchanged,
            "sources_recorded": self.sources_recorded,
            "pages": self.pages,
            "ocr_pages": self.ocr_pages,
            "seconds": round(self.seconds, 3),
            "pages_per_s": round(self.pages_per_s, 2),
            "quarantined": sum(self.quarantined.values()),
            "released": self.released,
            "sources_gone": self.sources_gone,
            "retired": self.retired,
            "restored": self.restored,
            "live_documents": self.live_documents,
        }
        for reason in REASONS:
            out[f"quarantined_{reason}"] = self.quarantined.get(reason, 0)
        return out


def _safe(value: Any) -> Any:
    return pg_safe_text(value) if isinstance(value, str) else value


def _year(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


def _document_row(doc_id: str, kind: str, result: ParseResult | None, meta: dict[str, Any],
                  text: str, offsets: list[int], parser: str, parser_version: str,
                  extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "doc_id": doc_id,
        "shard": store.shard_of(doc_id),
        "source_kind": kind,
        "title": _safe(meta.get("title")),
        "authors": pg_safe_text(store.dumps(meta.get("authors") or [])),
        "year": _year(meta.get("year")),
        "abstract": _safe(meta.get("abstract")),
        "doi": _safe(meta.get("doi")),
        "arxiv_id": _safe(meta.get("arxiv_id")),
        "language": _safe(meta.get("language")),
        "page_count": result.page_count if result else 1,
        # One character for one: page offsets stay valid.
        "text": pg_safe_text(text),
        "page_offsets": store.dumps(offsets),
        "parser": parser,
        "parser_version": parser_version,
        "quality": result.quality if result else 1.0,
        "garbled_ratio": result.garbled_ratio if result else 0.0,
        "empty_pages": result.empty_pages if result else 0,
        "ocr_pages": result.ocr_pages if result else 0,
        "extra": pg_safe_text(store.dumps(extra)),
        "ingested_at": util.utcnow(),
    }


# Built once: this runs for every new file, and building the statement costs more than running it.
_DOCUMENT_EXISTS = sa.select(store.documents.c.doc_id).where(store.documents.c.doc_id == sa.bindparam("doc_id"))

#: A document row to write (None: only its sources, of a known document) and its source items.
_Pending = tuple[dict[str, Any] | None, list[SourceItem]]


class _Writer:
    """Writes outcomes to the store and keeps the report."""

    def __init__(self, engine: Engine, report: IngestReport):
        self.engine = engine
        self.report = report

    def source_row(self, item: SourceItem, doc_id: str) -> dict[str, Any]:
        return {"uri": item.uri, "doc_id": doc_id, "size": item.size, "mtime": item.mtime,
                "seen_at": util.utcnow(), "gone_at": None}

    def document(self, conn: sa.Connection, row: dict[str, Any] | None, items: list[SourceItem]) -> None:
        """Insert a document (if new) and its sources; a source leaving quarantine is released."""
        self.documents(conn, [(row, items)])

    def documents(self, conn: sa.Connection, batch: list[_Pending]) -> None:
        """`document` for several documents, with one statement of each kind."""
        rows = [row for row, _ in batch if row is not None]
        if rows:
            ids = [r["doc_id"] for r in rows]
            existing = set(conn.execute(
                sa.select(store.documents.c.doc_id).where(store.documents.c.doc_id.in_(ids))
            ).scalars())
            new_rows: dict[str, dict[str, Any]] = {}
            for row in rows:
                if row["doc_id"] in existing or row["doc_id"] in new_rows:
                    self.report.documents_unchanged += 1
                else:
                    new_rows[row["doc_id"]] = row
                    self.report.documents_new += 1
                    self.report.pages += row["page_count"]
                    self.report.ocr_pages += row["ocr_pages"]
            store.upsert(conn, store.documents, list(new_rows.values()), ["doc_id"], update=())
        # One row per uri, the last one written winning as it would in separate statements.
        sources: dict[str, dict[str, Any]] = {}
        for row, items in batch:
            for it in items:
                sources[it.uri] = self.source_row(it, row["doc_id"] if row else it.doc_id)
                self.report.sources_recorded += 1
        store.upsert(conn, store.document_sources, list(sources.values()), ["uri"])
        released = conn.execute(
            sa.delete(store.quarantine).where(store.quarantine.c.uri.in_(list(sources)))
        ).rowcount
        self.report.released += max(0, released or 0)

    def quarantine(self, conn: sa.Connection, item: SourceItem, reason: str, message: str,
                   content_hash: str | None) -> None:
        assert reason in REASONS, reason
        store.upsert(conn, store.quarantine, [{
            "uri": item.uri, "content_hash": content_hash, "reason": reason, "message": pg_safe_text(message),
            "size": item.size, "quarantined_at": util.utcnow(),
        }], ["uri"])
        # The uri no longer holds that document; the document itself stays (other sources, history).
        conn.execute(sa.delete(store.document_sources).where(store.document_sources.c.uri == item.uri))
        self.report.quarantined[reason] = self.report.quarantined.get(reason, 0) + 1


def _known(engine: Engine) -> tuple[dict[str, tuple[Any, Any, str, bool]], dict[str, tuple[Any, str | None, str]]]:
    """(uri -> (size, mtime, doc_id, gone)) of sources and (uri -> (size, content_hash, reason)) of quarantine."""
    s = store.document_sources
    with engine.connect() as conn:
        sources = {
            r.uri: (r.size, r.mtime, r.doc_id, r.gone_at is not None)
            for r in conn.execute(sa.select(s.c.uri, s.c.size, s.c.mtime, s.c.doc_id, s.c.gone_at))
        }
        quarantined = {
            r.uri: (r.size, r.content_hash, r.reason)
            for r in conn.execute(sa.select(store.quarantine.c.uri, store.quarantine.c.size,
                                            store.quarantine.c.content_hash, store.quarantine.c.reason))
        }
    return sources, quarantined


def _same_mtime(a: Any, b: Any) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) < 1e-3


def ingest(
    engine: Engine,
    sources: Iterable[Any],
    workers: int = 2,
    timeout_s: float = 60,
    memory_mb: int = 2048,
    ocr: bool = True,
    log_every: int = 25,
    retracted_file: str | os.PathLike | None = None,
) -> IngestReport:
    """Ingest every item of `sources` into `engine`'s store and report what happened.

    PDFs are parsed by `workers` child processes (each file bounded by `timeout_s` without
    progress and `memory_mb` of address space); records are written directly. Safe to re-run
    and to resume after a crash: a re-run with no changed inputs writes nothing new.

    Then the lifecycle: sources a complete listing (FolderSource without `paths`, JsonlSource)
    no longer holds are marked gone, and documents are retired or restored
    (`lifecycle.refresh`, with `retracted_file` the list of retracted DOIs/arXiv ids/doc_ids;
    None keeps the retractions recorded before).
    """
    sources = list(sources)
    started = time.monotonic()
    report = IngestReport()
    writer = _Writer(engine, report)
    known_sources, known_quarantine = _known(engine)
    seen = 0
    # Every uri the sources listed (a complete listing marks the rest gone), and the unchanged
    # ones that had been marked gone (a file put back as it was).
    listed: set[str] = set()
    back: list[str] = []

    # Parsed-PDF bookkeeping: doc_id -> the items (names) waiting on that parse, so the same
    # bytes under two names are parsed once.
    waiting: dict[str, list[SourceItem]] = {}
    record_rows: list[tuple[dict[str, Any], SourceItem]] = []
    # Parsed documents not committed yet, the doc_ids among them, and when the first arrived.
    doc_rows: list[_Pending] = []
    doc_ids: set[str] = set()
    docs_since = 0.0

    def flush_documents() -> None:
        if not doc_rows:
            return
        with engine.begin() as conn:
            writer.documents(conn, doc_rows)
        doc_rows.clear()
        doc_ids.clear()

    def before_wait() -> float | None:
        """Commit the held documents when they are due; else how long until they are."""
        if not doc_rows:
            return None
        due_in = docs_since + DOC_BATCH_S - time.monotonic()
        if due_in > 0:
            return due_in
        flush_documents()
        return None

    def flush_records() -> None:
        # Every write goes to the store in the order the inputs came: held documents first.
        flush_documents()
        if not record_rows:
            return
        with engine.begin() as conn:
            ids = [row["doc_id"] for row, _ in record_rows]
            existing = set(conn.execute(
                sa.select(store.documents.c.doc_id).where(store.documents.c.doc_id.in_(ids))
            ).scalars())
            new_rows, seen_ids = [], set()
            for row, _ in record_rows:
                if row["doc_id"] in existing or row["doc_id"] in seen_ids:
                    report.documents_unchanged += 1
                else:
                    new_rows.append(row)
                    seen_ids.add(row["doc_id"])
            store.upsert(conn, store.documents, new_rows, ["doc_id"], update=())
            report.documents_new += len(new_rows)
            report.pages += len(new_rows)
            # A repeated _id within a batch: the last record wins, as it would across batches.
            by_uri = {item.uri: writer.source_row(item, row["doc_id"]) for row, item in record_rows}
            src = list(by_uri.values())
            store.upsert(conn, store.document_sources, src, ["uri"])
            report.sources_recorded += len(src)
            uris = [item.uri for _, item in record_rows]
            if any(u in known_quarantine for u in uris):
                released = conn.execute(sa.delete(store.quarantine).where(store.quarantine.c.uri.in_(uris))).rowcount
                report.released += max(0, released or 0)
        record_rows.clear()

    def pdf_jobs() -> Iterator[tuple[str, str]]:
        """Walk the sources; handle what needs no parsing inline, yield (doc_id, path) to parse."""
        nonlocal seen
        for item in iter_items(sources):
            seen += 1
            listed.add(item.uri)
            if seen % log_every == 0:
                logger.info("ingest: %d inputs seen, %d new documents, %d quarantined, %d pages", seen,
                            report.documents_new, sum(report.quarantined.values()), report.pages)
            if item.problem:
                prev = known_quarantine.get(item.uri)
                if prev and prev[2] == item.problem:
                    continue
                flush_documents()
                with engine.begin() as conn:
                    writer.quarantine(conn, item, item.problem, item.problem_message, None)
                continue
            prev_src = known_sources.get(item.uri)
            if (item.kind == "pdf" and prev_src and prev_src[0] == item.size
                    and _same_mtime(prev_src[1], item.mtime)):
                report.documents_unchanged += 1
                if prev_src[3]:
                    back.append(item.uri)
                continue
            if item.kind == "record":
                assert item.record is not None
                doc_id = util.sha256_hex(record_bytes(item.record))
                if prev_src and prev_src[2] == doc_id:
                    report.documents_unchanged += 1
                    if prev_src[3]:
                        back.append(item.uri)
                    continue
                rec = item.record
                if not str(rec.get("text") or "").strip() and not str(rec.get("title") or "").strip():
                    prev_q = known_quarantine.get(item.uri)
                    if not (prev_q and prev_q[1] == doc_id):
                        flush_documents()
                        with engine.begin() as conn:
                            writer.quarantine(conn, item, "empty", f"{item.uri}: the record has no title and "
                                              "no text; fill one in or drop the line", doc_id)
                    continue
                try:
                    meta = record_metadata(rec)
                except (TypeError, ValueError, AttributeError) as exc:
                    # Fields of unexpected types ("title": 5, "metadata": {"authors": {}}).
                    flush_documents()
                    with engine.begin() as conn:
                        writer.quarantine(conn, item, "corrupt", f"{item.uri}: the record's fields cannot be "
                                          f"read ({type(exc).__name__}: {exc}); title, text and metadata "
                                          "values must be strings", doc_id)
                    continue
                # What a database cannot store becomes U+FFFD (in _document_row); nothing else
                # in a record is rewritten.
                text = str(rec.get("text") or "")
                extra = {"record_id": rec.get("_id"), "metadata": rec.get("metadata")}
                row = _document_row(doc_id, "record", None, meta, text, [0], "jsonl", "1", extra)
                record_rows.append((row, item))
                if len(record_rows) >= RECORD_BATCH:
                    flush_records()
                continue
            assert item.path is not None
            try:
                doc_id = sha256_file(item.path)
            except OSError as exc:
                flush_documents()
                with engine.begin() as conn:
                    writer.quarantine(conn, item, "unreadable", f"{item.uri} cannot be read ({exc.strerror or exc}); "
                                      "check its permissions and the disk", None)
                continue
            item.doc_id = doc_id
            prev_q = known_quarantine.get(item.uri)
            if prev_q and prev_q[1] == doc_id:
                continue  # same bytes as when it was quarantined: parsing again would say the same
            if doc_id in waiting:
                waiting[doc_id].append(item)
                continue
            if doc_id in doc_ids:
                flush_documents()  # parsed and held: once committed, it is a known document
            with engine.connect() as conn:
                exists = conn.execute(_DOCUMENT_EXISTS, {"doc_id": doc_id}).first()
            if exists is not None:
                flush_documents()
                with engine.begin() as conn:
                    writer.document(conn, None, [item])
                    report.documents_unchanged += 1
                continue
            waiting[doc_id] = [item]
            yield doc_id, str(item.path)

    try:
        with ParsePool(workers=workers, timeout_s=timeout_s, memory_mb=memory_mb, ocr=ocr) as pool:
            for doc_id, result in pool.imap_unordered(pdf_jobs(), before_wait=before_wait):
                items = waiting.pop(doc_id)
                if result.ok:
                    meta = result.metadata
                    extra = {"info": meta.get("info") or {}, "author_names": meta.get("author_names") or []}
                    row = _document_row(doc_id, "pdf", result, meta, result.text, result.page_offsets,
                                        PARSER, PARSER_VERSION, extra)
                    if not doc_rows:
                        docs_since = time.monotonic()
                    doc_rows.append((row, items))
                    doc_ids.add(doc_id)
                    # The same bytes under further names in this run count as known documents.
                    report.documents_unchanged += len(items) - 1
                    if len(doc_rows) >= DOC_BATCH:
                        flush_documents()
                else:
                    flush_documents()
                    with engine.begin() as conn:
                        for it in items:
                            writer.quarantine(conn, it, result.reason or "corrupt", result.message, doc_id)
            flush_records()
        if back:
            lifecycle.revive(engine, back)
        gone = lifecycle.mark_gone(engine, sources, listed)
        report.sources_gone = gone["sources_gone"]
        states = lifecycle.refresh(engine, retracted_file)
        report.retired, report.restored, report.live_documents = (
            states["retired_now"], states["restored_now"], states["live"])
    finally:
        report.seconds = time.monotonic() - started
        report.pages_per_s = report.pages / report.seconds if report.seconds > 0 else 0.0
    logger.info(f"ingest done: {seen} inputs, {report.documents_new} new, {report.documents_unchanged} unchanged, "
        f"{report.pages} pages in {report.seconds:.1f} s, quarantined {report.quarantined}, "
        f"released {report.released}; {report.sources_gone} files left the inbox, {report.retired} documents "
        f"retired, {report.restored} restored, {report.live_documents} live")
    return report
