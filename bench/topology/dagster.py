"""Dagster's deployed trio on loopback: gRPC code server, webserver and daemon on PostgreSQL storage.

The instance file is deploy/dagster.prod.yaml with the rehearsal's PostgreSQL port and a
migration tag limit below the global run limit (the queued run coordinator enforces both; the
rehearsal measures how many migration runs overlapped). The code server's environment is the
deployment's configuration: `restart_code_server(env)` is the operator's "point the deployment
at the target and restart it" after the cutover. Runs are launched over GraphQL only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from bench.topology.proc import INTERNAL_HOST, Proc, free_port, http_ok, poll, port_open

REPO = Path(__file__).resolve().parents[2]
PROD_INSTANCE = REPO / "deploy" / "dagster.prod.yaml"
LOCATION = "research_pipeline"
MIGRATION_TAG = "research_pipeline/migration"
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
BACKFILL_DONE = ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED")

WORKSPACE_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on RepositoryLocation { name repositories { name jobs { name } } }
                        ... on PythonError { message } } } } } }
"""
RELOAD_MUTATION = """
mutation Reload($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name) { __typename } }
"""
LAUNCH_MUTATION = """
mutation Launch($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId status } } ... on PythonError { message }
  ... on InvalidSubsetError { message } ... on RunConfigValidationInvalid { errors { message } } } }
"""
RUN_QUERY = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename
  ... on Run { status startTime endTime tags { key value } } } }
"""
RUNS_QUERY = """
query Runs($filter: RunsFilter!) { runsOrError(filter: $filter) { __typename
  ... on Runs { results { runId jobName status startTime endTime } } } }
"""
BACKFILL_MUTATION = """
mutation Backfill($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  ... on InvalidSubsetError { message } } }
"""
BACKFILL_QUERY = """
query Backfill($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
  ... on PartitionBackfill { status numPartitions } } }
"""
LOGS_QUERY = """
query Logs($runId: ID!) { logsForRun(runId: $runId) { __typename
  ... on EventConnection { events { __typename ... on MessageEvent { message level } } } } }
"""
PARTITIONS_QUERY = """
query Partitions($path: [String!]!) { assetNodeOrError(assetKey: {path: $path}) { __typename
  ... on AssetNode { partitionStats { numMaterialized numPartitions numFailed numMaterializing } } } }
"""


class DagsterError(RuntimeError):
    """A GraphQL call failed, or a run or backfill did not succeed."""


def instance_yaml(pg_host: str, pg_port: int, max_runs: int = 4, migration_limit: int = 2) -> str:
    """deploy/dagster.prod.yaml with the cluster's port and the rehearsal's run limits."""
    if migration_limit >= max_runs:
        raise ValueError("the migration tag limit must be below the global run limit")
    config = yaml.safe_load(PROD_INSTANCE.read_text())
    db = config["storage"]["postgres"]["postgres_db"]
    db["port"] = pg_port
    db["hostname"] = pg_host  # the same value DAGSTER_PG_HOST carries; the file takes env or value
    coordinator = config["run_coordinator"]["config"]
    coordinator["max_concurrent_runs"] = max_runs
    coordinator["tag_concurrency_limits"] = [{"key": MIGRATION_TAG, "limit": migration_limit}]
    return yaml.safe_dump(config, sort_keys=False)


class Dagster:
    """The three processes plus a GraphQL client of the webserver."""

    def __init__(self, workdir: Path, log_dir: Path, base_env: dict, pg_host: str, pg_port: int,
                 pg_db: str, max_runs: int = 4, migration_limit: int = 2, host: str = INTERNAL_HOST):
        self.workdir, self.log_dir, self.host = Path(workdir), Path(log_dir), host
        self.home = self.workdir / "dagster_home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(instance_yaml(pg_host, pg_port, max_runs, migration_limit))
        self.max_runs, self.migration_limit = max_runs, migration_limit
        self.grpc_port, self.web_port = free_port(host), free_port(host)
        self.workspace = self.workdir / "workspace.yaml"
        self.workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
            "host": host, "port": self.grpc_port, "location_name": LOCATION}}]}))
        self.env = {**base_env, "DAGSTER_HOME": str(self.home), "DAGSTER_PG_HOST": pg_host,
                    "DAGSTER_PG_DB": pg_db, "DAGSTER_PG_USERNAME": "postgres",
                    # Trust authentication on the private cluster ignores it; the instance file needs one.
                    "DAGSTER_PG_PASSWORD": "rehearsal-trust"}
        self.grpc: Proc | None = None
        self.webserver: Proc | None = None
        self.daemon: Proc | None = None
        self._restarts = 0
        self.repo_name = "__repository__"

    # -- processes -----------------------------------------------------------------------------

    def code_server(self, env: dict) -> Proc:
        name = "dagster_grpc" if not self._restarts else f"dagster_grpc_{self._restarts}"
        host, port = self.host, self.grpc_port
        return Proc(name, [Path(self._bin("dagster")), "api", "grpc", "-h", host, "-p", str(port),
                           "-m", "research_pipeline.definitions", "-d", str(REPO)],
                    self.log_dir, env={**self.env, **env}, cwd=self.workdir,
                    ready=lambda: port_open(host, port), ready_timeout_s=180)

    def processes(self, code_env: dict) -> list[Proc]:
        """The code server, webserver and daemon (not started)."""
        self.grpc = self.code_server(code_env)
        host, port = self.host, self.web_port
        self.webserver = Proc("dagster_webserver", [self._bin("dagster-webserver"), "-h", host, "-p", str(port),
                                                    "-w", str(self.workspace)], self.log_dir, env=self.env,
                              cwd=self.workdir, ready=lambda: http_ok(host, port, "/server_info"),
                              ready_timeout_s=180)
        self.daemon = Proc("dagster_daemon", [self._bin("dagster-daemon"), "run", "-w", str(self.workspace)],
                           self.log_dir, env=self.env, cwd=self.workdir)
        return [self.grpc, self.webserver, self.daemon]

    @staticmethod
    def _bin(name: str) -> str:
        import sys

        return str(Path(sys.executable).parent / name)

    def restart_code_server(self, env: dict) -> Proc:
        """Stop the code server and start it with `env` (new deployment configuration); reload."""
        assert self.grpc is not None
        self.grpc.stop()
        self._restarts += 1
        self.grpc = self.code_server(env).start()
        self.grpc.wait_ready()
        self.wait_location()
        return self.grpc

    def alive(self) -> list[Proc]:
        return [p for p in (self.grpc, self.webserver, self.daemon) if p is not None]

    # -- GraphQL -------------------------------------------------------------------------------

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"http://{self.host}:{self.web_port}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read())
        if out.get("errors"):
            raise DagsterError(f"GraphQL errors: {out['errors']}")
        return out["data"]

    def wait_location(self, timeout_s: float = 180) -> dict:
        """Wait until the webserver has loaded the code location over gRPC (asking for reloads)."""

        def loaded():
            try:
                data = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    raise
                return None
            except (urllib.error.URLError, OSError):
                return None
            entry = next((e for e in data.get("locationEntries", []) if e["name"] == LOCATION), None)
            loc = entry and entry["locationOrLoadError"]
            if loc and loc["__typename"] == "PythonError":
                if "UNAVAILABLE" not in loc["message"] and "failed to connect" not in loc["message"].lower():
                    raise DagsterError(f"code location failed to load: {loc['message'][:2000]}")
                self.graphql(RELOAD_MUTATION, {"name": LOCATION})
                return None
            return loc if loc and loc["__typename"] == "RepositoryLocation" else None

        loc = poll(loaded, timeout_s, "the code location over gRPC", self.alive())
        self.repo_name = loc["repositories"][0]["name"]
        return loc

    def launch(self, job: str, run_config: dict | None = None, tags: dict | None = None) -> str:
        params = {
            "selector": {"repositoryLocationName": LOCATION, "repositoryName": self.repo_name, "jobName": job},
            "runConfigData": run_config or {},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
        }
        out = self.graphql(LAUNCH_MUTATION, {"params": params})["launchRun"]
        if out["__typename"] != "LaunchRunSuccess":
            raise DagsterError(f"launching {job} failed: {out}")
        return out["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        return self.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]["status"]

    def wait_runs(self, run_ids: list[str], timeout_s: float) -> dict[str, str]:
        """Final status of every run (polled through the webserver, so only the daemon moves them)."""
        final: dict[str, str] = {}

        def done():
            for run_id in run_ids:
                if run_id not in final:
                    status = self.run_status(run_id)
                    if status in FINISHED:
                        final[run_id] = status
            return len(final) == len(run_ids)

        poll(done, timeout_s, f"{len(run_ids)} run(s) to finish", self.alive())
        return final

    def failure_messages(self, run_id: str, n: int = 3) -> list[str]:
        """The last `n` ERROR-level messages of a run's event log (why it failed)."""
        logs = self.graphql(LOGS_QUERY, {"runId": run_id})["logsForRun"]
        events = logs.get("events", []) if isinstance(logs, dict) else []
        errors = [e["message"] for e in events if e.get("level") == "ERROR" and e.get("message")]
        return [m[:500] for m in errors[-n:]]

    def runs(self, tags: dict | None = None) -> list[dict]:
        flt = {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}
        return self.graphql(RUNS_QUERY, {"filter": flt})["runsOrError"]["results"]

    def backfill(self, asset: str, partitions: list[str]) -> str:
        params = {"assetSelection": [{"path": [asset]}], "partitionNames": partitions, "fromFailure": False}
        out = self.graphql(BACKFILL_MUTATION, {"params": params})["launchPartitionBackfill"]
        if out["__typename"] != "LaunchBackfillSuccess":
            raise DagsterError(f"launching the backfill of {asset} failed: {out}")
        return out["backfillId"]

    def wait_backfill(self, backfill_id: str, timeout_s: float) -> dict:
        def done():
            out = self.graphql(BACKFILL_QUERY, {"id": backfill_id})["partitionBackfillOrError"]
            return out if out.get("status") in BACKFILL_DONE else None

        return poll(done, timeout_s, f"backfill {backfill_id}", self.alive())

    def partition_stats(self, asset: str) -> dict:
        return self.graphql(PARTITIONS_QUERY, {"path": [asset]})["assetNodeOrError"]["partitionStats"]


def max_overlap(runs: list[dict]) -> int:
    """The most runs that were executing at the same moment (from their start and end times)."""
    events = []
    for run in runs:
        if run.get("startTime") and run.get("endTime"):
            events += [(run["startTime"], 1), (run["endTime"], -1)]
    peak = current = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        current += delta
        peak = max(peak, current)
    return peak
