"""The one reader of the environment: every setting of a deployment, typed, with its default.

Every value has an embedded default (SQLite and local files under `RP_HOME`, the packaged
model), so a fresh checkout runs with no configuration. The Dagster resources
(`research_pipeline.defs.resources`), the CLI and the search service all take their values from
`Settings.from_env()`; nothing else reads `os.environ`. A bad value raises `ConfigError`, whose
message names the variable and says what is expected.

Gate thresholds are declared once, as the fields of `lib/release/thresholds.GateThresholds`; each is
read from `RP_GATE_<FIELD>` (or the name in the field's `env` metadata).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from research_pipeline.lib.embed import DEFAULT_MODEL
from research_pipeline.lib.release.thresholds import GateThresholds

DEFAULT_NIGHTLY_CRON = "0 2 * * *"
DEFAULT_KEEP_GENERATIONS = 3
REPO_ROOT = Path(__file__).resolve().parents[1]

# Code cannot download weights: the model libraries stay offline in every process that loads
# this package (set before transformers is imported; an explicit value wins).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable and what it expects."""


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def _int(minimum: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
        return value

    return parse


def _float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def _seconds(allow_zero: bool) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        value = _float(name, raw)
        if not math.isfinite(value) or not (value >= 0 if allow_zero else value > 0):
            raise ConfigError(f"{name}={raw!r} must be a finite number of seconds {'>= 0' if allow_zero else 'above 0'}")
        return value

    return parse


def _device(name: str, raw: str) -> str:
    if raw in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", raw):
        return raw
    raise ConfigError(f"{name} must be 'cpu' or 'cuda[:N]', got {raw!r}")


def _database_url(name: str, raw: str) -> str:
    import sqlalchemy as sa

    try:
        url = sa.engine.make_url(raw)
    except sa.exc.ArgumentError:
        raise ConfigError(
            f"{name} is not a SQLAlchemy URL: {raw!r} "
            "(expected e.g. sqlite:///path/rp.db or postgresql+psycopg://user@host/db)"
        ) from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"{name} must be a sqlite:// or postgresql:// URL, got {url.get_backend_name()!r}")
    return raw


def _url(schemes: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        scheme = raw.split("://", 1)[0] if "://" in raw else ""
        if scheme not in schemes:
            raise ConfigError(f"{name} must be a {' or '.join(s + '://' for s in schemes)} URL, got {raw!r}")
        return raw

    return parse


def _cron(name: str, raw: str) -> str:
    if len(raw.split()) != 5:
        raise ConfigError(f"{name}={raw!r} is not a five-field cron expression (e.g. '0 2 * * *')")
    return raw


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parse


def _text(name: str, raw: str) -> str:
    return raw


@dataclass(frozen=True)
class MigrationTarget:
    """Where `migration_job` writes: a PostgreSQL URL and an S3 bucket and key prefix (empty: unset)."""

    database_url: str = ""
    bucket: str = ""
    prefix: str = ""


@dataclass(frozen=True)
class AwsCredentials:
    """Explicit AWS settings; None falls back to boto3's default chain (profile, instance role)."""

    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None


#: The newest PostgreSQL backup may be this old before backup_fresh fails: a daily backup plus 2 h.
DEFAULT_BACKUP_MAX_AGE_S = 26 * 3600.0
DEFAULT_BACKUP_CHECK_CRON = "0 6 * * *"


@dataclass(frozen=True)
class BackupSettings:
    """pgBackRest backups of the PostgreSQL cluster; an empty stanza: not configured (no checks)."""

    stanza: str = ""
    config: Path | None = None  # None: pgBackRest's default, /etc/pgbackrest/pgbackrest.conf
    max_age_s: float = DEFAULT_BACKUP_MAX_AGE_S
    check_cron: str = DEFAULT_BACKUP_CHECK_CRON


@dataclass(frozen=True)
class Settings:
    """The configuration of one deployment, resolved from the environment."""

    home: Path
    inbox: Path
    database_url: str
    object_store_url: str
    s3_endpoint_url: str | None = None
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    embed_precision: str = "auto"
    redis_url: str | None = None
    #: Where the search service writes query_log rows; None: database_url. Set it on replicas that
    #: read from a read-only standby, to the primary.
    query_log_database_url: str | None = None
    retracted_file: Path | None = None
    keep_generations: int = DEFAULT_KEEP_GENERATIONS
    nightly_cron: str = DEFAULT_NIGHTLY_CRON
    #: Seconds between ticks of every sensor (None: each sensor's own default).
    sensor_interval_s: int | None = None
    log_format: str = "text"
    log_level: str = "INFO"
    dagster_home: Path | None = None  # None: $RP_HOME/dagster
    search_concurrency: int | None = None  # None: one search thread per usable core, at least 2
    search_queue: int = 16
    search_timeout_s: float = 10.0
    search_drain_s: float = 5.0
    gates: GateThresholds = field(default_factory=GateThresholds)
    migration: MigrationTarget = field(default_factory=MigrationTarget)
    aws: AwsCredentials = field(default_factory=AwsCredentials)
    backup: BackupSettings = field(default_factory=BackupSettings)
    #: The variables that were set (name -> raw value), so Dagster can show them as EnvVar.
    set_variables: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every setting from `env` (default: the process environment), defaults for the rest."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for var in VARIABLES:
            raw = env.get(var.name, "")
            if raw != "":
                values[var.name] = var.parse(var.name, raw)
        home = values.get("RP_HOME", Path(".rp").resolve())
        gate_values = {}
        for f in dataclasses.fields(GateThresholds):
            name = gate_variable(f)
            raw = env.get(name, "")
            if raw != "":
                cast = _int() if isinstance(f.default, int) else _float
                gate_values[f.name] = cast(name, raw)
        return cls(
            home=home,
            inbox=values.get("RP_INBOX", REPO_ROOT / "examples" / "papers"),
            database_url=values.get("RP_DATABASE_URL", f"sqlite:///{home / 'rp.db'}"),
            object_store_url=values.get("RP_OBJECT_STORE_URL", str(home / "objects")),
            dagster_home=values.get("DAGSTER_HOME", home / "dagster"),
            s3_endpoint_url=values.get("RP_S3_ENDPOINT_URL"),
            model=values.get("RP_MODEL", DEFAULT_MODEL),
            device=values.get("RP_DEVICE", "cpu"),
            embed_precision=values.get("RP_EMBED_PRECISION", "auto"),
            redis_url=values.get("RP_REDIS_URL"),
            query_log_database_url=values.get("RP_QUERY_LOG_DATABASE_URL"),
            retracted_file=values.get("RP_RETRACTED_FILE"),
            keep_generations=values.get("RP_KEEP_GENERATIONS", DEFAULT_KEEP_GENERATIONS),
            nightly_cron=values.get("RP_NIGHTLY_CRON", DEFAULT_NIGHTLY_CRON),
            sensor_interval_s=values.get("RP_SENSOR_INTERVAL_S"),
            log_format=values.get("RP_LOG_FORMAT", "text"),
            log_level=values.get("RP_LOG_LEVEL", "INFO"),
            search_concurrency=values.get("RP_SEARCH_CONCURRENCY"),
            search_queue=values.get("RP_SEARCH_QUEUE", 16),
            search_timeout_s=values.get("RP_SEARCH_TIMEOUT_S", 10.0),
            search_drain_s=values.get("RP_SEARCH_DRAIN_S", 5.0),
            gates=GateThresholds(**gate_values),
            migration=MigrationTarget(
                database_url=values.get("RP_TARGET_DATABASE_URL", ""),
                bucket=values.get("RP_S3_BUCKET", ""),
                prefix=values.get("RP_S3_PREFIX", ""),
            ),
            aws=AwsCredentials(
                region=values.get("AWS_DEFAULT_REGION"),
                access_key_id=values.get("AWS_ACCESS_KEY_ID"),
                secret_access_key=values.get("AWS_SECRET_ACCESS_KEY"),
                session_token=values.get("AWS_SESSION_TOKEN"),
            ),
            backup=BackupSettings(
                stanza=values.get("RP_PGBACKREST_STANZA", ""),
                config=values.get("RP_PGBACKREST_CONFIG"),
                max_age_s=values.get("RP_BACKUP_MAX_AGE_S", DEFAULT_BACKUP_MAX_AGE_S),
                check_cron=values.get("RP_BACKUP_CHECK_CRON", DEFAULT_BACKUP_CHECK_CRON),
            ),
            set_variables={
                name: env[name]
                for name in [v.name for v in VARIABLES] + [gate_variable(f) for f in dataclasses.fields(GateThresholds)]
                if env.get(name, "") != ""
            },
        )

    def __post_init__(self) -> None:
        if self.dagster_home is None:
            object.__setattr__(self, "dagster_home", self.home / "dagster")

    def is_set(self, name: str) -> bool:
        return name in self.set_variables


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, how it is parsed and what it means (for docs and errors)."""

    name: str
    parse: Callable[[str, str], Any]
    help: str


VARIABLES: tuple[Variable, ...] = (
    Variable("RP_HOME", _path, "home of the embedded deployment (default ./.rp)"),
    Variable("RP_INBOX", _path, "folder of PDFs (recursive) and/or BEIR corpus.jsonl (default examples/papers)"),
    Variable("RP_DATABASE_URL", _database_url, "corpus database (default sqlite:///$RP_HOME/rp.db)"),
    Variable("RP_QUERY_LOG_DATABASE_URL", _database_url,
             "where searches are logged (default RP_DATABASE_URL); the primary, for replicas on a standby"),
    Variable("RP_OBJECT_STORE_URL", _text, "index files: a folder or s3://bucket/prefix (default $RP_HOME/objects)"),
    Variable("RP_S3_ENDPOINT_URL", _url(("http", "https")), "S3-compatible endpoint (MinIO, moto)"),
    Variable("RP_MODEL", _text, "sentence-transformers model: the packaged MiniLM or a local path"),
    Variable("RP_DEVICE", _device, "cpu (default) or cuda[:N]"),
    Variable("RP_EMBED_PRECISION", _choice("auto", "fp32", "bf16"), "embedding numerics: auto picks bf16 where native"),
    Variable("RP_REDIS_URL", _url(("redis", "rediss", "unix")), "shared query cache (default: in-process LRU)"),
    Variable("RP_RETRACTED_FILE", _path, "retracted DOIs / arXiv ids / doc_ids, one per line: kept out of generations"),
    Variable("RP_KEEP_GENERATIONS", _int(minimum=2), "published index generations kept for rollback (default 3)"),
    Variable("RP_NIGHTLY_CRON", _cron, "UTC cron of nightly_reindex (default 0 2 * * *)"),
    Variable("RP_SENSOR_INTERVAL_S", _int(minimum=1), "seconds between sensor ticks (default: 60 inbox, 30 the others)"),
    Variable("RP_LOG_FORMAT", _choice("text", "json"), "log lines of the CLI and the search service"),
    Variable("RP_LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "log level (default INFO)"),
    Variable("RP_SEARCH_CONCURRENCY", _int(minimum=1), "searches run at once per service process (default: cores, >= 2)"),
    Variable("RP_SEARCH_QUEUE", _int(minimum=0), "searches waiting per process before 503 + Retry-After (default 16)"),
    Variable("RP_SEARCH_TIMEOUT_S", _seconds(allow_zero=False), "seconds before a search answers 504 (default 10)"),
    Variable("RP_SEARCH_DRAIN_S", _seconds(allow_zero=True), "seconds in-flight requests may finish after SIGTERM (default 5)"),
    Variable("RP_TARGET_DATABASE_URL", _database_url, "migration target PostgreSQL database"),
    Variable("RP_S3_BUCKET", _text, "migration target bucket"),
    Variable("RP_S3_PREFIX", _text, "migration target key prefix"),
    Variable("DAGSTER_HOME", _path, "Dagster's instance folder (default $RP_HOME/dagster)"),
    Variable("AWS_DEFAULT_REGION", _text, "S3 region"),
    Variable("AWS_ACCESS_KEY_ID", _text, "S3 credentials (default: boto3's chain)"),
    Variable("AWS_SECRET_ACCESS_KEY", _text, "S3 credentials"),
    Variable("AWS_SESSION_TOKEN", _text, "S3 credentials"),
    Variable("RP_PGBACKREST_STANZA", _text, "pgBackRest stanza of the PostgreSQL cluster; set: backup checks on (unset: none)"),
    Variable("RP_PGBACKREST_CONFIG", _path, "pgbackrest.conf (default /etc/pgbackrest/pgbackrest.conf)"),
    Variable("RP_BACKUP_MAX_AGE_S", _seconds(allow_zero=False), "age of the newest backup before backup_fresh fails (default 26 h)"),
    Variable("RP_BACKUP_CHECK_CRON", _cron, "UTC cron of the backup checks (default 0 6 * * *)"),
)


def gate_variable(f: dataclasses.Field) -> str:
    """The environment variable of one GateThresholds field."""
    return f.metadata.get("env") or f"RP_GATE_{f.name.upper()}"


def child_process_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process this package starts: this one's, plus `overrides`."""
    return {**os.environ, **overrides}


def set_process_default(name: str, value: str) -> None:
    """Set a variable for this process and its children unless the user set it (threads of OCR, ...)."""
    os.environ.setdefault(name, value)


def export_dagster_home(path: Path) -> None:
    """Point Dagster (which reads DAGSTER_HOME itself) at `path` for this process."""
    os.environ["DAGSTER_HOME"] = str(path)
