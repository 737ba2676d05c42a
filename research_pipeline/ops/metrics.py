"""Prometheus collectors that any process of the topology can register.

- `MemoryLimitCollector`: `rp_memory_limit_bytes`, the memory this process may use (its cgroup
  v2/v1 limit, else the machine's RAM), the denominator of the 85% memory alert beside
  prometheus_client's own `process_resident_memory_bytes`.
- `PipelineCollector`: what the pipeline did, read at scrape time from Dagster's instance and the
  corpus database: failed runs by job, the latest verdict of each release gate, when the live
  generation was published, a standby's replication lag, and the embedding backlog (distinct
  chunk texts without a vector for the configured model, by document shard).
Hand-written because no maintained exporter reads Dagster's instance; both are plain collectors
(the prometheus_client protocol) so a scrape never fails because one source is down.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from research_pipeline.lib.core import store

log = logging.getLogger(__name__)

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def memory_limit_bytes(cgroup_files: Sequence[Path] = _CGROUP_LIMITS, meminfo: Path = Path("/proc/meminfo")) -> int:
    """This process's memory limit: the cgroup's, or the machine's RAM where the cgroup sets none."""
    total = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    for path in cgroup_files:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and (total is None or int(raw) < total):
            return int(raw)  # cgroup v1 reports "no limit" as a huge number: the RAM bound wins
        if raw == "max" or raw.isdigit():
            break
    if total is None:
        raise OSError("no cgroup memory limit and no /proc/meminfo")
    return total


class MemoryLimitCollector:
    """`rp_memory_limit_bytes` for this process."""

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("rp_memory_limit_bytes", "memory this process may use (cgroup limit, else RAM)")
        try:
            gauge.add_metric([], memory_limit_bytes())
        except OSError:
            return
        yield gauge


def replica_lag_seconds(engine: sa.Engine) -> float | None:
    """Seconds a PostgreSQL standby is behind (0 when caught up), None on a primary or SQLite."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        in_recovery, lag = conn.execute(
            sa.text(
                "select pg_is_in_recovery(), "
                "case when pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() then 0 "
                "else extract(epoch from now() - pg_last_xact_replay_timestamp()) end"
            )
        ).one()
    return float(lag or 0.0) if in_recovery else None


class PipelineCollector:
    """Run failures, gate verdicts, publish time and replica lag, read when Prometheus scrapes."""

    def __init__(
        self,
        instance: Callable[[], Any] | None,
        engine: sa.Engine | None,
        gate_checks: Sequence[Any] = (),
        embedding_model: Callable[[], str | None] | None = None,
    ):
        self.instance = instance
        self.engine = engine
        self.gate_checks = list(gate_checks)
        # The model id the configured embedder writes under (None: no run has recorded it yet).
        self.embedding_model = embedding_model

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("rp_pipeline_exporter_source_up", "1 when the source answered this scrape",
                               labels=["source"])
        if self.instance is not None:
            try:
                yield from self._dagster(self.instance())
                up.add_metric(["dagster"], 1)
            except Exception:  # noqa: BLE001 - a scrape must not fail because Dagster's storage is down
                log.warning("dagster instance unreadable at scrape", exc_info=True)
                up.add_metric(["dagster"], 0)
        if self.engine is not None:
            try:
                yield from self._corpus(self.engine)
                yield from self._backlog(self.engine)
                up.add_metric(["database"], 1)
            except Exception:  # noqa: BLE001 - same for the corpus database
                log.warning("corpus database unreadable at scrape", exc_info=True)
                up.add_metric(["database"], 0)
        yield up

    def _dagster(self, instance: Any) -> Iterator[Metric]:
        from dagster import DagsterRunStatus, RunsFilter
        from dagster._core.storage.asset_check_execution_record import (
            AssetCheckExecutionRecordStatus,
        )

        failed = Counter(
            r.dagster_run.job_name
            for r in instance.get_run_records(filters=RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
        )
        runs = CounterMetricFamily("rp_dagster_runs_failed", "runs that ended in failure, by job", labels=["job"])
        for job, n in sorted(failed.items()):
            runs.add_metric([job], n)
        yield runs
        gates = GaugeMetricFamily(
            "rp_release_gate_passed", "latest verdict of each release gate (1 passed, 0 failed)", labels=["check"]
        )
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(self.gate_checks)
        for key, record in sorted(latest.items(), key=lambda kv: kv[0].name):
            if record.status == AssetCheckExecutionRecordStatus.SUCCEEDED:
                gates.add_metric([key.name], 1)
            elif record.status == AssetCheckExecutionRecordStatus.FAILED:
                gates.add_metric([key.name], 0)
        yield gates

    def _corpus(self, engine: sa.Engine) -> Iterator[Metric]:
        live = store.live_generation(engine)
        if live is not None and (live.get("published_at") or live.get("live_since")):
            published = GaugeMetricFamily(
                "rp_live_generation_published_timestamp_seconds", "when the live generation went live (unix time)"
            )
            published.add_metric([], (live.get("published_at") or live["live_since"]).timestamp())
            yield published
        lag = replica_lag_seconds(engine)
        if lag is not None:
            gauge = GaugeMetricFamily("rp_replica_lag_seconds", "seconds this standby is behind its primary")
            gauge.add_metric([], lag)
            yield gauge

    def _backlog(self, engine: sa.Engine) -> Iterator[Metric]:
        if self.embedding_model is None:
            return
        try:
            model_id = self.embedding_model()
        except Exception:  # noqa: BLE001 - Dagster's storage down: no backlog rather than a wrong one
            log.warning("embedding model id unreadable at scrape", exc_info=True)
            return
        from research_pipeline.lib.embed.embeddings import backlog

        gauge = GaugeMetricFamily(
            "rp_embedding_backlog_chunks",
            "distinct chunk texts without a vector for the configured model, by document shard "
            "(model_id 'unrecorded': no chunk_embeddings run with this configuration yet, every text counts)",
            labels=["model_id", "shard"],
        )
        for shard, n in backlog(engine, model_id).items():
            gauge.add_metric([model_id or "unrecorded", shard], n)
        yield gauge
