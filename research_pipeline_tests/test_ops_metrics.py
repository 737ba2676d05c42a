"""The pipeline's Prometheus collectors: memory limit, run failures, gate verdicts, publish time."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from research_pipeline.lib.core import store
from research_pipeline.ops.metrics import (
    MemoryLimitCollector,
    PipelineCollector,
    memory_limit_bytes,
    replica_lag_seconds,
)


def _samples(collector) -> dict[tuple[str, tuple], float]:  # noqa: ANN001
    registry = CollectorRegistry()
    registry.register(collector)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_memory_limit_prefers_the_cgroup_and_falls_back_to_ram(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree: 10 kB\n")
    v2 = tmp_path / "memory.max"
    v2.write_text("512000\n")
    assert memory_limit_bytes([v2], meminfo) == 512000
    v2.write_text("max\n")
    assert memory_limit_bytes([v2], meminfo) == 1000 * 1024
    v1 = tmp_path / "limit_in_bytes"
    v1.write_text(str(2**63 - 4096))  # cgroup v1's "unlimited"
    assert memory_limit_bytes([tmp_path / "absent", v1], meminfo) == 1000 * 1024


def test_memory_limit_of_this_process_is_real():
    limit = memory_limit_bytes()
    with open("/proc/meminfo") as fh:
        total = int(fh.readline().split()[1]) * 1024
    assert 0 < limit <= total
    assert _samples(MemoryLimitCollector())[("rp_memory_limit_bytes", ())] == limit


@dg.asset
def paper_count() -> int:
    return 1


@dg.asset_check(asset=paper_count, name="paper_count_volume")
def volume_gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description="too few papers")


@dg.asset_check(asset=paper_count, name="paper_count_latency")
def latency_gate() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


@dg.op
def broken_step() -> None:
    raise RuntimeError("boom")


@dg.job
def broken_job() -> None:
    broken_step()


def test_run_failures_and_gate_verdicts_come_from_the_dagster_instance(tmp_path):
    checks = [dg.AssetCheckKey(dg.AssetKey("paper_count"), n) for n in ("paper_count_volume", "paper_count_latency",
                                                                        "paper_count_never_ran")]
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        collector = PipelineCollector(lambda: instance, None, checks)
        before = _samples(collector)
        assert not any(name == "rp_release_gate_passed" for name, _ in before)
        for _ in range(2):
            assert not broken_job.execute_in_process(instance=instance, raise_on_error=False).success
        dg.materialize([paper_count, volume_gate, latency_gate], instance=instance)
        after = _samples(collector)
    assert after[("rp_dagster_runs_failed_total", (("job", "broken_job"),))] == 2
    assert after[("rp_release_gate_passed", (("check", "paper_count_volume"),))] == 0
    assert after[("rp_release_gate_passed", (("check", "paper_count_latency"),))] == 1
    assert ("rp_release_gate_passed", (("check", "paper_count_never_ran"),)) not in after, "absent, not a verdict"
    assert after[("rp_pipeline_exporter_source_up", (("source", "dagster"),))] == 1


def test_an_unreadable_instance_is_reported_not_raised():
    def broken():  # noqa: ANN202
        raise OSError("storage down")

    samples = _samples(PipelineCollector(broken, None))
    assert samples[("rp_pipeline_exporter_source_up", (("source", "dagster"),))] == 0


def test_publish_time_and_replica_lag_from_the_corpus_database(db_url):
    engine = store.make_engine(db_url)
    store.create_schema(engine)
    collector = PipelineCollector(None, engine)
    assert not any(name == "rp_live_generation_published_timestamp_seconds" for name, _ in _samples(collector))
    when = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)
    g = store.index_generations
    row = {c.name: None for c in g.columns}
    row.update(gen_id="g1", status="published", created_at=when, published_at=when)
    for c in g.columns:
        if row[c.name] is None and not c.nullable:
            row[c.name] = 0 if isinstance(c.type, (sa.Integer, sa.Float)) else ""
    with engine.begin() as conn:
        conn.execute(g.insert(), [row])
        conn.execute(store.index_pointer.insert(), [{"name": "live", "gen_id": "g1", "updated_at": when}])
    samples = _samples(collector)
    assert samples[("rp_live_generation_published_timestamp_seconds", ())] == pytest.approx(when.timestamp())
    # Both test databases are primaries: no lag series (the standby case runs in the rehearsal).
    assert replica_lag_seconds(engine) is None
    assert not any(name == "rp_replica_lag_seconds" for name, _ in samples)
    engine.dispose()
