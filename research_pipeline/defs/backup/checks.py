"""`pg_backups`: the pgBackRest backups of the PostgreSQL cluster, and two checks on a schedule.

The backups themselves are taken by pgBackRest on the database host (deploy/pgbackrest/crontab:
weekly full, daily differential; WAL archived continuously by archive_command). Dagster watches
them: `backup_fresh` (the newest good backup is younger than RP_BACKUP_MAX_AGE_S) and
`backup_restorable` (`pgbackrest verify` reads back every backup and WAL file and checks its
checksum), run by `backup_checks_schedule` at RP_BACKUP_CHECK_CRON (UTC).

All of it exists only when RP_PGBACKREST_STANZA is set: the embedded SQLite deployment has no
PostgreSQL to back up, and then there is no asset, check or schedule rather than a failing one.
"""

from __future__ import annotations

import dagster as dg

from research_pipeline.config import BackupSettings, Settings, child_process_env
from research_pipeline.lib.backup.pgbackrest import BackupError, PgBackRest, freshness

pg_backups = dg.AssetSpec(
    "pg_backups",
    group_name="operations",
    kinds={"postgres", "s3"},
    description=(
        "pgBackRest backups of the PostgreSQL cluster (corpus and Dagster databases) in S3, "
        "taken on the database host (deploy/pgbackrest/crontab); not materialized by Dagster."
    ),
)


class PgBackRestResource(dg.ConfigurableResource):
    """pgBackRest for one stanza; the repository and its credentials come from the config file and
    the PGBACKREST_* variables of this process's environment."""

    stanza: str
    config: str | None = None
    max_age_s: float

    def tool(self) -> PgBackRest:
        return PgBackRest(self.stanza, config=self.config, env=child_process_env())


@dg.asset_check(asset=pg_backups.key, name="backup_fresh", description="The newest good backup is younger than RP_BACKUP_MAX_AGE_S.")
def backup_fresh(pgbackrest: PgBackRestResource) -> dg.AssetCheckResult:
    try:
        info = pgbackrest.tool().info()
    except BackupError as exc:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, description=str(exc))
    result = freshness(info, pgbackrest.max_age_s)
    latest = info.latest()
    metadata = {"backups": dg.MetadataValue.int(len(info.backups))}
    if latest is not None:
        metadata |= {
            "latest_label": dg.MetadataValue.text(latest.label),
            "latest_type": dg.MetadataValue.text(latest.type),
            "latest_age_s": dg.MetadataValue.float(round(result.age_s, 1)),
            "latest_repo_bytes": dg.MetadataValue.int(latest.repo_size),
            "wal_archived_up_to": dg.MetadataValue.text(info.archive_max or ""),
        }
    return dg.AssetCheckResult(
        passed=result.passed, severity=dg.AssetCheckSeverity.ERROR, description=result.description, metadata=metadata
    )


@dg.asset_check(
    asset=pg_backups.key,
    name="backup_restorable",
    description="pgbackrest verify: every backup and archived WAL file in the repository reads back with a valid checksum.",
)
def backup_restorable(pgbackrest: PgBackRestResource) -> dg.AssetCheckResult:
    try:
        report = pgbackrest.tool().verify()
    except BackupError as exc:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, description=str(exc))
    description = "pgbackrest verify: ok" if report.ok else "pgbackrest verify found problems: " + "; ".join(report.problems[:10])
    return dg.AssetCheckResult(
        passed=report.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={"report": dg.MetadataValue.md(f"```\n{report.text[-4000:]}\n```")},
    )


backup_checks_job = dg.define_asset_job(
    "backup_checks_job",
    selection=dg.AssetSelection.checks(backup_fresh, backup_restorable),
    description="Run the backup checks (backup_fresh, backup_restorable) on pg_backups.",
)


def build_backup_defs(backup: BackupSettings) -> dg.Definitions:
    """The backup asset, checks, job and schedule for `backup`; empty when no stanza is configured."""
    if not backup.stanza:
        return dg.Definitions()
    try:
        schedule = dg.ScheduleDefinition(
            name="backup_checks_schedule",
            job=backup_checks_job,
            cron_schedule=backup.check_cron,
            execution_timezone="UTC",
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description="The backup checks at RP_BACKUP_CHECK_CRON (UTC); on because RP_PGBACKREST_STANZA is set.",
        )
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(f"RP_BACKUP_CHECK_CRON={backup.check_cron!r} is not a valid cron expression: {exc}") from None
    return dg.Definitions(
        assets=[pg_backups],
        asset_checks=[backup_fresh, backup_restorable],
        jobs=[backup_checks_job],
        schedules=[schedule],
        resources={
            "pgbackrest": PgBackRestResource(
                stanza=backup.stanza,
                config=str(backup.config) if backup.config else None,
                max_age_s=backup.max_age_s,
            )
        },
    )


@dg.definitions
def backup_defs() -> dg.Definitions:
    return build_backup_defs(Settings.from_env().backup)
