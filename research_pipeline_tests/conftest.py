"""Shared fixtures: real databases (SQLite and PostgreSQL), the embedding model, a real S3 endpoint.

Plain helpers and paths (the shared data, the demo corpus) live in research_pipeline_tests.shared.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share two cores: one torch/BLAS thread each avoids oversubscription
    # (two threads per worker made a query embedding 10x slower). Set before torch and numpy
    # are imported (research_pipeline_tests.shared imports numpy through lib/release).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from research_pipeline.lib.core import store  # noqa: E402
from research_pipeline_tests.shared import (  # noqa: E402
    PG_ADMIN_URL,
    TEST_CREDENTIALS,
    MotoServer,
    drop_pg_database,
    make_pg_database,
    pg_admin,
)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of the real PostgreSQL on 127.0.0.1:5432 (the test fails if it is down)."""
    with pg_admin().connect() as conn:
        conn.execute(sa.text("select 1"))
    return PG_ADMIN_URL


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


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """The HTTP endpoint of a real (moto) S3 server shared by the tests of one module."""
    saved = {k: os.environ.get(k) for k in TEST_CREDENTIALS}
    os.environ.update(TEST_CREDENTIALS)
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server.start()
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
