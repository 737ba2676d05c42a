"""The real processes of the rehearsal other than PostgreSQL and Dagster, as `Proc`s with probes.

Redis (a private server, not the machine's 6379), moto's standalone S3 server, the search
replicas (`research-pipeline serve`), the pipeline exporter (`research-pipeline exporter`),
nginx from deploy/nginx/nginx.conf with the rehearsal's upstreams, Prometheus with a generated
scrape configuration and deploy/prometheus/alerts.yml, and Debian's PostgreSQL, Redis and nginx
exporters (packages prometheus-{postgres,redis,nginx}-exporter, installed by scripts/setup.sh).
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
from pathlib import Path

import yaml

from bench.topology.proc import INTERNAL_HOST, PUBLIC_HOST, Proc, free_port, http_ok

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"


def which(name: str, *fallbacks: str) -> str:
    """The path of a binary, or a TopologyError-worthy message naming the Debian package."""
    found = shutil.which(name) or next((f for f in fallbacks if Path(f).exists()), None)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (run `make setup`, which installs the Debian packages)")
    return found


def redis_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis(log_dir: Path, data_dir: Path, host: str = INTERNAL_HOST) -> Proc:
    port = free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc("redis", [which("redis-server"), "--bind", host, "--port", str(port), "--save", "",
                          "--appendonly", "no", "--dir", str(data_dir), "--protected-mode", "yes"],
                log_dir, ready=lambda: redis_ping(host, port), ready_timeout_s=30)
    proc.url = f"redis://{host}:{port}/0"
    proc.host, proc.port = host, port
    return proc


def moto(log_dir: Path, env: dict, host: str = INTERNAL_HOST) -> Proc:
    port = free_port(host)
    proc = Proc("moto_s3", [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)], log_dir,
                env=env, ready=lambda: http_ok(host, port, "/moto-api/"), ready_timeout_s=60)
    proc.url = f"http://{host}:{port}"
    proc.host, proc.port = host, port
    return proc


def search_replica(i: int, log_dir: Path, env: dict, host: str = INTERNAL_HOST) -> Proc:
    """One `research-pipeline serve` process (one worker); ready when /readyz answers 200."""
    port = free_port(host)
    proc = Proc(f"search_{i}", [BIN / "research-pipeline", "serve", "--host", host, "--port", str(port),
                                "--workers", "1"], log_dir, env=env,
                ready=lambda: http_ok(host, port, "/readyz"), ready_timeout_s=240)
    proc.host, proc.port = host, port
    return proc


def exporter(name: str, log_dir: Path, env: dict, host: str = INTERNAL_HOST) -> Proc:
    port = free_port(host)
    proc = Proc(name, [BIN / "research-pipeline", "exporter", "--host", host, "--port", str(port)], log_dir,
                env=env, ready=lambda: http_ok(host, port, "/metrics", timeout=20), ready_timeout_s=120)
    proc.host, proc.port = host, port
    return proc


def postgres_exporter(name: str, log_dir: Path, pg_url: str, env: dict, host: str = INTERNAL_HOST) -> Proc:
    """Debian's prometheus-postgres-exporter on one cluster (`pg_url`: postgresql://user@host:port/db)."""
    port = free_port(host)
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://") + "?sslmode=disable"
    proc = Proc(name, [which("prometheus-postgres-exporter"), f"--web.listen-address={host}:{port}"], log_dir,
                env={**env, "DATA_SOURCE_NAME": dsn}, ready=lambda: http_ok(host, port, "/metrics"),
                ready_timeout_s=30)
    proc.host, proc.port = host, port
    return proc


def redis_exporter(log_dir: Path, redis_url: str, env: dict, host: str = INTERNAL_HOST) -> Proc:
    port = free_port(host)
    proc = Proc("redis_exporter", [which("prometheus-redis-exporter"), "-redis.addr", redis_url,
                                   "-web.listen-address", f"{host}:{port}"], log_dir, env=env,
                ready=lambda: http_ok(host, port, "/metrics"), ready_timeout_s=30)
    proc.host, proc.port = host, port
    return proc


def nginx_exporter(log_dir: Path, status_url: str, env: dict, host: str = INTERNAL_HOST) -> Proc:
    port = free_port(host)
    proc = Proc("nginx_exporter", [which("prometheus-nginx-exporter"), "-nginx.scrape-uri", status_url,
                                   "-web.listen-address", f"{host}:{port}"], log_dir, env=env,
                ready=lambda: http_ok(host, port, "/metrics"), ready_timeout_s=30)
    proc.host, proc.port = host, port
    return proc


# -- nginx -------------------------------------------------------------------------------------


def nginx_conf(prefix: Path, listen_host: str, listen_port: int, replicas: list[tuple[str, int]],
               status_port: int, status_host: str = INTERNAL_HOST, max_fails: int = 3) -> Path:
    """deploy/nginx/nginx.conf with its upstream servers and listen address replaced, plus an
    internal-only stub_status server for the nginx exporter. Fails if the file changed shape."""
    text = NGINX_CONF.read_text()
    # max_fails=3 as shipped; 0 is the what-if of a replica's 503 not ejecting it (see rehearsal.py).
    servers = "".join(f"        server {h}:{p} max_fails={max_fails} fail_timeout=10s;\n" for h, p in replicas)
    text, n = re.subn(r"(upstream search_replicas \{\n\s+least_conn;\n)(?:\s+server [^\n]+\n)+",
                      r"\g<1>" + servers, text)
    if n != 1:
        raise ValueError(f"the upstream block of {NGINX_CONF} changed shape")
    text, n = re.subn(r"listen [\d.]+:\d+;", f"listen {listen_host}:{listen_port};", text)
    if n != 1:
        raise ValueError(f"the listen line of {NGINX_CONF} changed shape")
    status = (
        "    server {\n"
        f"        listen {status_host}:{status_port};\n"
        "        access_log off;\n"
        "        location = /stub_status { stub_status; }\n"
        "        location / { return 404; }\n"
        "    }\n"
    )
    head, tail = text.rsplit("}", 1)
    text = head + status + "}" + tail
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    out = prefix / "nginx.conf"
    out.write_text(text)
    return out


def nginx(prefix: Path, log_dir: Path, replicas: list[tuple[str, int]], host: str = PUBLIC_HOST,
          max_fails: int = 3) -> Proc:
    """nginx in the foreground (`daemon off`) as the front of `replicas`, on the public address.

    Start it once the replicas are ready, as a load balancer behind readiness gates would.
    """
    port, status_port = free_port(host), free_port(INTERNAL_HOST)
    conf = nginx_conf(prefix, host, port, replicas, status_port, max_fails=max_fails)
    binary = which("nginx", "/usr/sbin/nginx")
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-g",
            f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/logs/error.log;"]
    # Ready when its own status page answers: a probe through the front would count against the
    # replicas' passive health checks (max_fails) while they start.
    proc = Proc("nginx", argv, log_dir, ready=lambda: http_ok(INTERNAL_HOST, status_port, "/stub_status"),
                ready_timeout_s=30)
    proc.host, proc.port = host, port
    proc.status_url = f"http://{INTERNAL_HOST}:{status_port}/stub_status"
    proc.conf = conf
    return proc


# -- Prometheus --------------------------------------------------------------------------------


def prometheus_config(path: Path, jobs: dict[str, list[str]], rules: Path = ALERT_RULES,
                      interval_s: int = 2) -> Path:
    """A scrape configuration: one job per entry of `jobs` (name -> host:port targets), the alert rules."""
    config = {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s",
                   "scrape_timeout": f"{max(1, interval_s - 1)}s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": name, "static_configs": [{"targets": targets}]}
                           for name, targets in jobs.items()],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prometheus(workdir: Path, log_dir: Path, jobs: dict[str, list[str]], host: str = INTERNAL_HOST) -> Proc:
    port = free_port(host)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = {"prometheus": [f"{host}:{port}"], **jobs}
    conf = prometheus_config(workdir / "prometheus.yml", jobs)
    argv = [which("prometheus"), f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address={host}:{port}", "--storage.tsdb.retention.time=1d",
            "--web.enable-lifecycle"]
    proc = Proc("prometheus", argv, log_dir, ready=lambda: http_ok(host, port, "/-/ready"), ready_timeout_s=60)
    proc.host, proc.port = host, port
    proc.url = f"http://{host}:{port}"
    return proc
