"""`nightly_reindex`: runs reindex_job every night (UTC) so new papers reach the live index."""

import dagster as dg

from research_pipeline.defs.resources import nightly_cron
from research_pipeline.defs.search.jobs import reindex_job


def build_nightly_reindex(cron: str) -> dg.ScheduleDefinition:
    """The nightly reindex schedule for a cron expression (UTC); a clear error for a bad expression."""
    try:
        return dg.ScheduleDefinition(
            name="nightly_reindex",
            job=reindex_job,
            cron_schedule=cron,
            execution_timezone="UTC",
            default_status=dg.DefaultScheduleStatus.STOPPED,
            description="Nightly reindex (RP_NIGHTLY_CRON, UTC): publishes a new generation only if its release gates pass.",
        )
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(f"RP_NIGHTLY_CRON={cron!r} is not a valid cron expression (e.g. '0 2 * * *'): {exc}") from None


nightly_reindex = build_nightly_reindex(nightly_cron())
