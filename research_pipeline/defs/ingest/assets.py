"""The ingest assets: papers in the inbox become `documents`, documents become `chunks`."""

from datetime import timedelta

import dagster as dg
import sqlalchemy as sa

from research_pipeline.defs.resources import (
    TRANSIENT_RETRY,
    DatabaseResource,
    EmbedderResource,
    InboxResource,
)
from research_pipeline.lib.core import store, util
from research_pipeline.lib.ingest.pdf import REASONS

#: Who answers for the ingest assets (shown in the catalog).
OWNERS = ["team:search"]


def table_schema(table: sa.Table) -> dg.TableSchema:
    """The catalog's column schema of a SQLAlchemy table: name, SQL type, nullability, key."""
    columns = []
    # A column of a composite primary key (embeddings: content_hash + model_id) is not unique alone.
    single_key = len(table.primary_key.columns) == 1
    for col in table.columns:
        # A TypeDecorator (store.UtcDateTime) is described by the SQL type it stores.
        sql_type = getattr(col.type, "impl", col.type)
        unique = bool(col.unique) or (bool(col.primary_key) and single_key)
        columns.append(
            dg.TableColumn(
                name=col.name,
                type=str(sql_type.compile()).lower(),
                constraints=dg.TableColumnConstraints(nullable=bool(col.nullable), unique=unique),
            )
        )
    return dg.TableSchema(columns=columns)


def reflected_schema(engine: sa.Engine, name: str) -> dg.TableSchema:
    """The column schema of a table made at run time (a generation's full-text table), read back
    from the database; its columns differ by backend."""
    table = sa.Table(name, sa.MetaData(), autoload_with=engine)
    return table_schema(table)


def table_metadata(table: sa.Table) -> dict[str, object]:
    """Definition metadata of an asset stored in `table`: its column schema and table name."""
    return {"dagster/column_schema": table_schema(table), "dagster/table_name": table.name}


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
    owners=OWNERS,
    code_version="ingest-v1",
    retry_policy=TRANSIENT_RETRY,
    metadata=table_metadata(store.documents),
    # The nightly reindex reads the inbox every day: a day and a half without it is a failure.
    freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=36), warn_window=timedelta(hours=26)),
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
        retracted_file=inbox.get_retracted_file(),
    )
    totals = store.counts(engine)
    metadata: dict[str, dg.MetadataValue] = {
        "documents": dg.MetadataValue.int(totals["documents"]),
        "dagster/row_count": dg.MetadataValue.int(totals["documents"]),
        "new": dg.MetadataValue.int(report.documents_new),
        "unchanged": dg.MetadataValue.int(report.documents_unchanged),
        "quarantined_total": dg.MetadataValue.int(totals["quarantined"]),
    }
    for key, value in report.as_metadata().items():
        if key in ("documents_new", "documents_unchanged"):
            continue
        if key == "pages_per_s" and not report.pages:
            continue  # nothing parsed: a rate of 0 would plot as a (false) slowdown
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
    """Totals over the `chunks` table: count, references share and mean tokens per chunk (the last
    two only when there are chunks)."""
    c = store.chunks
    with engine.connect() as conn:
        total, refs, mean_tokens, docs = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(sa.case((c.c.is_references, 1), else_=0)), 0),
                sa.func.avg(c.c.n_tokens),
                sa.func.count(sa.distinct(c.c.doc_id)),
            )
        ).one()
    out: dict[str, float | int] = {"chunks": int(total), "documents_with_chunks": int(docs)}
    if total:
        out["references_share"] = float(refs) / total
        out["mean_tokens"] = float(mean_tokens)
    return out


def chunks_digest(engine: sa.Engine) -> str:
    """A digest of every chunk's id and content hash: the data version of `chunks`."""
    c = store.chunks
    with engine.connect() as conn:
        rows = conn.execute(sa.select(c.c.chunk_id, c.c.content_hash).order_by(c.c.chunk_id)).all()
    return util.sha256_hex("\n".join(f"{r.chunk_id} {r.content_hash}" for r in rows))[:16]


@dg.asset(
    group_name="ingest",
    kinds={"sql"},
    deps=[documents],
    owners=OWNERS,
    code_version="chunk-v1",
    retry_policy=TRANSIENT_RETRY,
    metadata=table_metadata(store.chunks),
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

    def count_tokens(text: str) -> int:
        # The model loads on the first text to chunk, so a run with nothing new never loads it.
        return embedder.get_embedder().count_tokens(text)

    stats = chunk_documents(engine, count_tokens)
    totals = chunk_stats(engine)
    context.log.info(
        f"chunking: {stats.get('documents_chunked', 0)} documents -> {stats.get('chunks', 0)} new chunks; "
        f"{totals['chunks']} chunks in total"
    )
    metadata = {
        "chunks": dg.MetadataValue.int(totals["chunks"]),
        "dagster/row_count": dg.MetadataValue.int(totals["chunks"]),
        "chunks_new": dg.MetadataValue.int(int(stats.get("chunks", 0))),
        "chunks_removed": dg.MetadataValue.int(int(stats.get("chunks_removed", 0))),
        "documents_chunked": dg.MetadataValue.int(int(stats.get("documents_chunked", 0))),
        "documents_with_chunks": dg.MetadataValue.int(totals["documents_with_chunks"]),
    }
    # A share and a mean of no chunks do not exist: left out rather than plotted as 0.
    if "references_share" in totals:
        metadata["references_chunks_share"] = dg.MetadataValue.float(totals["references_share"])
        metadata["mean_tokens"] = dg.MetadataValue.float(totals["mean_tokens"])
    return dg.MaterializeResult(
        # Unchanged chunks keep their data version, so the catalog shows downstream as up to date.
        data_version=dg.DataVersion(chunks_digest(engine)),
        metadata=metadata,
    )


ingest_job = dg.define_asset_job(
    name="ingest_job",
    selection=dg.AssetSelection.assets(documents, chunks),
    description="Parse new papers from the inbox and chunk them (idempotent: unchanged files are skipped).",
)
