"""replica_failover of `make drill`, small scale: a primary crashes under the pipeline's writes,
its synchronous streaming replica is promoted, the writer is repointed; nothing it was told was
committed is lost and the writes go on (private clusters from bench/topology/pg.py, never 5432)."""

from __future__ import annotations

import pytest

from bench.drill import failover
from bench.topology.pg import make_workdir, remove_workdir

pytestmark = pytest.mark.integration


def test_a_promoted_synchronous_standby_holds_every_acknowledged_write():
    work = make_workdir("rp-fo-test-")
    try:
        drill = failover(work, n_writes=600)
    finally:
        remove_workdir(work)
    assert drill["standby_sync_state"] == "sync", drill
    assert drill["lost_rows"] == 0, drill
    # The crash interrupted the writer at least once, and it finished on the promoted server.
    assert drill["client_errors"] >= 1, drill
    assert drill["acknowledged_before_crash"] >= 300 and drill["acknowledged_after_failover"] >= 300, drill
    assert drill["rows_on_promoted"] == drill["acknowledged_before_crash"] + drill["acknowledged_after_failover"]
    assert drill["passed"], drill
