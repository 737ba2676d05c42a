"""pgBackRest's command line from Python: what the backups are, whether they verify, taking one.

PostgreSQL's backups (base backups plus archived WAL, in S3) are made and restored by pgBackRest;
this module only asks it questions (`info --output=json`, `verify --output=text`) and runs
`backup`, and turns its failures into errors that say what to do. pgBackRest reads its settings
from its config file and from PGBACKREST_* variables in the environment it is given; nothing
here reads the environment.

Two quirks of pgBackRest 2.45 this module handles: `info` exits 0 for a stanza that does not
exist or a repository it cannot reach (the JSON's status says so), and `verify` exits 0 whatever
it found (its text report's `status:` lines say so). So success is judged from the output, not
the exit code.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

#: pgBackRest's stanza status codes (`info --output=json`, status.code).
STATUS_OK = 0
STATUS_MISSING_STANZA_PATH = 1
STATUS_NO_BACKUP = 2
STATUS_MISSING_STANZA_DATA = 3
STATUS_OTHER = 99


class BackupError(RuntimeError):
    """pgBackRest failed or its repository is unusable; the message says what to do."""


@dataclass(frozen=True)
class Backup:
    """One backup set of a stanza, as `pgbackrest info` reports it."""

    label: str
    type: str  # full, diff or incr
    started: datetime
    stopped: datetime
    error: bool  # pgBackRest found a page checksum error while copying
    size: int  # bytes of the database at backup time
    repo_size: int  # bytes stored in the repository (compressed)
    wal_start: str
    wal_stop: str


@dataclass(frozen=True)
class StanzaInfo:
    """`pgbackrest info` of one stanza: its status and its backups, oldest first."""

    stanza: str
    status_code: int
    status_message: str
    backups: tuple[Backup, ...] = ()
    archive_min: str | None = None
    archive_max: str | None = None

    def latest(self) -> Backup | None:
        """The newest backup without errors (None: there is none)."""
        good = [b for b in self.backups if not b.error]
        return max(good, key=lambda b: b.stopped) if good else None

    def latest_age_s(self, now: datetime | None = None) -> float | None:
        latest = self.latest()
        if latest is None:
            return None
        now = now or datetime.now(timezone.utc)
        return (now - latest.stopped).total_seconds()


@dataclass(frozen=True)
class VerifyReport:
    """`pgbackrest verify`: ok when the stanza and every backup and WAL file it checked are valid."""

    stanza: str
    ok: bool
    text: str
    problems: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Freshness:
    passed: bool
    age_s: float | None
    label: str | None
    description: str


def freshness(info: StanzaInfo, max_age_s: float, now: datetime | None = None) -> Freshness:
    """Is the newest good backup younger than `max_age_s`?"""
    latest = info.latest()
    if latest is None:
        return Freshness(
            False,
            None,
            None,
            f"stanza {info.stanza!r} has no valid backup: take one on the database host "
            f"(`pgbackrest --stanza={info.stanza} --type=full backup`) and check the backup cron job",
        )
    age = info.latest_age_s(now)
    ok = age <= max_age_s
    verdict = "within" if ok else "older than"
    description = (
        f"latest backup {latest.label} ({latest.type}) finished {age / 3600:.1f} h ago, "
        f"{verdict} the limit of {max_age_s / 3600:.1f} h (RP_BACKUP_MAX_AGE_S)"
    )
    if not ok:
        description += "; the scheduled backup is not running or failing: see its log on the database host"
    return Freshness(ok, age, latest.label, description)


def _ts(value: int) -> datetime:
    return datetime.fromtimestamp(int(value), tz=timezone.utc)


def parse_info(stanza: str, raw: str) -> StanzaInfo:
    """The StanzaInfo of `stanza` from `pgbackrest info --output=json`'s output."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BackupError(f"pgbackrest info printed no JSON ({exc}): {raw[:300]!r}") from None
    entry = next((s for s in doc if s.get("name") == stanza), None)
    if entry is None:
        raise BackupError(f"pgbackrest info did not report stanza {stanza!r} (got {[s.get('name') for s in doc]})")
    status = entry.get("status", {})
    code = int(status.get("code", STATUS_OTHER))
    message = str(status.get("message", ""))
    # The per-repository status carries the detail ("other" at the top, the S3 error here).
    for repo in entry.get("repo", []):
        repo_status = repo.get("status", {})
        if repo_status.get("code", 0) != 0 and repo_status.get("message"):
            message = str(repo_status["message"])
            break
    backups = tuple(
        Backup(
            label=b["label"],
            type=b["type"],
            started=_ts(b["timestamp"]["start"]),
            stopped=_ts(b["timestamp"]["stop"]),
            error=bool(b.get("error", False)),
            size=int(b.get("info", {}).get("size", 0)),
            repo_size=int(b.get("info", {}).get("repository", {}).get("size", 0)),
            wal_start=(b.get("archive") or {}).get("start") or "",
            wal_stop=(b.get("archive") or {}).get("stop") or "",
        )
        for b in entry.get("backup", [])
    )
    archives = entry.get("archive", [])
    return StanzaInfo(
        stanza=stanza,
        status_code=code,
        status_message=message,
        backups=backups,
        archive_min=archives[-1].get("min") if archives else None,
        archive_max=archives[-1].get("max") if archives else None,
    )


def explain(stanza: str, message: str, status_code: int | None = None) -> str:
    """What an operator should do about pgBackRest's `message` (an error line or a stanza status)."""
    hint = ""
    if status_code == STATUS_MISSING_STANZA_PATH or "missing stanza path" in message:
        hint = (
            f"stanza {stanza!r} does not exist in this repository: check RP_PGBACKREST_STANZA and the "
            f"repository (PGBACKREST_REPO1_S3_BUCKET, repo1-path), or create it on the database host "
            f"with `pgbackrest --stanza={stanza} stanza-create`"
        )
    elif status_code == STATUS_MISSING_STANZA_DATA:
        hint = "the stanza's backup.info/archive.info are missing: the repository is damaged or half-deleted"
    elif m := re.search(r"requires option: (\S+)", message):
        option = m.group(1)
        var = "PGBACKREST_" + re.sub(r"[^A-Za-z0-9]", "_", option).upper()
        hint = f"pgBackRest needs option {option}: set {var} in this process's environment (or in its config file)"
        if option.startswith("repo1-s3-key"):
            hint = (
                "no S3 credentials for pgBackRest: set PGBACKREST_REPO1_S3_KEY and PGBACKREST_REPO1_S3_KEY_SECRET "
                "in this process's environment (and in the PostgreSQL server's, for archive_command)"
            )
    elif "HostConnectError" in message or "unable to connect" in message or "unable to get address" in message:
        hint = (
            "cannot reach the S3 endpoint: check PGBACKREST_REPO1_S3_ENDPOINT and PGBACKREST_REPO1_STORAGE_PORT, "
            "and that this host can connect to it"
        )
    elif "unable to verify certificate" in message or "CryptoError" in message:
        hint = (
            "the S3 endpoint's TLS certificate is not trusted: set PGBACKREST_REPO1_STORAGE_CA_FILE to its CA "
            "(verification stays on)"
        )
    elif re.search(r"\b403\b|AccessDenied|SignatureDoesNotMatch|InvalidAccessKeyId", message):
        hint = "S3 refused the credentials: check PGBACKREST_REPO1_S3_KEY / PGBACKREST_REPO1_S3_KEY_SECRET"
    elif re.search(r"\b404\b|NoSuchBucket", message):
        hint = "the bucket does not exist at this endpoint: check PGBACKREST_REPO1_S3_BUCKET and _REGION"
    elif "unable to acquire lock" in message or "held" in message:
        hint = "another pgBackRest command holds the stanza's lock (a backup or expire is running): retry later"
    first_line = message.strip().splitlines()[0] if message.strip() else "no output"
    return f"pgBackRest (stanza {stanza!r}): {first_line}" + (f" -> {hint}" if hint else "")


@dataclass(frozen=True)
class PgBackRest:
    """pgBackRest for one stanza. `env`: the child's whole environment (None: this process's)."""

    stanza: str
    config: Path | None = None
    env: Mapping[str, str] | None = None
    executable: str = "pgbackrest"
    timeout_s: float = 300.0
    #: Prefix for the command (e.g. ["runuser", "-u", "postgres", "--"]); empty: run directly.
    prefix: tuple[str, ...] = ()
    #: pgBackRest's --io-timeout (None: its default, 60 s). An unreachable endpoint costs about
    #: four times this before pgBackRest gives up (it retries the connection).
    io_timeout_s: float | None = None

    def _argv(self, *args: str) -> list[str]:
        argv = [*self.prefix, self.executable]
        if self.config is not None:
            argv.append(f"--config={self.config}")
        if self.io_timeout_s is not None:
            argv.append(f"--io-timeout={self.io_timeout_s:g}")
        return [*argv, f"--stanza={self.stanza}", *args]

    def run(self, *args: str, timeout_s: float | None = None) -> str:
        """Run a pgBackRest command; its stdout, or BackupError explaining a failure."""
        if self.config is not None and not Path(self.config).is_file():
            raise BackupError(
                f"pgBackRest config {self.config} does not exist: set RP_PGBACKREST_CONFIG to the deployed "
                "pgbackrest.conf (deploy/pgbackrest/pgbackrest.conf)"
            )
        argv = self._argv(*args)
        timeout = timeout_s or self.timeout_s
        logger.info("running %s", " ".join(argv))
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=dict(self.env) if self.env is not None else None,
                cwd="/",
            )
        except FileNotFoundError:
            raise BackupError(
                f"{self.executable!r} is not installed on this host: apt-get install pgbackrest (Debian ships 2.45)"
            ) from None
        except subprocess.TimeoutExpired:
            raise BackupError(
                f"pgbackrest {' '.join(args)} did not finish in {timeout:.0f} s: the S3 endpoint may be unreachable "
                "or slow; check PGBACKREST_REPO1_S3_ENDPOINT and the network"
            ) from None
        if proc.returncode != 0:
            message = (proc.stderr.strip() or proc.stdout.strip()).removeprefix("ERROR: ")
            raise BackupError(explain(self.stanza, f"{message} (exit code {proc.returncode})"))
        return proc.stdout

    def info(self) -> StanzaInfo:
        """The stanza's backups; BackupError when the stanza or the repository is unusable.

        A stanza that exists but has no backup yet is not an error here (its `backups` is empty).
        """
        info = parse_info(self.stanza, self.run("info", "--output=json", timeout_s=120))
        if info.status_code not in (STATUS_OK, STATUS_NO_BACKUP):
            raise BackupError(explain(self.stanza, info.status_message, info.status_code))
        return info

    def verify(self) -> VerifyReport:
        """`pgbackrest verify`: every backup and WAL file in the repository read back and checksummed."""
        self.info()  # fails fast, with a hint, on a wrong stanza or an unreachable repository
        text = self.run("verify", "--output=text", "--verbose", timeout_s=max(self.timeout_s, 600))
        return parse_verify(self.stanza, text)

    def backup(self, kind: str = "diff") -> None:
        """Take a backup (full, diff or incr); pgBackRest expires old ones per its retention."""
        if kind not in ("full", "diff", "incr"):
            raise ValueError(f"backup type must be full, diff or incr, got {kind!r}")
        self.run(f"--type={kind}", "backup", timeout_s=max(self.timeout_s, 3600))


def parse_verify(stanza: str, text: str) -> VerifyReport:
    """A VerifyReport from `pgbackrest verify --output=text`."""
    statuses = re.findall(r"^\s*status:\s*(\S+)", text, flags=re.MULTILINE)
    problems = tuple(
        line.strip()
        for line in text.splitlines()
        if re.search(
            r"No usable|^\s*status: (?!ok\b)|, status: (?!valid\b)|(?:missing|checksum invalid|size invalid|other): [1-9]",
            line,
        )
    )
    ok = bool(statuses) and all(s == "ok" for s in statuses) and not problems
    if not statuses:
        problems = (f"pgbackrest verify printed no report for stanza {stanza!r}",)
    return VerifyReport(stanza=stanza, ok=ok, text=text, problems=problems)
