"""The Dagster drills of `make drill`, small scale, on the deployed trio (gRPC code server,
webserver, daemon on a private PostgreSQL): the daemon SIGKILLed during a 16-shard backfill of
chunk_embeddings and started again, then the code server SIGKILLed while a second backfill's run
executes and started again. Both backfills must complete with every shard and every vector."""

from __future__ import annotations

import pytest

from bench import dagster_drills
from bench.topology.pg import make_workdir, remove_workdir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_daemon_killed_and_code_server_restarted_mid_backfill_lose_nothing():
    work = make_workdir("rp-dagster-drills-")
    try:
        daemon, code_server = dagster_drills.run(work, n_records=160, daemon_down_s=5)
    finally:
        remove_workdir(work)
    for drill in (daemon, code_server):
        assert drill["backfill_status"] in ("COMPLETED", "COMPLETED_SUCCESS"), drill
        assert drill["partitions_materialized"] == 16 and drill["lost_rows"] == 0, drill
        assert drill["chunk_texts"] == drill["embedded"] > 0, drill
    assert daemon["runs_finished_before_kill"] < 8, daemon  # the kill came mid-backfill
    assert code_server["runs_executing_at_kill"] >= 1, code_server
    assert set(code_server["executing_at_kill_finished"].values()) == {"SUCCESS"}, code_server
    assert daemon["passed"] and code_server["passed"], (daemon, code_server)
