"""lib/backup/pgbackrest.py without a repository: parsing pgBackRest's output, freshness, errors.

The JSON and text below are what pgBackRest 2.45 printed against the restore test's repository
(research_pipeline_tests/integration/test_restore.py runs the same code against the real one).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from research_pipeline.config import BackupSettings
from research_pipeline.defs.backup.checks import build_backup_defs
from research_pipeline.lib.backup.pgbackrest import (
    BackupError,
    PgBackRest,
    explain,
    freshness,
    parse_info,
    parse_verify,
)

INFO_OK = (
    '[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1","max":"000000010000000000000003",'
    '"min":"000000010000000000000001"}],"backup":[{"archive":{"start":"000000010000000000000002",'
    '"stop":"000000010000000000000003"},"backrest":{"format":5,"version":"2.45"},"database":{"id":1,'
    '"repo-key":1},"error":false,"info":{"delta":23214029,"repository":{"delta":2837029,"size":2837029},'
    '"size":23214029},"label":"20261204-141622F","lsn":{"start":"0/2000028","stop":"0/3000050"},'
    '"prior":null,"reference":null,"timestamp":{"start":1796393782,"stop":1796393783},"type":"full"}],'
    '"cipher":"none","db":[{"id":1,"repo-key":1,"system-id":7715452525760113501,"version":"15"}],'
    '"name":"rp","repo":[{"cipher":"none","key":1,"status":{"code":0,"message":"ok"}}],'
    '"status":{"code":0,"lock":{"backup":{"held":false}},"message":"ok"}}]'
)
INFO_UNREACHABLE = (
    '[{"archive":[],"backup":[],"cipher":"none","db":[],"name":"rp","repo":[{"cipher":"none","key":1,'
    '"status":{"code":99,"message":"[HostConnectError] unable to connect to \'localhost:1\': [111] '
    'Connection refused"}}],"status":{"code":99,"lock":{"backup":{"held":false}},"message":"other"}}]'
)
VERIFY_OK = """stanza: rp
status: ok
  archiveId: 15-1, total WAL checked: 2, total valid WAL: 2
    missing: 0, checksum invalid: 0, size invalid: 0, other: 0
  backup: 20261204-142500F, status: valid, total files checked: 964, total valid files: 964
    missing: 0, checksum invalid: 0, size invalid: 0, other: 0
"""


def test_info_parses_backups_and_wal_range():
    info = parse_info("rp", INFO_OK)
    latest = info.latest()
    assert (latest.label, latest.type, latest.repo_size) == ("20261204-141622F", "full", 2837029)
    assert latest.stopped == datetime.fromtimestamp(1796393783, tz=timezone.utc)
    assert (info.archive_min, info.archive_max) == ("000000010000000000000001", "000000010000000000000003")
    assert freshness(info, 3600, now=latest.stopped + timedelta(minutes=10)).passed
    stale = freshness(info, 3600, now=latest.stopped + timedelta(hours=2))
    assert not stale.passed and "RP_BACKUP_MAX_AGE_S" in stale.description


def test_no_backup_is_not_fresh_and_says_how_to_take_one():
    info = parse_info("rp", INFO_OK.replace(INFO_OK[INFO_OK.index('"backup":[') : INFO_OK.index('],"cipher"') + 1], '"backup":[]'))
    assert info.latest() is None
    result = freshness(info, 3600)
    assert not result.passed and "--type=full backup" in result.description


def test_repository_errors_carry_the_detail_and_a_hint():
    info = parse_info("rp", INFO_UNREACHABLE)
    assert info.status_code == 99 and "Connection refused" in info.status_message
    assert "PGBACKREST_REPO1_S3_ENDPOINT" in explain("rp", info.status_message, info.status_code)
    assert "PGBACKREST_REPO1_S3_KEY_SECRET" in explain("rp", "info command requires option: repo1-s3-key")
    assert "PGBACKREST_REPO1_S3_BUCKET" in explain("rp", "[ProtocolError] HTTP request failed with 404 (NOT FOUND)")


def test_verify_judged_by_its_report_not_its_exit_code():
    assert parse_verify("rp", VERIFY_OK).ok
    bad = parse_verify("rp", VERIFY_OK.replace("status: valid", "status: invalid").replace("checksum invalid: 0, size", "checksum invalid: 2, size", 1))
    assert not bad.ok and any("checksum invalid: 2" in p for p in bad.problems)
    assert not parse_verify("rp", "stanza: rp\nstatus: error\n  No usable backup.info file\n").ok
    assert not parse_verify("rp", "").ok  # no report at all is not a pass


def test_missing_config_and_missing_tool_say_what_to_do(tmp_path):
    with pytest.raises(BackupError, match="RP_PGBACKREST_CONFIG"):
        PgBackRest("rp", config=tmp_path / "absent.conf").info()
    with pytest.raises(BackupError, match="apt-get install pgbackrest"):
        PgBackRest("rp", executable=str(tmp_path / "no-pgbackrest")).info()


def test_backup_definitions_absent_unless_a_stanza_is_configured():
    empty = build_backup_defs(BackupSettings())
    assert not empty.assets and not empty.asset_checks and not empty.schedules
    defs = build_backup_defs(BackupSettings(stanza="rp", check_cron="15 5 * * *"))
    (schedule,) = defs.schedules
    assert (schedule.name, schedule.cron_schedule) == ("backup_checks_schedule", "15 5 * * *")
    assert {k.name for chk in defs.asset_checks for k in chk.check_keys} == {"backup_fresh", "backup_restorable"}
    assert defs.resolve_job_def("backup_checks_job").name == "backup_checks_job"
    with pytest.raises(ValueError, match="RP_BACKUP_CHECK_CRON"):
        build_backup_defs(BackupSettings(stanza="rp", check_cron="61 * * * *"))


def test_the_loaded_code_location_has_no_backup_checks_by_default():
    from research_pipeline.definitions import defs

    assert "pg_backups" not in {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
