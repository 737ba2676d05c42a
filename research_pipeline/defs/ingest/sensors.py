"""The sensor that starts a reindex when papers appear in (or change in) the inbox."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg

from research_pipeline.defs.resources import (
    DatabaseResource,
    InboxResource,
    sensor_interval,
)
from research_pipeline.defs.search.jobs import reindex_job
from research_pipeline.lib.ingest.sources import inbox_files

#: Run states in which a reindex is still going to ingest what is in the inbox now or soon.
_ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def inbox_listing(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every entry of the inbox listing (`sources.inbox_files`), sorted.

    A link that leads nowhere is listed by its own size and time, so it triggers the run that
    quarantines it.
    """
    out: list[tuple[str, int, int]] = []
    for entry in inbox_files(root):
        try:
            st = entry.path.stat()
        except OSError:
            try:
                st = entry.path.lstat()
            except OSError:  # removed between listing and stat: it is simply not there
                continue
        out.append((entry.rel(root), st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def listing_state(listing: list[tuple[str, int, int]]) -> dict:
    """The sensor cursor for a listing: a fingerprint of (path, size, mtime) plus count and newest mtime."""
    digest = hashlib.sha256()
    for rel, size, mtime_ns in listing:
        digest.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    return {
        "fingerprint": digest.hexdigest()[:32],
        "files": len(listing),
        "newest_mtime_ns": max((m for _, _, m in listing), default=0),
    }


def unindexed_files(engine, root: Path, listing: list[tuple[str, int, int]]) -> list[str]:  # noqa: ANN001
    """The listed files the store has not seen at their size (neither a document source nor quarantined)."""
    import sqlalchemy as sa

    from research_pipeline.lib.core import store
    from research_pipeline.lib.ingest.sources import path_uri

    with engine.connect() as conn:
        seen = dict(conn.execute(sa.select(store.document_sources.c.uri, store.document_sources.c.size)).all())
        seen.update(conn.execute(sa.select(store.quarantine.c.uri, store.quarantine.c.size)).all())
    out = []
    for rel, size, _ in listing:
        uri = path_uri(root / rel)
        # A JSONL file's records are stored as `<path>#<id>`: the file is known if any record is.
        known = uri in seen and seen[uri] in (None, size)
        if not known and rel.endswith("corpus.jsonl"):
            known = any(u.startswith(uri + "#") for u in seen)
        if not known:
            out.append(rel)
    return out


@dg.sensor(
    job=reindex_job,
    minimum_interval_seconds=sensor_interval(60),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Starts reindex_job when files in the inbox are added or changed.",
)
def new_papers_sensor(context: dg.SensorEvaluationContext, inbox: InboxResource, database: DatabaseResource):
    """Watches the inbox; requests one `reindex_job` run per new inbox state, so new papers are
    ingested, indexed and (if the release gates pass) searchable within minutes.

    The cursor is the fingerprint of the sorted (path, size, mtime) listing, so a tick only
    stats files (no hashing of PDF bytes). The run key is that fingerprint: if the daemon
    crashes after requesting a run, the next tick re-requests the same key and Dagster
    de-duplicates it. While a reindex_job run is queued or running the tick skips without
    moving the cursor, so papers that arrive meanwhile get the next run instead of a
    concurrent second generation build. A removal also changes the fingerprint; the resulting
    run is cheap because the ingest skips every unchanged file by content hash. The first tick
    (no cursor yet, e.g. the sensor just turned on) starts from the store: an inbox whose every
    file is already ingested only sets the cursor, so turning the sensor on does not reindex.
    """
    root = inbox.get_path()
    if not root.is_dir():
        return dg.SkipReason(f"inbox {root} is not a folder: set RP_INBOX to the folder of papers")
    listing = inbox_listing(root)
    state = listing_state(listing)
    previous = json.loads(context.cursor) if context.cursor else None
    if state["files"] == 0:
        context.update_cursor(json.dumps(state))
        return dg.SkipReason(f"inbox {root} has no PDF or corpus.jsonl files")
    if previous is not None and previous.get("fingerprint") == state["fingerprint"]:
        return dg.SkipReason(f"no new or changed files in {root} ({state['files']} files)")
    if previous is None and not unindexed_files(database.get_engine(), root, listing):
        context.update_cursor(json.dumps(state))
        return dg.SkipReason(f"first tick: all {state['files']} files in {root} are already ingested")
    active = context.instance.get_runs_count(dg.RunsFilter(job_name=reindex_job.name, statuses=_ACTIVE))
    if active:
        return dg.SkipReason(f"inbox changed, but {active} reindex_job run(s) are still queued or running")
    context.update_cursor(json.dumps(state))
    before = previous["files"] if previous else 0
    context.log.info(f"inbox {root}: {state['files']} files (was {before}); requesting reindex_job")
    return dg.RunRequest(
        run_key=f"inbox-{state['fingerprint']}",
        tags={"research_pipeline/inbox_files": str(state["files"])},
    )
