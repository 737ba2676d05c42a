"""`research-pipeline exporter`: the pipeline's Prometheus endpoint (run failures, gates, lag, backlog).

One small process beside the daemon: it reads Dagster's instance (DAGSTER_HOME) and the corpus
database at each scrape and serves them with process and memory-limit metrics on /metrics.
"""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

from research_pipeline import runtime
from research_pipeline.config import Settings, export_dagster_home
from research_pipeline.ops.metrics import MemoryLimitCollector, PipelineCollector

log = logging.getLogger(__name__)


def gate_check_keys() -> list:
    """The asset-check keys of the release gates on `vector_index`."""
    import dagster as dg

    from research_pipeline.lib.release.gates import ADVISORY_GATES, BLOCKING_GATES

    return [dg.AssetCheckKey(dg.AssetKey("vector_index"), f"vector_index_{g}") for g in (*BLOCKING_GATES, *ADVISORY_GATES)]


def build_registry(settings: Settings) -> CollectorRegistry:
    """A registry with process, memory-limit and pipeline collectors for this deployment."""
    import dagster as dg

    export_dagster_home(settings.dagster_home)
    holder: dict = {}

    def instance():  # noqa: ANN202 - opened on the first scrape, then reused
        if "instance" not in holder:
            holder["instance"] = dg.DagsterInstance.get()
        return holder["instance"]

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(MemoryLimitCollector())
    engine = runtime.make_engine(settings.database_url, create_schema=False)
    from research_pipeline.defs.embeddings.assets import recorded_model_id

    embedder_config = f"{settings.model}@{settings.device}"  # the key chunk_embeddings records
    registry.register(
        PipelineCollector(instance, engine, gate_check_keys(), lambda: recorded_model_id(instance(), embedder_config))
    )
    return registry


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 9108) -> None:
    """Serve /metrics until SIGTERM or SIGINT."""
    server, thread = start_http_server(port, addr=host, registry=build_registry(settings))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("pipeline exporter on http://%s:%d/metrics", host, server.server_port)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        thread.join(timeout=5)
