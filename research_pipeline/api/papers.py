"""PDFs of papers, served by document id only: never a path taken from the request.

A document id is the sha256 of the source file. `/papers/{doc_id}.pdf` looks up where that
document was seen (`document_sources`), keeps only local paths that resolve (symlinks
followed) to a regular file inside the deployment's inbox (`Settings.inbox`), and serves the
bytes only if they still hash to the id: a file swapped, edited or linked elsewhere since
ingestion is not served. S3 and record sources are not served by this route.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from research_pipeline.lib.core import store

DOC_ID = re.compile(r"[0-9a-f]{64}")
#: Larger files are not read into memory to be served (the ingest limit is smaller).
MAX_PDF_BYTES = 256 * 1024 * 1024


def _candidate_paths(engine: sa.Engine, doc_ids: list[str]) -> dict[str, list[str]]:
    src = store.document_sources
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(src.c.doc_id, src.c.uri).where(src.c.doc_id.in_(doc_ids), src.c.gone_at.is_(None))
        ).all()
    out: dict[str, list[str]] = {}
    for doc_id, uri in rows:
        if uri.lower().endswith(".pdf") and "://" not in uri:
            out.setdefault(doc_id, []).append(uri)
    return out


def _inside(root: Path, uri: str) -> Path | None:
    """The real path of `uri` if it is an existing regular file under `root`, else None."""
    try:
        path = Path(uri).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def servable(engine: sa.Engine, inbox: Path, doc_ids: list[str]) -> set[str]:
    """The ids among `doc_ids` whose PDF this deployment can serve (found under the inbox)."""
    ids = [d for d in doc_ids if DOC_ID.fullmatch(d or "")]
    if not ids:
        return set()
    root = inbox.resolve()
    return {
        doc_id
        for doc_id, uris in _candidate_paths(engine, ids).items()
        if any(_inside(root, uri) is not None for uri in uris)
    }


def read_pdf(engine: sa.Engine, inbox: Path, doc_id: str) -> bytes | None:
    """The PDF bytes of `doc_id` from a file under `inbox` whose sha256 is `doc_id`, or None."""
    if not DOC_ID.fullmatch(doc_id):
        return None
    root = inbox.resolve()
    for uri in _candidate_paths(engine, [doc_id]).get(doc_id, []):
        path = _inside(root, uri)
        if path is None or path.stat().st_size > MAX_PDF_BYTES:
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == doc_id:
            return data
    return None


async def paper_pdf(request: Request) -> Response:
    """The PDF of one paper, by document id.
    ---
    parameters:
      - {name: doc_id, in: path, required: true, schema: {type: string, pattern: "^[0-9a-f]{64}$"}}
    responses:
      200: {description: the PDF (application/pdf)}
      404: {description: "unknown id, or the file is not under this deployment's inbox"}
    """
    service: Any = request.app.state.service
    doc_id = request.path_params["doc_id"]
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(service.side_pool, read_pdf, service.engine, service.settings.inbox, doc_id)
    if data is None:
        return JSONResponse(
            {"error": "no PDF for this document id on this deployment (unknown id, or its file is not in the inbox)"},
            status_code=404,
        )
    return Response(
        data,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'inline; filename="{doc_id[:16]}.pdf"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "public, max-age=86400, immutable",
        },
    )
