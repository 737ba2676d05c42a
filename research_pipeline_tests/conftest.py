"""Shared fixtures: real databases (SQLite and PostgreSQL), the shared data, the demo corpus."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RP_SHARED_DATA", REPO.parent / "shared" / "data"))
PAPERS = SHARED_DATA / "papers"
HOSTILE = SHARED_DATA / "hostile"
IR = SHARED_DATA / "ir"
DEMO_PAPERS = REPO / "examples" / "papers"
PG_ADMIN_URL = os.environ.get("RP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share two cores: one torch/BLAS thread each avoids oversubscription
    # (two threads per worker made a query embedding 10x slower). Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def _pg_admin() -> sa.Engine:
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of the real PostgreSQL on 127.0.0.1:5432 (the test fails if it is down)."""
    with _pg_admin().connect() as conn:
        conn.execute(sa.text("select 1"))
    return PG_ADMIN_URL


def make_pg_database(prefix: str = "rp_test") -> str:
    """Create a fresh PostgreSQL database and return its URL; drop it with `drop_pg_database`."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _pg_admin().connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    name = sa.engine.make_url(url).database
    with _pg_admin().connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url(pg_server) -> str:
    url = make_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'rp.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database on each backend: the same test runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rp.db'}"
        return
    request.getfixturevalue("pg_server")
    url = make_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def engine(db_url) -> sa.Engine:
    eng = store.make_engine(db_url)
    store.create_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def embedder():
    """The packaged MiniLM on the CPU, loaded once per test process."""
    from research_pipeline.lib.embed.model import load_embedder

    return load_embedder()


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (expected ../shared/data beside the repo)")
    return path
