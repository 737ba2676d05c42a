"""After the copy: the live index republished on the target, and the cutover record.

Nothing on the source changes: rolling back is pointing RP_DATABASE_URL and
RP_OBJECT_STORE_URL at the old values.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from research_pipeline.lib.core import store, util
from research_pipeline.lib.migration.endpoints import MigrationSource, MigrationTarget
from research_pipeline.lib.migration.errors import MigrationError
from research_pipeline.lib.migration.report import MigrationNotVerified
from research_pipeline.lib.migration.verify import verify

log = logging.getLogger(__name__)

#: Where the cutover record is written in the target bucket.
CUTOVER_KEY = "migration/cutover.json"


@dataclass(frozen=True)
class Republished:
    """The live generation made searchable on the target (None when the source had none)."""

    live_generation: str | None
    fts_rows: int
    vectors: int


@dataclass(frozen=True)
class CutoverRecord:
    """What `migration/cutover.json` holds: when, from where to where, and what was verified."""

    cutover_at: str
    source_database: str
    target_database: str
    object_store: str
    rows: int
    objects: int
    partitions: int
    differences: int
    seconds: float


def republish(target: MigrationTarget) -> Republished:
    """Make the live index generation searchable on the target.

    The vector files were copied under the same keys, so the generation's manifest key resolves
    in the target bucket; it is loaded (every file's sha256 checked). A SQLite FTS5 table cannot
    be copied to PostgreSQL, so the live generation's full-text table is rebuilt from the
    migrated chunks with the same code that built it.
    """
    from research_pipeline.lib.embed import vectors
    from research_pipeline.lib.search import fts

    live = store.live_generation(target.engine)
    if live is None:
        log.info("no live index generation to republish")
        return Republished(None, 0, 0)
    target_store = target.object_store()
    index = vectors.load_vector_index(target_store, live["vector_key"])
    if index.ntotal != live["n_vectors"]:
        raise MigrationError(
            f"generation {live['gen_id']}: {live['vector_key']} holds {index.ntotal} vectors on "
            f"{target_store.url}, the generation recorded {live['n_vectors']}: re-run migration_job with force"
        )
    fts_rows = fts.build_fts(target.engine, live["fts_table"])
    if fts_rows != live["n_fts_rows"]:
        raise MigrationError(
            f"generation {live['gen_id']}: rebuilt {live['fts_table']} with {fts_rows} rows on the target, "
            f"the source generation had {live['n_fts_rows']}: migrate every partition before republishing"
        )
    log.info("republished generation %s: %d full-text rows, %d vectors", live["gen_id"], fts_rows, index.ntotal)
    return Republished(live["gen_id"], fts_rows, int(index.ntotal))


def cutover(source: MigrationSource, target: MigrationTarget) -> CutoverRecord:
    """Record the cutover in the bucket after a full verification; refuses when anything differs.

    Raises MigrationNotVerified naming the differences.
    """
    report = verify(source, target)
    if not report.ok:
        raise MigrationNotVerified(report)
    record = CutoverRecord(
        cutover_at=util.utcnow().isoformat(),
        source_database=util.redact_url(source.engine.url.render_as_string(hide_password=False)),
        target_database=util.redact_url(target.engine.url.render_as_string(hide_password=False)),
        object_store=target.object_store_url,
        **report.as_metadata(),
    )
    key = target.key(CUTOVER_KEY)
    target.s3.put_object(Bucket=target.bucket, Key=key, Body=store.dumps(asdict(record)).encode("utf-8"),
                         ChecksumAlgorithm="SHA256")
    log.info("cutover recorded at s3://%s/%s", target.bucket, key)
    return record
