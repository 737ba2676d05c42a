"""pgBackRest against a real S3 endpoint on loopback: moto's server over TLS, plus the commands.

pgBackRest 2.45 speaks S3 only over HTTPS (there is no plain-HTTP option; `repo1-storage-verify-tls=n`
only skips the certificate check). moto's own TLS mode (`moto.server -c cert -k key`, Werkzeug's
dev server) ends connections without a TLS close_notify, which pgBackRest's OpenSSL 3 reports as
"TLS error [1:167772454] unexpected eof while reading". So the S3 endpoint here is moto's plain
HTTP server behind nginx terminating TLS with a self-signed certificate for `localhost`, the way
a real object store sits behind a TLS front; pgBackRest verifies that certificate
(`repo1-storage-ca-file`): TLS is on and checked, as with real S3.

The configuration is the deployed one, deploy/pgbackrest/pgbackrest.conf; what differs per site
(endpoint, bucket, paths of this private cluster, credentials) is given the way production gives
it, as PGBACKREST_* environment variables, which pgBackRest reads itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.topology.pg import PgCluster, chown_to_pg, free_port, run_pg

REPO = Path(__file__).resolve().parents[2]
DEPLOY_CONF = REPO / "deploy" / "pgbackrest" / "pgbackrest.conf"
#: The stanza of the deployed configuration (one cluster: the corpus and Dagster's databases).
STANZA = "rp"
#: Credentials moto accepts.
MOTO_KEY = "testing"
MOTO_SECRET = "testing"


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate + key for `localhost` / 127.0.0.1, valid two days (openssl)."""
    cert, key = directory / "s3-cert.pem", directory / "s3-key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    cert.chmod(0o644)
    key.chmod(0o644)
    return cert, key


NGINX_CONF = """daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx_error.log warn;
worker_processes 1;
{user}
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx_tmp/body;
    proxy_temp_path {dir}/nginx_tmp/proxy;
    fastcgi_temp_path {dir}/nginx_tmp/fastcgi;
    uwsgi_temp_path {dir}/nginx_tmp/uwsgi;
    scgi_temp_path {dir}/nginx_tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 0;
        location / {{
            proxy_pass http://127.0.0.1:{moto_port};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
    # The same endpoint answering a share of requests "503 SlowDown" before they reach moto:
    # S3 under throttling, for the s3_503 drill. Logged, so the drill counts what it injected.
    split_clients "${{request_id}}" $s3_fault {{
        {fault_percent}% 1;
        * 0;
    }}
    log_format s3_fault '$status $request_method $uri';
    server {{
        listen 127.0.0.1:{fault_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 0;
        access_log {dir}/s3_fault_access.log s3_fault;
        location / {{
            if ($s3_fault) {{
                add_header Retry-After 1 always;
                return 503 '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate (injected by the drill)</Message></Error>';
            }}
            proxy_pass http://127.0.0.1:{moto_port};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"""


def _wait_https(url: str, cafile: Path, proc: subprocess.Popen, timeout_s: float) -> bool:
    import ssl

    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2, context=ctx).close()
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    return False


class TlsMoto:
    """moto's S3 server behind an nginx TLS front on free loopback ports.

    `endpoint` is https://localhost:<port> (certificate: `cert`); `http_url` is moto itself;
    `fault_endpoint` is the same store answering `fault_percent`% of requests 503 SlowDown.
    """

    def __init__(self, directory: Path, fault_percent: int = 20):
        self.directory = Path(directory)
        self.fault_percent = fault_percent
        self.fault_port = 0
        self.cert, self.key = self_signed_cert(self.directory)
        self.log_path = self.directory / "moto.log"
        self.procs: list[subprocess.Popen] = []
        self.port = 0
        self.moto_port = 0

    @property
    def endpoint(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def fault_endpoint(self) -> str:
        return f"https://localhost:{self.fault_port}"

    def fault_counts(self) -> dict[str, int]:
        """Requests the fault endpoint answered so far, by status ("503": injected)."""
        counts: dict[str, int] = {}
        log = self.directory / "s3_fault_access.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            status = line.split(" ", 1)[0]
            counts[status] = counts.get(status, 0) + 1
        return counts

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    def _spawn(self, argv: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        with open(self.directory / log_name, "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def start(self, attempts: int = 3, timeout_s: float = 60.0) -> TlsMoto:
        for _ in range(attempts):
            self.moto_port = free_port()
            moto = self._spawn(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                "moto.log",
                {"AWS_ACCESS_KEY_ID": MOTO_KEY, "AWS_SECRET_ACCESS_KEY": MOTO_SECRET},
            )
            if _wait_https(f"{self.http_url}/moto-api/", None, moto, timeout_s):
                break
            self.stop()
        else:
            raise RuntimeError(f"moto server did not start; see {self.log_path}")
        for _ in range(attempts):
            self.port, self.fault_port = free_port(), free_port()
            tmp = self.directory / "nginx_tmp"
            tmp.mkdir(exist_ok=True)
            conf = self.directory / "nginx.conf"
            conf.write_text(
                NGINX_CONF.format(
                    dir=self.directory, port=self.port, moto_port=self.moto_port, cert=self.cert, key=self.key,
                    fault_port=self.fault_port, fault_percent=self.fault_percent,
                    user="user root;" if os.geteuid() == 0 else "",
                )
            )  # fmt: skip
            nginx = self._spawn(["nginx", "-c", str(conf), "-p", str(self.directory)], "nginx.out")
            if _wait_https(f"https://localhost:{self.port}/moto-api/", self.cert, nginx, timeout_s):
                return self
            nginx.terminate()
            nginx.wait(timeout=10)
        self.stop()
        raise RuntimeError(f"nginx TLS front did not start; see {self.directory / 'nginx_error.log'}")

    def s3_client(self, faulty: bool = False):  # noqa: ANN201
        """A client as the pipeline builds one (its retry config), of the clean or the faulty front."""
        import boto3

        from research_pipeline.lib.core.objectstore import retry_config

        return boto3.client(
            "s3",
            config=retry_config(),
            endpoint_url=self.fault_endpoint if faulty else self.endpoint,
            verify=str(self.cert),
            aws_access_key_id=MOTO_KEY,
            aws_secret_access_key=MOTO_SECRET,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        self.s3_client().create_bucket(Bucket=name)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.procs = []


class PgBackRestRepo:
    """The deployed pgBackRest configuration pointed at one S3 bucket and one private cluster."""

    def __init__(self, s3: TlsMoto, bucket: str, cluster: PgCluster, workdir: Path, stanza: str = STANZA):
        self.s3 = s3
        self.bucket = bucket
        self.cluster = cluster
        self.stanza = stanza
        self.config = DEPLOY_CONF
        self.workdir = Path(workdir)
        #: Talk to the S3 front that answers a share of requests 503 (the s3_503 drill).
        self.through_faults = False
        for sub in ("log", "lock", "spool"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
            chown_to_pg(self.workdir / sub)

    def env(self) -> dict[str, str]:
        """The site's PGBACKREST_* variables (what an operator sets in production)."""
        return {
            "PGBACKREST_REPO1_S3_ENDPOINT": "localhost",
            "PGBACKREST_REPO1_STORAGE_PORT": str(self.s3.fault_port if self.through_faults else self.s3.port),
            "PGBACKREST_REPO1_S3_BUCKET": self.bucket,
            "PGBACKREST_REPO1_S3_REGION": "us-east-1",
            "PGBACKREST_REPO1_S3_URI_STYLE": "path",
            "PGBACKREST_REPO1_STORAGE_CA_FILE": str(self.s3.cert),
            "PGBACKREST_REPO1_S3_KEY": MOTO_KEY,
            "PGBACKREST_REPO1_S3_KEY_SECRET": MOTO_SECRET,
            "PGBACKREST_PG1_PATH": str(self.cluster.data_dir),
            "PGBACKREST_PG1_PORT": str(self.cluster.port),
            "PGBACKREST_PG1_SOCKET_PATH": str(self.cluster.socket_dir),
            "PGBACKREST_LOG_PATH": str(self.workdir / "log"),
            "PGBACKREST_LOCK_PATH": str(self.workdir / "lock"),
            "PGBACKREST_SPOOL_PATH": str(self.workdir / "spool"),
        }

    def run(self, *args: str, timeout: float = 300) -> str:
        """`pgbackrest --config=... --stanza=... <args>` as the cluster's OS user."""
        return run_pg(
            ["pgbackrest", f"--config={self.config}", f"--stanza={self.stanza}", *args],
            env=self.env(),
            timeout=timeout,
        )

    def stanza_create(self) -> None:
        self.run("stanza-create")

    def check(self) -> None:
        """pgbackrest check: archiving works end to end (forces a WAL switch and waits for it)."""
        self.run("check")

    def backup(self, kind: str = "full") -> None:
        self.run(f"--type={kind}", "backup", timeout=900)

    def restore(self, *, target_time: str | None = None, delta: bool = False) -> None:
        """Restore into the cluster's (empty or, with delta, existing) data directory.

        Without `target_time`: to the end of the archived WAL (latest). With it: PITR to that
        timestamp, promoting when reached (`--target-action=promote`).
        """
        args = ["restore"]
        if delta:
            args.insert(0, "--delta")
        if target_time is not None:
            args[:0] = ["--type=time", f"--target={target_time}", "--target-action=promote"]
        self.run(*args, timeout=900)
