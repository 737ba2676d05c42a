"""Through a real dagster-daemon: an asset backfill of all 16 chunk_embeddings shards launched over GraphQL.

Starts the deployed topology on loopback (gRPC code server, webserver, daemon on PostgreSQL
storage, as test_topology does), with a corpus of one real paper ingested and chunked
beforehand. `launchPartitionBackfill` asks for every shard; the daemon's backfill loop splits it
into runs of 2 shards (the asset's BackfillPolicy), each run handles its partition range, and the
test waits until the backfill completes, then checks over GraphQL that 16 of 16 partitions are
materialized and in the corpus database that every chunk text has its vector.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.error

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.ingest.chunking import chunk_documents
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import sources_for
from research_pipeline_tests.shared import (
    BIN,
    DEMO_PAPERS,
    RELOAD_MUTATION,
    REPO,
    WORKSPACE_QUERY,
    drop_pg_database,
    free_port,
    graphql,
    make_pg_database,
    port_open,
    stop_process_groups,
    wait_for,
    webserver_up,
    write_deployed_instance,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BACKFILL_MUTATION = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}
"""

BACKFILL_QUERY = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status numPartitions }
  }
}
"""

PARTITIONS_QUERY = """
query Partitions {
  assetNodeOrError(assetKey: {path: ["chunk_embeddings"]}) {
    __typename
    ... on AssetNode { partitionStats { numMaterialized numPartitions numFailed numMaterializing } }
  }
}
"""


def test_a_16_shard_backfill_through_the_daemon_materializes_every_shard(tmp_path, pg_server, embedder):
    dagster_db = make_pg_database("rp_daemon")
    procs: dict[str, subprocess.Popen] = {}
    corpus_url = f"sqlite:///{tmp_path / 'rp' / 'rp.db'}"
    try:
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        paper = min(DEMO_PAPERS.glob("*.pdf"), key=lambda p: p.stat().st_size)
        shutil.copy(paper, inbox / paper.name)
        (tmp_path / "rp").mkdir()
        corpus = store.make_engine(corpus_url)
        store.create_schema(corpus)
        ingest(corpus, sources_for(inbox), workers=1, ocr=False)
        chunk_documents(corpus, embedder.count_tokens)

        home = tmp_path / "dagster_home"
        home.mkdir()
        write_deployed_instance(home)
        pg = sa.engine.make_url(dagster_db)
        grpc_port, web_port = free_port(), free_port()
        (tmp_path / "workspace.yaml").write_text(
            f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {grpc_port}\n"
            f"      location_name: research_pipeline\n"
        )
        env = dict(
            os.environ,
            DAGSTER_HOME=str(home),
            DAGSTER_PG_HOST=pg.host or "127.0.0.1",
            DAGSTER_PG_DB=pg.database,
            DAGSTER_PG_USERNAME=pg.username or "postgres",
            DAGSTER_PG_PASSWORD=pg.password or "unused",
            RP_HOME=str(tmp_path / "rp"),
            RP_INBOX=str(inbox),
            RP_DATABASE_URL=corpus_url,
            RP_OBJECT_STORE_URL=str(tmp_path / "objects"),
        )
        logs = tmp_path / "logs"
        logs.mkdir()

        def start(name: str, *args: str) -> None:
            out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            procs[name] = subprocess.Popen(
                list(args), cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

        start("grpc", str(BIN / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(grpc_port),
              "-m", "research_pipeline.definitions", "-d", str(REPO))
        wait_for(lambda: port_open(grpc_port), 120, "the gRPC code server", procs)
        start("webserver", str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port),
              "-w", str(tmp_path / "workspace.yaml"))
        start("daemon", str(BIN / "dagster-daemon"), "run", "-w", str(tmp_path / "workspace.yaml"))
        try:
            wait_for(lambda: webserver_up(web_port), 90, "the webserver", procs)

            def location_loaded():
                try:
                    data = graphql(web_port, WORKSPACE_QUERY)["workspaceOrError"]
                except urllib.error.HTTPError as exc:
                    if exc.code < 500:
                        raise
                    return None
                entry = next((e for e in data.get("locationEntries", []) if e["name"] == "research_pipeline"), None)
                loc = entry and entry["locationOrLoadError"]
                if loc and loc["__typename"] == "PythonError":
                    if "UNAVAILABLE" not in loc["message"]:
                        pytest.fail(f"code location failed to load: {loc['message']}")
                    graphql(web_port, RELOAD_MUTATION, {"name": "research_pipeline"})
                    return None
                return loc if loc and loc["__typename"] == "RepositoryLocation" else None

            wait_for(location_loaded, 90, "the code location over gRPC", procs)
            launched = graphql(
                web_port,
                BACKFILL_MUTATION,
                {
                    "params": {
                        "assetSelection": [{"path": ["chunk_embeddings"]}],
                        "partitionNames": list(store.SHARDS),
                        "fromFailure": False,
                    }
                },
            )["launchPartitionBackfill"]
            assert launched["__typename"] == "LaunchBackfillSuccess", launched
            backfill_id = launched["backfillId"]

            def done():
                result = graphql(web_port, BACKFILL_QUERY, {"id": backfill_id})["partitionBackfillOrError"]
                return result if result["status"] in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED") else None

            backfill = wait_for(done, 900, f"backfill {backfill_id}", procs)
            stats = graphql(web_port, PARTITIONS_QUERY)["assetNodeOrError"]["partitionStats"]
            assert backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), (backfill, (logs / "daemon.log").read_text()[-4000:])
            assert stats["numPartitions"] == 16
            assert stats["numMaterialized"] == 16 and stats["numFailed"] == 0
            runs = sa.create_engine(dagster_db)
            with runs.connect() as conn:
                n_runs = conn.execute(sa.text("select count(*) from runs where status = 'SUCCESS'")).scalar()
            runs.dispose()
            assert n_runs == 8, "the backfill policy puts 2 shards in each run"
        finally:
            stop_process_groups(procs)

        c, e = store.chunks, store.embeddings
        with corpus.connect() as conn:
            texts = set(conn.execute(sa.select(c.c.content_hash)).scalars())
            vectors = set(conn.execute(sa.select(e.c.content_hash).where(e.c.model_id == embedder.model_id)).scalars())
        assert texts and texts == vectors
        corpus.dispose()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        drop_pg_database(dagster_db)
