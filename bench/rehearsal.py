"""`make rehearsal`: the production topology as real processes on loopback, exercised, then stopped.

    .venv/bin/python -m bench.rehearsal [--smoke] [--replicas 3] [--seconds 60] [--keep-logs DIR]

Up: a PostgreSQL primary and a streaming replica (bench/topology/pg.py), a private Redis, moto's
S3 server, Dagster's gRPC code server + webserver + daemon on PostgreSQL storage (queued run
coordinator, migration tag limit below the global limit), N search replicas reading from the
replica behind nginx (deploy/nginx/nginx.conf), the pipeline exporter, Debian's PostgreSQL /
Redis / nginx exporters and Prometheus (deploy/prometheus/alerts.yml loaded).

Full run, what an operator does on day one: build the existing SQLite + local-files deployment
of the demo corpus (`research-pipeline demo`), migrate it to the primary + S3 with 16
`migration_job` runs and `cutover_job` (launched over GraphQL, run by the daemon), restart the
code server on the production configuration, run `reindex_job`, backfill the 16 shards of
`chunk_embeddings` (launchPartitionBackfill), offer 1x (5 searches/s, half repeats) and 10x load
through nginx, check exposure / 413 / 429, every scrape target and the alert rules' unit tests,
then SIGKILL one replica during a 10x step and start it again (`--kill-seconds 0`: skip), stop
Redis for 30 s of another (`--redis-down-seconds 0`: skip), and
ramp the offered rate to find the knee (p95 <= 200 ms) with all replicas and with one
(`--knee-seconds 0`: skip), for the 1 -> N replica scaling.

`--smoke` (make test): the same topology on 2 papers indexed straight into the primary + S3,
a few searches through nginx, one scrape, down. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import sqlalchemy as sa

from bench.topology import checks, services
from bench.topology.dagster import MIGRATION_TAG, Dagster, max_overlap
from bench.topology.load import offered_load, query_stream
from bench.topology.pg import PgCluster, make_workdir, remove_workdir
from bench.topology.proc import PUBLIC_HOST, Stack, http_get

REPO = Path(__file__).resolve().parents[1]
DEMO_PAPERS = REPO / "examples" / "papers"
SHARED = Path(os.environ.get("RP_SHARED_DATA", REPO.parent / "shared" / "data"))
#: The queries every load step draws from (real claims, half of the draws repeats).
SCIFACT_QUERIES = SHARED / "ir" / "scifact" / "queries.jsonl"
SHARDS = "0123456789abcdef"
BUCKET, PREFIX = "rp-rehearsal", "research-pipeline"
#: 1x of the brief: 5 searches a second, half of them repeats.
BASE_RPS = 5.0
#: The search SLA of the brief the knee is measured against (p95 of answered searches).
SLA_P95_MS = 200.0
SMOKE_PAPERS = ("joss-2018-pycm-multiclass-confusion-matrix-library-python.pdf",
                "jose-2018-short-course-about-fitting-models-scipy.pdf")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] rehearsal: {msg}", file=sys.stderr, flush=True)


def base_env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RP_", "DAGSTER_"))}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RP_HOME=str(work / "rp"), RP_LOG_FORMAT="json",
        AWS_ACCESS_KEY_ID="rehearsal", AWS_SECRET_ACCESS_KEY="rehearsal", AWS_DEFAULT_REGION="us-east-1",
        # The release gates' latency bound is the SLA here (2 s, the alert's), not the 250 ms
        # default: the rehearsal shares a 2-core machine with other work while the gates run.
        RP_GATE_LATENCY_P95_MS="2000",
    )
    return env


def run_cli(args: list[str], env: dict, log: Path, timeout_s: float) -> None:
    """A `research-pipeline` command to completion, its output in `log`; raises on failure."""
    with open(log, "ab") as out:
        proc = subprocess.run([str(services.BIN / "research-pipeline"), *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    if proc.returncode:
        raise RuntimeError(f"research-pipeline {' '.join(args)} failed ({proc.returncode}):\n"
                           + log.read_text(errors="replace")[-3000:])


def inbox_of(folder: Path, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for pdf in sorted(DEMO_PAPERS.glob("*.pdf")):
        if names is None or pdf.name in names:
            shutil.copy2(pdf, folder / pdf.name)
    return folder


class Rehearsal:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = make_workdir("rp-rh-")
        # nginx's workers (user nobody) write their temp files under it.
        self.work.chmod(0o711)
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.env = base_env(self.work)
        self.stack = Stack()
        self.summary: dict = {"mode": "smoke" if args.smoke else "full", "replicas": args.replicas,
                              "upstream_max_fails": args.upstream_max_fails}
        self.started = time.monotonic()

    # -- the tiers -----------------------------------------------------------------------------

    def data_tier(self) -> None:
        say(f"work dir {self.work}; PostgreSQL primary + streaming replica, Redis, moto S3")
        self.redis = self.stack.start(services.redis(self.logs, self.work / "redis"))
        self.moto = self.stack.start(services.moto(self.logs, self.env))
        self.primary = PgCluster(self.work / "primary").init().start()
        self.stack.callback(self.primary.stop)
        with self.primary.engine(isolation_level="AUTOCOMMIT").connect() as conn:
            for db in ("rp", "dagster"):
                conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
        self.replica = self.primary.make_replica(self.work / "replica").start()
        self.stack.callback(self.replica.stop)
        self.redis.wait_ready()
        self.moto.wait_ready()
        self.prod = {
            "RP_DATABASE_URL": self.primary.url("rp"), "RP_OBJECT_STORE_URL": f"s3://{BUCKET}/{PREFIX}",
            "RP_S3_ENDPOINT_URL": self.moto.url, "RP_REDIS_URL": self.redis.url,
        }

    def start_dagster(self, code_env: dict) -> None:
        self.dagster = Dagster(self.work / "dagster", self.logs, self.env, "127.0.0.1", self.primary.port,
                               "dagster", max_runs=4, migration_limit=2)
        for proc in self.dagster.processes(code_env):
            self.stack.start(proc)

    def wait_dagster(self) -> None:
        self.dagster.grpc.wait_ready()
        self.dagster.webserver.wait_ready()
        self.dagster.wait_location()
        self.dagster.daemon.check_alive()
        say("Dagster code location loaded over gRPC; daemon running")

    def serving_tier(self) -> None:
        """Replicas on the standby, the exporters, nginx on the public address, Prometheus."""
        # Searches read the standby and log to the primary (a standby refuses the INSERTs).
        read_env = {**self.env, **self.prod, "RP_DATABASE_URL": self.replica.url("rp"),
                    "RP_QUERY_LOG_DATABASE_URL": self.primary.url("rp")}
        self.replicas = [self.stack.start(services.search_replica(i, self.logs, read_env))
                         for i in range(self.args.replicas)]
        pipeline_env = {**self.dagster.env, **read_env}
        self.exporter = self.stack.start(services.exporter("pipeline_exporter", self.logs, pipeline_env))
        self.pg_exporters = [
            self.stack.start(services.postgres_exporter(f"postgres_exporter_{role}", self.logs,
                                                        cluster.url("postgres"), self.env))
            for role, cluster in (("primary", self.primary), ("replica", self.replica))
        ]
        self.redis_exporter = self.stack.start(services.redis_exporter(self.logs, self.redis.url, self.env))
        ready = 0
        for replica in self.replicas:
            replica.wait_ready()
            ready += 1
        self.nginx = self.stack.start(services.nginx(self.work / "nginx", self.logs,
                                                     [(r.host, r.port) for r in self.replicas],
                                                     max_fails=self.args.upstream_max_fails))
        self.nginx_exporter = self.stack.start(services.nginx_exporter(self.logs, self.nginx.status_url, self.env))
        jobs = {
            "search": [f"{r.host}:{r.port}" for r in self.replicas],
            "pipeline": [f"{self.exporter.host}:{self.exporter.port}"],
            "postgres": [f"{p.host}:{p.port}" for p in self.pg_exporters],
            "redis": [f"{self.redis_exporter.host}:{self.redis_exporter.port}"],
            "nginx": [f"{self.nginx_exporter.host}:{self.nginx_exporter.port}"],
        }
        self.prometheus = self.stack.start(services.prometheus(self.work / "prometheus", self.logs, jobs))
        for proc in (self.nginx, self.prometheus, self.redis_exporter, self.nginx_exporter, *self.pg_exporters,
                     self.exporter):
            proc.wait_ready()
        self.summary["replicas_ready"] = ready
        self.front = f"http://{self.nginx.host}:{self.nginx.port}"
        say(f"{ready} search replicas ready behind nginx at {self.front}; Prometheus at {self.prometheus.url}")

    # -- the corpus ----------------------------------------------------------------------------

    def smoke_corpus(self) -> None:
        """Two papers indexed straight into the primary + S3 by `research-pipeline demo`."""
        inbox = inbox_of(self.work / "inbox", list(SMOKE_PAPERS))
        import boto3

        boto3.client("s3", endpoint_url=self.moto.url, region_name="us-east-1",
                     aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal").create_bucket(Bucket=BUCKET)
        env = {**self.env, **self.prod, "RP_INBOX": str(inbox), "DAGSTER_HOME": str(self.work / "demo_dagster")}
        run_cli(["demo"], env, self.logs / "demo.log", timeout_s=600)
        say("2-paper corpus published on the primary + S3")

    def migrate(self) -> None:
        """Build the SQLite + local files deployment, then migration_job x16 + cutover_job via the daemon."""
        source = self.work / "source"
        inbox = inbox_of(source / "inbox")
        self.source_env = {"RP_DATABASE_URL": f"sqlite:///{source / 'rp.db'}",
                           "RP_OBJECT_STORE_URL": str(source / "objects"), "RP_INBOX": str(inbox)}
        migration_env = {**self.source_env, "RP_TARGET_DATABASE_URL": self.primary.url("rp"),
                         "RP_S3_BUCKET": BUCKET, "RP_S3_PREFIX": PREFIX, "RP_S3_ENDPOINT_URL": self.moto.url}
        self.start_dagster(migration_env)
        t0 = time.monotonic()
        say(f"building the SQLite deployment of the demo corpus ({len(list(inbox.glob('*.pdf')))} papers)")
        run_cli(["demo"], {**self.env, **self.source_env, "DAGSTER_HOME": str(source / "dagster")},
                self.logs / "demo_source.log", timeout_s=1200)
        self.summary["source_build_s"] = round(time.monotonic() - t0, 1)
        self.wait_dagster()

        t0 = time.monotonic()
        in_process = {"execution": {"config": {"in_process": {}}}}
        runs = {self.dagster.launch("migration_job", in_process, {"dagster/partition": s}): s for s in SHARDS}
        statuses = self.dagster.wait_runs(list(runs), timeout_s=1500)
        failed = {runs[r]: r for r, st in statuses.items() if st != "SUCCESS"}
        if failed:
            # What an operator does: read why, launch the shard again (the migration resumes).
            self.summary["migration_failures"] = {
                shard: self.dagster.failure_messages(run_id) for shard, run_id in failed.items()}
            say(f"migration shard(s) failed, relaunching once: {self.summary['migration_failures']}")
            again = {self.dagster.launch("migration_job", in_process, {"dagster/partition": s}): s for s in failed}
            for run_id, st in self.dagster.wait_runs(list(again), timeout_s=900).items():
                statuses[failed[again[run_id]]] = st
            self.summary["migration_reruns"] = len(again)
        migration_runs = self.dagster.runs({MIGRATION_TAG: "shard"})
        self.summary.update(
            migration_runs_ok=sum(s == "SUCCESS" for s in statuses.values()),
            migration_max_concurrent=max_overlap(migration_runs),
            migration_limit=self.dagster.migration_limit,
            max_concurrent_runs=self.dagster.max_runs,
        )
        if self.summary["migration_runs_ok"] != len(SHARDS):
            raise RuntimeError(f"migration runs failed: {statuses}")
        cutover = self.dagster.launch("cutover_job", in_process)
        self.summary["cutover_ok"] = self.dagster.wait_runs([cutover], 600)[cutover] == "SUCCESS"
        if not self.summary["cutover_ok"]:
            self.summary["cutover_failure"] = self.dagster.failure_messages(cutover)
        self.summary["migration_s"] = round(time.monotonic() - t0, 1)
        if not self.summary["cutover_ok"]:
            raise RuntimeError("cutover_job failed; see the daemon and code server logs")
        say(f"migrated in {self.summary['migration_s']} s (at most {self.summary['migration_max_concurrent']} "
            f"migration runs at once); cutover recorded")
        # Point the deployment at the target and restart it (README, "Moving to production").
        # The new code server is stopped (and checked for leftovers) with the rest: without this
        # it outlived every full rehearsal, unseen by the leftover check.
        self.stack.add(self.dagster.restart_code_server({**self.prod, "RP_INBOX": str(inbox)}))

    def reindex_and_backfill(self) -> None:
        t0 = time.monotonic()
        run = self.dagster.launch("reindex_job", {"execution": {"config": {"in_process": {}}}})
        self.summary["reindex_ok"] = self.dagster.wait_runs([run], 1200)[run] == "SUCCESS"
        if not self.summary["reindex_ok"]:
            self.summary["reindex_failure"] = self.dagster.failure_messages(run)
        self.summary["reindex_s"] = round(time.monotonic() - t0, 1)
        say(f"reindex_job through the daemon: {'ok' if self.summary['reindex_ok'] else 'FAILED'}")
        t0 = time.monotonic()
        backfill_id = self.dagster.backfill("chunk_embeddings", list(SHARDS))
        backfill = self.dagster.wait_backfill(backfill_id, 1500)
        stats = self.dagster.partition_stats("chunk_embeddings")
        self.summary["backfill_s"] = round(time.monotonic() - t0, 1)
        self.summary["backfill"] = {"status": backfill["status"], **stats}
        self.summary["backfill_ok"] = (backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS")
                                       and stats["numMaterialized"] == 16 and stats["numFailed"] == 0)
        say(f"chunk_embeddings backfill: {backfill['status']}, {stats}")

    # -- exercising ----------------------------------------------------------------------------

    def wait_replica_caught_up(self) -> None:
        self.replica.wait_replayed(self.primary.current_lsn(), timeout_s=120)

    def security(self) -> None:
        internal = {p.name: p.port for p in self.stack.procs if p.port and p is not self.nginx}
        internal["nginx_stub_status"] = int(self.nginx.status_url.rsplit(":", 1)[1].split("/")[0])
        internal.update(postgres_primary=self.primary.port, postgres_replica=self.replica.port,
                        dagster_grpc=self.dagster.grpc_port, dagster_webserver=self.dagster.web_port)
        outside = [PUBLIC_HOST] + [a for a in [checks.machine_address()] if a]
        exposure = checks.internal_exposure(internal, outside)
        oversized = checks.oversized_body(self.nginx.host, self.nginx.port)
        flood = checks.flood(self.front)
        self.summary["security"] = {
            "internal_refused_outside": exposure["ok"], "exposed": exposure["exposed"],
            "outside_addresses": outside, "internal_ports": exposure["internal_ports"],
            "oversized_status": oversized, "flood": flood,
        }
        self.summary["security_ok"] = exposure["ok"] and oversized == 413 and flood["ok"]
        say(f"security: {self.summary['security']}")

    def searches(self, n: int = 5) -> None:
        queries = query_stream(SCIFACT_QUERIES)
        statuses = []
        for _ in range(n):
            q = queries.draw()
            status, _ = http_get(self.nginx.host, self.nginx.port,
                                    "/search?" + urllib.parse.urlencode({"q": q}), timeout=30)
            statuses.append(status)
        self.summary["smoke_searches_ok"] = sum(s == 200 for s in statuses)
        self.summary["errors"] = sum(s != 200 for s in statuses)

    def load(self) -> None:
        queries = query_stream(SCIFACT_QUERIES)
        steps = {}
        for factor in (1, 10):
            step = offered_load(self.front, BASE_RPS * factor, self.args.seconds, queries)
            steps[f"{factor}x"] = step
            print(json.dumps({"step": f"{factor}x", **step}), flush=True)
        self.summary["load"] = steps
        self.summary["rps_1x"], self.summary["p95_ms_1x"] = steps["1x"]["rps"], steps["1x"]["p95_ms"]
        self.summary["rps_10x"], self.summary["p95_ms_10x"] = steps["10x"]["rps"], steps["10x"]["p95_ms"]
        self.summary["errors"] = sum(sum(s["errors"].values()) for s in steps.values())

    def _flush_cache(self) -> None:
        """Empty the query cache, so a step measures searches, not what the step before cached."""
        import redis

        with redis.Redis.from_url(self.redis.url) as cache:
            cache.flushdb()

    def _10x_with_fault(self, seconds: float, seed: int, fault, name: str) -> dict:
        """A 10x step of `seconds` on an emptied cache; `fault(pace)` runs beside it from a
        quarter of the way in (`pace(fraction)` waits that fraction of the step). The step's
        figures and the fault's timings (seconds from the start)."""
        self._flush_cache()
        queries = query_stream(SCIFACT_QUERIES, seed=seed)
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(
            offered_load(self.front, BASE_RPS * 10, seconds, queries)), name=name)
        started = time.monotonic()
        load.start()
        pacer = threading.Event()  # pacing of the drill's schedule, as the load generator paces requests

        def pace(fraction: float) -> float:
            pacer.wait(seconds * fraction)
            return time.monotonic() - started

        pace(0.25)
        timings = fault(pace)
        load.join(seconds + 60)
        return {**result, **timings}

    def replica_kill(self) -> None:
        """SIGKILL one replica in the middle of a 10x step, start it again, and check that clients
        saw no more errors than the requests it had in flight, and that it serves again."""
        victim = self.replicas[-1]
        in_flight = 0

        def kill(pace) -> dict:
            nonlocal in_flight
            in_flight = int(_metric(victim, "rp_search_admitted"))
            os.killpg(victim.pid, signal.SIGKILL)
            victim.proc.wait(timeout=30)
            killed_at = pace(0)
            pace(0.25)
            victim.start()
            victim.wait_ready()
            return {"killed_at_s": round(killed_at, 1), "restart_ready_s": round(pace(0) - killed_at, 1)}

        drill = {"step": "10x with one replica SIGKILLed",
                 **self._10x_with_fault(self.args.kill_seconds, 7, kill, "kill-load")}
        # Rejoined: searches through the front until the new process answers some. nginx tries a
        # replica it took out again only after fail_timeout (10 s), so this is bounded at 30 s.
        deadline = time.monotonic() + 30
        served, i = 0, 0
        while not served and time.monotonic() < deadline:
            for _ in range(len(self.replicas)):
                http_get(self.nginx.host, self.nginx.port,
                         "/search?" + urllib.parse.urlencode({"q": f"rejoin {i}"}), timeout=30)
                i += 1
            served = int(_metric(victim, "rp_search_requests_total", outcome="ok"))
        errors = sum(drill.get("errors", {}).values())
        drill.update(in_flight_on_it=in_flight, served_after_restart=served,
                     passed=errors <= in_flight and served > 0)
        print(json.dumps(drill), flush=True)
        self.summary["replica_kill"] = drill
        say(f"replica SIGKILLed under 10x: {errors} client errors ({in_flight} in flight on it), "
            f"ready again in {drill['restart_ready_s']:.1f} s, then served {served} searches")

    def redis_down(self) -> None:
        """Stop Redis for the middle half of a 10x step (on an emptied cache), start it again:
        searches are answered uncached meanwhile with no 5xx, and the cache works again after."""

        def outage(pace) -> dict:
            self.redis.stop()
            down_at = pace(0)
            pace(0.5)
            self.redis.start()
            self.redis.wait_ready()
            return {"redis_down_s": round(pace(0) - down_at, 1)}

        drill = {"step": "10x with Redis stopped",
                 **self._10x_with_fault(self.args.redis_down_seconds, 11, outage, "redis-down-load")}
        # The cache is back: the same new query twice through the front, the second from the cache.
        hits = []
        for _ in range(2):
            status, body = http_get(self.nginx.host, self.nginx.port,
                                    "/search?" + urllib.parse.urlencode({"q": "redis is back probe"}), timeout=30)
            hits.append(status == 200 and bool(json.loads(body).get("cache_hit")))
        errors = sum(drill.get("errors", {}).values())
        drill["cache_hit_after_restart"] = hits == [False, True]
        drill["passed"] = errors == 0 and drill["cache_hit_after_restart"]
        print(json.dumps(drill), flush=True)
        self.summary["redis_down"] = drill
        say(f"Redis down {drill['redis_down_s']:.0f} s under 10x: {errors} client errors, p95 {drill.get('p95_ms')} ms; "
            f"cache answering again: {drill['cache_hit_after_restart']}")

    def knee(self) -> None:
        """The knee (the highest offered rate answered in full at p95 <= 200 ms, no errors) with all
        replicas behind the shipped nginx and with one replica behind its own nginx: how the
        search tier scales from 1 to N replicas on this machine. Each step starts from an empty
        query cache and its own query sequence (half repeats), so it measures searches, not the
        cache left by the step before."""
        rates = [float(r) for r in self.args.knee_rates.split(",")]
        one = self.stack.start(services.nginx(self.work / "nginx_one", self.logs,
                                              [(self.replicas[0].host, self.replicas[0].port)],
                                              max_fails=self.args.upstream_max_fails))
        one.wait_ready()
        fronts = {len(self.replicas): self.front, 1: f"http://{one.host}:{one.port}"}
        knees: dict[str, dict] = {}
        for n, front in fronts.items():
            steps, best = [], None
            for i, rate in enumerate(rates):
                self._flush_cache()
                queries = query_stream(SCIFACT_QUERIES, seed=1000 + i)
                step = offered_load(front, rate, self.args.knee_seconds, queries)
                print(json.dumps({"step": f"knee {n} replica(s)", **step}), flush=True)
                steps.append(step)
                held = (not step["errors"] and step["p95_ms"] is not None and step["p95_ms"] <= SLA_P95_MS
                        and step["rps"] >= 0.95 * rate)
                if not held:
                    break
                best = rate
            knees[str(n)] = {"knee_rps": best, "steps": steps}
            say(f"knee with {n} replica(s): {best} searches/s held at p95 <= {SLA_P95_MS:.0f} ms")
        self.summary["knee"] = knees
        k_all, k_one = knees[str(len(self.replicas))]["knee_rps"], knees["1"]["knee_rps"]
        self.summary["knee_rps"] = k_all
        self.summary["knee_scaling"] = round(k_all / k_one, 2) if k_all and k_one else None

    def observe(self) -> None:
        alive = [p for p in self.stack.procs if p.running()]
        all_targets, down = checks.wait_targets_up(self.prometheus.url, 60, alive)
        self.summary["targets_total"] = len(all_targets)
        self.summary["targets_down"] = len(down)
        if down:
            self.summary["targets_down_detail"] = down
        self.summary["rules_loaded"] = checks.rules_loaded(self.prometheus.url)
        self.summary["replica_lag_s"] = next(
            (float(r["value"][1]) for r in checks.query(self.prometheus.url, "rp_replica_lag_seconds")), None)
        tests = checks.alert_rule_tests()
        self.summary["alert_tests_passed"] = tests["passed"]
        if not tests["passed"]:
            self.summary["alert_tests_output"] = tests["output"]
        dashboard = REPO / "deploy" / "grafana" / "research_pipeline.json"
        if dashboard.exists():
            from bench.topology.grafana import check_dashboard

            self.summary["dashboard"] = check_dashboard(dashboard, self.prometheus.url)
        say(f"{len(all_targets) - len(down)}/{len(all_targets)} scrape targets up, "
            f"{self.summary['rules_loaded']} rules loaded, alert tests passed: {tests['passed']}")

    # -- the whole ------------------------------------------------------------------------------

    def run(self) -> dict:
        self.summary.update(replicas_ready=0, rps_10x=None, p95_ms_10x=None, errors=None, targets_down=None,
                            alert_tests_passed=None, backfill_ok=None)
        try:
            self.data_tier()
            if self.args.smoke:
                self.start_dagster(self.prod)
                self.smoke_corpus()
                self.wait_dagster()
            else:
                self.migrate()
                self.reindex_and_backfill()
            self.wait_replica_caught_up()
            self.serving_tier()
            self.security()
            if self.args.smoke:
                self.searches()
            else:
                self.load()
            self.observe()
            if not self.args.smoke and self.args.kill_seconds > 0:
                self.replica_kill()
            if not self.args.smoke and self.args.redis_down_seconds > 0:
                self.redis_down()
            if not self.args.smoke and self.args.knee_seconds > 0:
                self.knee()
            self.summary["ok"] = self.verdict()
        except Exception as exc:  # noqa: BLE001 - reported in the summary; everything is still stopped
            self.summary["ok"] = False
            self.summary["failure"] = f"{exc.__class__.__name__}: {exc}"[:4000]
        finally:
            self.down()
        return self.summary

    def verdict(self) -> bool:
        s = self.summary
        ok = (s["replicas_ready"] == self.args.replicas and s["errors"] == 0 and s["targets_down"] == 0
              and s["alert_tests_passed"] and s.get("security_ok"))
        if not self.args.smoke:
            ok = ok and s["backfill_ok"] and s.get("cutover_ok") and s.get("reindex_ok")
        for step in ("replica_kill", "redis_down"):
            if step in s:
                ok = ok and s[step]["passed"]
        return bool(ok)

    def product_warnings(self) -> None:
        """Known product problems the logs show (reported, not failed on): query-log writes a
        read-only standby refused, over all replicas (0 since RP_QUERY_LOG_DATABASE_URL)."""
        refused = 0
        for log in self.logs.glob("search_*.log"):
            refused += log.read_text(errors="replace").count("cannot execute INSERT in a read-only transaction")
        self.summary["query_log_flushes_refused_by_standby"] = refused

    def down(self) -> None:
        self.product_warnings()
        if self.args.keep_logs:
            shutil.copytree(self.logs, self.args.keep_logs, dirs_exist_ok=True)
            if (self.work / "nginx" / "logs").is_dir():
                shutil.copytree(self.work / "nginx" / "logs", self.args.keep_logs / "nginx", dirs_exist_ok=True)
        errors = self.stack.stop_all()
        self.summary["leftover_processes"] = self.stack.leftovers()
        if errors:
            self.summary["stop_errors"] = errors
        self.summary["seconds"] = round(time.monotonic() - self.started, 1)
        remove_workdir(self.work)


def _metric(replica, name: str, **labels: str) -> float:
    """The sum of the samples `name` with `labels` on a replica's /metrics (0 if it cannot say)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        _, body = http_get(replica.host, replica.port, "/metrics", timeout=5)
    except OSError:
        return 0.0
    return sum(sample.value for family in text_string_to_metric_families(body.decode())
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="up, a few searches, one scrape, down (make test)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of each load step (1x, 10x)")
    p.add_argument("--upstream-max-fails", type=int, default=3,
                   help="nginx max_fails of each replica (3 as shipped; 0: a replica's 503 never ejects it)")
    p.add_argument("--kill-seconds", type=float, default=40.0,
                   help="seconds of the 10x step during which one replica is SIGKILLed and restarted (0: skip)")
    p.add_argument("--redis-down-seconds", type=float, default=60.0,
                   help="seconds of the 10x step during whose middle half Redis is stopped (0: skip)")
    p.add_argument("--knee-seconds", type=float, default=15.0,
                   help="seconds of each knee step, after the checks (0: no knee)")
    p.add_argument("--knee-rates", default="25,50,60,70,80,90,100,125,150",
                   help="offered searches/s of the knee steps, in order; the first not held ends the ramp")
    p.add_argument("--keep-logs", type=Path, help="copy every process's log here before cleaning up")
    args = p.parse_args(argv)
    # SIGTERM (a timeout, CI cancelling) stops the topology like Ctrl-C: the finally blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    summary = Rehearsal(args).run()
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
