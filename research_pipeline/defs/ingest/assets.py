"""The ingest assets: papers in the inbox become `documents`, documents become `chunks`."""

import dagster as dg
import sqlalchemy as sa

from research_pipeline.defs.resources import (
    DatabaseResource,
    EmbedderResource,
    InboxResource,
)
from research_pipeline.lib.core import store
from research_pipeline.lib.ingest.pdf import REASONS


class IngestConfig(dg.Config):
    """Run-time knobs of the ingest (the defaults suit a laptop)."""

    workers: int = 2
    ocr: bool = True
    # Per-file limits of a parser child process; a file over either is quarantined (timeout/memory).
    timeout_s: float = 60.0
    memory_mb: int = 2048


@dg.asset(
    group_name="ingest",
    kinds={"pdf", "sql"},
)
def documents(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    database: DatabaseResource,
    inbox: InboxResource,
) -> dg.MaterializeResult:
    """The corpus of parsed papers: one row per distinct PDF or JSONL record in the inbox.

    Each document is keyed by the sha256 of its bytes (a record: of its canonical JSON), so
    re-materializing only parses files it has not seen; files that cannot be parsed are kept
    in the `quarantine` table with a reason and are retried when their bytes change.
    """
    from research_pipeline.lib.ingest.pipeline import ingest
    from research_pipeline.lib.ingest.sources import sources_for

    path = inbox.get_path()
    if not path.exists():
        raise dg.Failure(
            description=f"inbox {path} does not exist: set RP_INBOX to the folder of PDFs to ingest",
        )
    engine = database.get_engine()
    report = ingest(
        engine,
        sources_for(path),
        workers=config.workers,
        timeout_s=config.timeout_s,
        memory_mb=config.memory_mb,
        ocr=config.ocr,
        log=context.log.info,
    )
    totals = store.counts(engine)
    metadata: dict[str, dg.MetadataValue] = {
        "documents": dg.MetadataValue.int(totals["documents"]),
        "new": dg.MetadataValue.int(report.documents_new),
        "unchanged": dg.MetadataValue.int(report.documents_unchanged),
        "quarantined_total": dg.MetadataValue.int(totals["quarantined"]),
    }
    for key, value in report.as_metadata().items():
        if key in ("documents_new", "documents_unchanged"):
            continue
        if key.startswith("quarantined_"):
            key = "quarantine_" + key.removeprefix("quarantined_")
        metadata[key] = dg.MetadataValue.int(value) if isinstance(value, int) else dg.MetadataValue.float(value)
    # Every reason is a series of its own, 0 when absent, so plots over materializations are continuous.
    for reason in REASONS:
        metadata.setdefault(f"quarantine_{reason}", dg.MetadataValue.int(0))
    quarantined = dict(report.quarantined)
    context.log.info(
        f"ingest: {report.documents_new} new, {report.documents_unchanged} unchanged, "
        f"{sum(quarantined.values())} quarantined, {report.pages} pages in {report.seconds:.1f}s"
    )
    return dg.MaterializeResult(metadata=metadata)


def chunk_stats(engine: sa.Engine) -> dict[str, float | int]:
    """Totals over the `chunks` table: count, references share and mean tokens per chunk."""
    c = store.chunks
    with engine.connect() as conn:
        total, refs, mean_tokens, docs = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(sa.case((c.c.is_references, 1), else_=0)), 0),
                sa.func.coalesce(sa.func.avg(c.c.n_tokens), 0.0),
                sa.func.count(sa.distinct(c.c.doc_id)),
            )
        ).one()
    return {
        "chunks": int(total),
        "documents_with_chunks": int(docs),
        "references_share": float(refs) / total if total else 0.0,
        "mean_tokens": float(mean_tokens),
    }


@dg.asset(
    group_name="ingest",
    kinds={"sql"},
    deps=[documents],
)
def chunks(
    context: dg.AssetExecutionContext,
    database: DatabaseResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """The retrieval units: token-bounded, overlapping passages of every document, with section,
    page range and character offsets into the document text.

    Only documents without chunks are chunked (a document's chunks are replaced in one
    transaction), so re-materializing after a partial run finishes the rest and changes nothing
    else. Token counts use the embedding model's own tokenizer so no chunk is truncated.
    """
    from research_pipeline.lib.ingest.chunking import chunk_documents

    engine = database.get_engine()
    model = embedder.get_embedder()
    stats = chunk_documents(
        engine,
        model.count_tokens,
        log=context.log.info,
    )
    totals = chunk_stats(engine)
    context.log.info(
        f"chunking: {stats.get('documents_chunked', 0)} documents -> {stats.get('chunks', 0)} new chunks; "
        f"{totals['chunks']} chunks in total"
    )
    return dg.MaterializeResult(
        metadata={
            "chunks": dg.MetadataValue.int(totals["chunks"]),
            "chunks_new": dg.MetadataValue.int(int(stats.get("chunks", 0))),
            "chunks_removed": dg.MetadataValue.int(int(stats.get("chunks_removed", 0))),
            "documents_chunked": dg.MetadataValue.int(int(stats.get("documents_chunked", 0))),
            "documents_with_chunks": dg.MetadataValue.int(totals["documents_with_chunks"]),
            "references_chunks_share": dg.MetadataValue.float(totals["references_share"]),
            "mean_tokens": dg.MetadataValue.float(totals["mean_tokens"]),
        }
    )


ingest_job = dg.define_asset_job(
    name="ingest_job",
    selection=dg.AssetSelection.assets(documents, chunks),
    description="Parse new papers from the inbox and chunk them (idempotent: unchanged files are skipped).",
)
