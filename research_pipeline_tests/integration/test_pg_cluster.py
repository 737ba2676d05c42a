"""bench/topology/pg.py: a private PostgreSQL 15 primary and its streaming replica on loopback.

Starts a fresh cluster on a free port (never the machine's 5432), a replica made with
pg_basebackup -R, writes on the primary, reads the row on the replica once it has replayed the
primary's WAL position, promotes the replica and writes to it, and stops both.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from bench.topology.pg import PgCluster, make_workdir, remove_workdir

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir():
    path = make_workdir("rp-pgtest-")
    yield path
    remove_workdir(path)


def test_primary_replica_replay_and_promote(workdir):
    primary = PgCluster(workdir / "primary").init()
    replica = None
    try:
        primary.start()
        assert primary.port != 5432
        eng = primary.engine()
        with eng.begin() as conn:
            conn.execute(sa.text("create table t (id int primary key, v text)"))
            conn.execute(sa.text("insert into t values (1, 'before replica')"))
        replica = primary.make_replica(workdir / "replica").start()
        assert replica.is_in_recovery()
        with eng.begin() as conn:
            conn.execute(sa.text("insert into t values (2, 'after replica')"))
        replica.wait_replayed(primary.current_lsn())
        r_eng = replica.engine()
        with r_eng.connect() as conn:
            rows = conn.execute(sa.text("select id, v from t order by id")).all()
        assert [tuple(r) for r in rows] == [(1, "before replica"), (2, "after replica")]

        eng.dispose()
        primary.stop(mode="immediate")
        replica.promote()
        assert not replica.is_in_recovery()
        with r_eng.begin() as conn:
            conn.execute(sa.text("insert into t values (3, 'on the promoted replica')"))
        with r_eng.connect() as conn:
            assert conn.execute(sa.text("select count(*) from t")).scalar_one() == 3
        r_eng.dispose()
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()
    assert not primary.running() and not replica.running()
