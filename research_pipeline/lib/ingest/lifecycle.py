"""Document lifecycle: which documents new generations hold, with the inbox as the truth.

A document is *live* while at least one of its sources (`document_sources`) is live, it was
not removed by hand, and it is not retracted. Otherwise it is *retired*:
`documents.retired_reason` says why (`removed` > `retracted` > `gone`, the first that applies)
and `retired_at` since when. Retired rows and their chunks stay in the store, so nothing is
lost and a rollback to an older generation still finds its papers; the generation build
leaves them out (`LIVE`).

- gone: every file that held the document left the inbox, or was replaced by different bytes
  (its uri now names another document), or was quarantined. A paper under two names stays
  live until both are gone. Ingest marks sources gone (`document_sources.gone_at`) only after
  a complete listing of an inbox, and only uris that listing speaks for (`covers`).
- removed: `remove(engine, PATH|DOC_ID|DOI)` sets `documents.removed_at`; `restore` clears it.
- retracted: the document's doc_id, DOI or arXiv id is listed in the retracted file (one per
  line, `#` comments). Passing no file keeps the retractions recorded by the last one.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store
from research_pipeline.lib.core.util import utcnow
from research_pipeline.lib.ingest.sources import path_uri

log = logging.getLogger(__name__)

#: Why a document is retired, strongest first.
RETIRED_REASONS: tuple[str, ...] = ("removed", "retracted", "gone")

#: The documents a new generation holds (a WHERE clause on `store.documents`).
LIVE = store.documents.c.retired_at.is_(None)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DOI_PREFIX = re.compile(r"^(?:https?://(?:dx\.)?doi\.org/|doi:\s*)", re.IGNORECASE)
_ARXIV_PREFIX = re.compile(r"^(?:https?://arxiv\.org/(?:abs|pdf)/|arxiv:\s*)", re.IGNORECASE)
_ARXIV_ID = re.compile(r"^(?:\d{4}\.\d{4,5}|[a-z\-]+(?:\.[a-z]{2})?/\d{7})(?:v\d+)?$", re.IGNORECASE)
_BATCH = 5000


def normalize_doi(doi: str | None) -> str | None:
    """A DOI compared case-insensitively, without a doi.org or `doi:` prefix."""
    if not doi:
        return None
    doi = _DOI_PREFIX.sub("", doi.strip()).rstrip(".,;").lower()
    return doi or None


def normalize_arxiv(arxiv_id: str | None) -> str | None:
    """An arXiv id without prefix or version (`arXiv:2101.00001v2` -> `2101.00001`)."""
    if not arxiv_id:
        return None
    arxiv_id = _ARXIV_PREFIX.sub("", arxiv_id.strip()).removesuffix(".pdf").lower()
    return re.sub(r"v\d+$", "", arxiv_id) or None


def read_retracted(path: str | os.PathLike) -> set[str]:
    """The normalised identifiers of a retracted file: doc_ids, DOIs and arXiv ids, one per line.

    Blank lines and text after `#` are ignored. A line that is none of the three is an error
    that names it, so a typo cannot silently keep a retracted paper searchable.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"retracted file {p} does not exist; create it (one DOI, arXiv id or "
                                "doc_id per line) or unset RP_RETRACTED_FILE")
    out: set[str] = set()
    bad: list[str] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        ident = _identifier(entry)
        if ident is None:
            bad.append(f"line {lineno}: {entry!r}")
        else:
            out.add(ident)
    if bad:
        raise ValueError(f"retracted file {p} has entries that are not a DOI (10.x/...), an arXiv id "
                         f"(arXiv:2101.00001) or a 64-hex doc_id: {'; '.join(bad[:5])}")
    return out


def _identifier(entry: str) -> str | None:
    """`doc:<id>`, `doi:<doi>` or `arxiv:<id>` for one user-given identifier, or None."""
    low = entry.strip().lower()
    if _HEX64.match(low):
        return f"doc:{low}"
    doi = normalize_doi(entry)
    if doi and doi.startswith("10.") and "/" in doi:
        return f"doi:{doi}"
    arxiv = normalize_arxiv(entry)
    if arxiv and _ARXIV_ID.match(arxiv) and (_ARXIV_PREFIX.match(entry.strip()) or re.match(r"^\d{4}\.", arxiv)):
        return f"arxiv:{arxiv}"
    return None


def _idents_of(doc_id: str, doi: str | None, arxiv_id: str | None) -> set[str]:
    out = {f"doc:{doc_id}"}
    if (d := normalize_doi(doi)) is not None:
        out.add(f"doi:{d}")
    if (a := normalize_arxiv(arxiv_id)) is not None:
        out.add(f"arxiv:{a}")
    return out


def _retracted_ids(conn: sa.Connection, retracted: set[str]) -> list[str]:
    """The doc_ids a set of normalised identifiers names."""
    d = store.documents
    ids = {i.removeprefix("doc:") for i in retracted if i.startswith("doc:")}
    if any(not i.startswith("doc:") for i in retracted):
        rows = conn.execute(
            sa.select(d.c.doc_id, d.c.doi, d.c.arxiv_id).where(sa.or_(d.c.doi.is_not(None), d.c.arxiv_id.is_not(None)))
        )
        ids.update(r.doc_id for r in rows if _idents_of(r.doc_id, r.doi, r.arxiv_id) & retracted)
    return sorted(ids)


def refresh(engine: Engine, retracted_file: str | os.PathLike | None = None) -> dict[str, int]:
    """Recompute every document's retirement from its sources, removal and retraction.

    Returns the number of live and retired (per reason) documents, and how many were retired
    (`retired_now`) or became live again (`restored_now`) in this call. Idempotent; the
    reasons are decided in SQL, so only documents whose state changes reach Python.
    """
    retracted = read_retracted(retracted_file) if retracted_file is not None else None
    d, s = store.documents, store.document_sources
    now = utcnow()
    with engine.begin() as conn:
        if retracted is None:  # keep what the last list said
            is_retracted = d.c.retired_reason == "retracted"
        else:
            is_retracted = d.c.doc_id.in_(_retracted_ids(conn, retracted))
        want = sa.case(
            (d.c.removed_at.is_not(None), "removed"),
            (is_retracted, "retracted"),
            (~sa.exists().where(s.c.doc_id == d.c.doc_id, s.c.gone_at.is_(None)), "gone"),
            else_=None,
        ).label("want")
        current = sa.select(d.c.doc_id, d.c.retired_reason, want).subquery()
        changed = conn.execute(
            sa.select(current.c.doc_id, current.c.retired_reason, current.c.want).where(
                sa.func.coalesce(current.c.want, "") != sa.func.coalesce(current.c.retired_reason, "")
            )
        ).all()
        by_reason: dict[str | None, list[str]] = {}
        for r in changed:
            by_reason.setdefault(r.want, []).append(r.doc_id)
        for reason, ids in by_reason.items():
            values = {"retired_reason": reason, "retired_at": None if reason is None else now}
            for i in range(0, len(ids), _BATCH):
                conn.execute(sa.update(d).where(d.c.doc_id.in_(ids[i : i + _BATCH])).values(**values))
        totals = dict.fromkeys(("live", *RETIRED_REASONS), 0)
        for reason, n in conn.execute(sa.select(d.c.retired_reason, sa.func.count()).group_by(d.c.retired_reason)):
            totals[reason or "live"] = int(n)
    retired_now = sum(1 for r in changed if r.retired_reason is None)
    restored_now = sum(1 for r in changed if r.want is None)
    out = {**totals, "retired_now": retired_now, "restored_now": restored_now}
    if changed:
        log.info("lifecycle: %d documents retired, %d live again; now %s", retired_now, restored_now, totals)
    return out


def mark_gone(engine: Engine, sources: Iterable[Any], seen: set[str]) -> dict[str, int]:
    """After a complete listing: mark the sources it did not see gone, and forget their quarantine rows.

    Only sources with `complete` true take part, and each only for the uris it `covers`, so
    a partial ingest (some paths) or another inbox never retires anything. Returns
    `sources_gone` and `quarantine_cleared`.
    """
    complete = [src for src in sources if getattr(src, "complete", False) and hasattr(src, "covers")]
    if not complete:
        return {"sources_gone": 0, "quarantine_cleared": 0}
    d, s, q = store.documents, store.document_sources, store.quarantine
    with engine.begin() as conn:
        recorded = conn.execute(
            sa.select(s.c.uri, d.c.source_kind)
            .select_from(s.outerjoin(d, d.c.doc_id == s.c.doc_id))
            .where(s.c.gone_at.is_(None))
        ).all()
        gone = [uri for uri, kind in recorded
                if uri not in seen and any(src.covers(uri, kind) for src in complete)]
        for i in range(0, len(gone), _BATCH):
            conn.execute(sa.update(s).where(s.c.uri.in_(gone[i : i + _BATCH])).values(gone_at=utcnow()))
        stale = [uri for (uri,) in conn.execute(sa.select(q.c.uri))
                 if uri not in seen and any(src.covers(uri, None) for src in complete)]
        for i in range(0, len(stale), _BATCH):
            conn.execute(sa.delete(q).where(q.c.uri.in_(stale[i : i + _BATCH])))
    if gone or stale:
        log.info("lifecycle: %d sources left the inbox, %d quarantine rows of removed files cleared",
                 len(gone), len(stale))
    return {"sources_gone": len(gone), "quarantine_cleared": len(stale)}


def revive(engine: Engine, uris: Sequence[str]) -> None:
    """Clear `gone_at` of sources seen again unchanged (a file put back as it was)."""
    s = store.document_sources
    with engine.begin() as conn:
        for i in range(0, len(uris), _BATCH):
            conn.execute(sa.update(s).where(s.c.uri.in_(list(uris[i : i + _BATCH]))).values(gone_at=None))


def _paths(target: str, inbox: str | os.PathLike | None) -> list[str]:
    """The uris a path argument may mean: as given, from the working folder, from the inbox."""
    bases = [Path.cwd()] + ([Path(inbox)] if inbox is not None else [])
    return list(dict.fromkeys(
        [target] + [path_uri(Path(os.path.normpath((base / target).absolute()))) for base in bases]
    ))


def find_documents(engine: Engine, target: str, inbox: str | os.PathLike | None = None) -> list[str]:
    """The doc_ids `target` names: a doc_id, a recorded path (a folder: everything under it;
    relative paths from the working folder or `inbox`), a DOI or an arXiv id."""
    d, s = store.documents, store.document_sources
    target = target.strip()
    with engine.connect() as conn:
        if _HEX64.match(target.lower()):
            hit = conn.execute(sa.select(d.c.doc_id).where(d.c.doc_id == target.lower())).scalars().all()
            if hit:
                return list(hit)
        uris = _paths(target, inbox)
        ids = set(conn.execute(sa.select(s.c.doc_id).where(s.c.uri.in_(uris))).scalars())
        if not ids:  # a folder: every paper recorded under it
            prefixes = tuple(u.rstrip(os.sep) + os.sep for u in uris[1:])
            ids = {doc_id for uri, doc_id in conn.execute(sa.select(s.c.uri, s.c.doc_id)) if uri.startswith(prefixes)}
        if ids:
            return sorted(ids)
        ident = _identifier(target)
        if ident is None or ident.startswith("doc:"):
            return []
        rows = conn.execute(
            sa.select(d.c.doc_id, d.c.doi, d.c.arxiv_id).where(sa.or_(d.c.doi.is_not(None), d.c.arxiv_id.is_not(None)))
        ).all()
    return sorted(r.doc_id for r in rows if ident in _idents_of(r.doc_id, r.doi, r.arxiv_id))


def _set_removed(engine: Engine, target: str, removed: bool, inbox: str | os.PathLike | None) -> list[dict[str, Any]]:
    ids = find_documents(engine, target, inbox)
    if not ids:
        raise LookupError(
            f"no document matches {target!r}: pass a path the inbox held, a 64-hex doc_id, a DOI or an "
            "arXiv id (`research-pipeline status` shows the corpus)"
        )
    d = store.documents
    with engine.begin() as conn:
        conn.execute(sa.update(d).where(d.c.doc_id.in_(ids)).values(removed_at=utcnow() if removed else None))
    refresh(engine)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(d.c.doc_id, d.c.title, d.c.retired_reason).where(d.c.doc_id.in_(ids)).order_by(d.c.doc_id)
        ).mappings().all()
    return [dict(r) for r in rows]


def remove(engine: Engine, target: str, inbox: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Take the documents `target` names out of every new generation; returns them (doc_id, title, retired_reason).

    The rows stay (marked removed) until `restore`; the live generation keeps serving them
    until the next reindex publishes one without them. LookupError if nothing matches.
    """
    return _set_removed(engine, target, True, inbox)


def restore(engine: Engine, target: str, inbox: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Undo `remove`: the documents are live again if a live source still holds them."""
    return _set_removed(engine, target, False, inbox)
