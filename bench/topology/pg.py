"""A private PostgreSQL 15 cluster on a loopback port: primary, streaming replica, WAL archiving.

Used by the restore test, the drills and the rehearsal topology. It runs Debian's own binaries
(/usr/lib/postgresql/15/bin) on a free 127.0.0.1 port in a directory it is given, and never
touches the machine's PostgreSQL service on 5432. PostgreSQL refuses to run as root, so when this
process is root every binary runs as the `postgres` OS user (`runuser -u postgres --`) and the
directories it creates are owned by that user; `make_workdir()` gives a directory that user can
reach (pytest's tmp_path under /tmp/pytest-of-root is mode 0700 and is not).

    work = make_workdir("rp-pg-")
    primary = PgCluster(work / "primary").init().start()
    replica = primary.make_replica(work / "replica").start()
    ...
    replica.stop(); primary.stop(); remove_workdir(work)

With `archive=PgBackRestArchive(stanza, config)` the cluster archives every WAL segment with
`pgbackrest archive-push` (the repository and its credentials come from that config file and the
environment given to `start()`).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: The OS user that owns clusters when this process is root.
PG_OS_USER = "postgres"


def is_root() -> bool:
    return os.geteuid() == 0


def as_pg_user(argv: list[str]) -> list[str]:
    """`argv` as the cluster's OS user: unchanged unless we are root (then via runuser)."""
    return ["runuser", "-u", PG_OS_USER, "--", *argv] if is_root() else argv


def chown_to_pg(path: Path) -> None:
    """Give `path` to the postgres OS user when we are root (a no-op otherwise)."""
    if is_root():
        entry = pwd.getpwnam(PG_OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def make_workdir(prefix: str = "rp-pg-") -> Path:
    """A fresh directory under the system temp dir that the cluster's OS user can use.

    Short on purpose: PostgreSQL's Unix socket path must stay under 107 bytes.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    chown_to_pg(path)
    return path


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pg(argv: list[str], *, env: dict | None = None, timeout: float = 120) -> str:
    """Run a PostgreSQL/pgBackRest binary as the cluster's user; raise with its output on failure."""
    proc = subprocess.run(
        as_pg_user(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd="/",
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} failed with exit code {proc.returncode}:\n"
            f"{proc.stdout.strip()}\n{proc.stderr.strip()}".strip()
        )
    return proc.stdout


@dataclass(frozen=True)
class PgBackRestArchive:
    """WAL archiving to a pgBackRest stanza defined in `config` (a pgbackrest.conf path)."""

    stanza: str
    config: Path

    def archive_command(self) -> str:
        return f"pgbackrest --config={self.config} --stanza={self.stanza} archive-push %p"


class PgCluster:
    """One PostgreSQL 15 cluster (data directory + server process) on 127.0.0.1:`port`.

    `data_dir`'s parent must be reachable by the cluster's OS user (see `make_workdir`). The
    Unix socket and the server log sit next to the data directory (`<data_dir>.sock/`,
    `<data_dir>.log`), so destroying the data directory leaves the log for the post-mortem.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        archive: PgBackRestArchive | None = None,
        settings: dict[str, str] | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.archive = archive
        self.settings = dict(settings or {})
        self.socket_dir = self.data_dir.with_name(self.data_dir.name + ".sock")
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self._env: dict[str, str] = {}

    # -- addresses ------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3, trust auth as the `postgres` role over TCP)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def engine(self, dbname: str = "postgres", **kwargs) -> sa.Engine:
        return sa.create_engine(self.url(dbname), **kwargs)

    # -- life cycle -----------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        for path in (self.data_dir.parent, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
            chown_to_pg(path)

    def _server_settings(self) -> dict[str, str]:
        out = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "on",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "hot_standby": "on",
            # A private test/drill cluster: a small footprint on a shared machine.
            "shared_buffers": "32MB",
            "max_connections": "50",
        }
        if self.archive is not None:
            out["archive_mode"] = "on"
            out["archive_command"] = "'" + self.archive.archive_command().replace("'", "''") + "'"
            out["archive_timeout"] = "60"
        out.update(self.settings)
        return out

    def _write_settings(self) -> None:
        """Append this object's settings to postgresql.conf (the last occurrence wins)."""
        lines = "".join(f"{k} = {v}\n" for k, v in self._server_settings().items())
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            f.write(f"\n# -- bench/topology/pg.py --\n{lines}")

    def init(self) -> PgCluster:
        """initdb a fresh cluster (trust auth on loopback, data checksums on)."""
        self._prepare_dirs()
        run_pg(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--data-checksums",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )
        self._write_settings()
        return self

    def start(self, env: dict[str, str] | None = None, timeout_s: int = 60) -> PgCluster:
        """Start the server and wait (pg_ctl -w) until it accepts connections.

        `env` reaches the server process, hence archive_command (pgBackRest's S3 credentials).
        """
        if env is not None:
            self._env = dict(env)
        self._prepare_dirs()
        if not self.log_path.exists():
            self.log_path.touch()
            chown_to_pg(self.log_path)
        run_pg(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(timeout_s),
                "start",
            ],
            env=self._env,
            timeout=timeout_s + 30,
        )
        return self

    def stop(self, mode: str = "fast", timeout_s: int = 60) -> None:
        """Stop the server (mode: smart, fast or immediate); a no-op when it is not running."""
        if not self.running():
            return
        run_pg(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(timeout_s), "stop"],
            timeout=timeout_s + 30,
        )

    def running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        proc = subprocess.run(
            as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "status"]),
            capture_output=True,
            text=True,
            cwd="/",
        )
        return proc.returncode == 0

    def promote(self, timeout_s: int = 60) -> None:
        """Promote this (standby) cluster to a primary and wait until it accepts writes."""
        run_pg(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-w", "-t", str(timeout_s), "promote"],
            timeout=timeout_s + 30,
        )

    def destroy(self) -> None:
        """Stop the server at once if running and delete the data directory (the disaster)."""
        if self.running():
            self.stop(mode="immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def prepare_empty_data_dir(self) -> None:
        """An empty data directory owned by the cluster's user, for `pgbackrest restore`."""
        self._prepare_dirs()
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        chown_to_pg(self.data_dir)

    # -- replication ----------------------------------------------------------------------------

    def make_replica(self, data_dir: Path, port: int | None = None) -> PgCluster:
        """A streaming replica of this running cluster (pg_basebackup -R); not started yet."""
        replica = PgCluster(data_dir, port, archive=self.archive, settings=self.settings)
        replica._prepare_dirs()
        run_pg(
            [
                str(PG_BIN / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-D",
                str(replica.data_dir),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
            timeout=600,
        )
        replica._write_settings()  # its own port and socket directory
        replica._env = dict(self._env)
        return replica

    def current_lsn(self) -> str:
        with self.engine().connect() as conn:
            return conn.execute(sa.text("select pg_current_wal_lsn()::text")).scalar_one()

    def wait_replayed(self, lsn: str, timeout_s: float = 60) -> None:
        """Wait until this standby has replayed WAL up to `lsn` (polls the server's own view)."""
        eng = self.engine(pool_pre_ping=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                with eng.connect() as conn:
                    done = conn.execute(
                        sa.text("select pg_wal_lsn_diff(pg_last_wal_replay_lsn(), cast(:lsn as pg_lsn)) >= 0"),
                        {"lsn": lsn},
                    ).scalar_one()
                if done:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"standby on port {self.port} did not replay {lsn} in {timeout_s}s")
                time.sleep(0.05)
        finally:
            eng.dispose()

    def is_in_recovery(self) -> bool:
        with self.engine().connect() as conn:
            return bool(conn.execute(sa.text("select pg_is_in_recovery()")).scalar_one())

    # -- archiving and recovery -----------------------------------------------------------------

    def wait_archived(self, timeout_s: float = 60) -> float:
        """Wait until the WAL segment holding the last record written is archived; its time.

        archive_timeout closes the segment and archive_command pushes it; this returns when
        PostgreSQL reports it archived (pg_stat_archiver). From a commit to here is the RPO.
        """
        eng = self.engine()
        try:
            with eng.connect() as conn:
                # An insert position just past a fresh segment's 40-byte page header means that
                # segment is still empty: the last record is in the one before.
                segment = conn.execute(sa.text("select pg_walfile_name(pg_current_wal_insert_lsn() - 40)")).scalar_one()
            deadline = time.monotonic() + timeout_s
            while True:
                with eng.connect() as conn:
                    last, failed = conn.execute(
                        sa.text("select coalesce(last_archived_wal, ''), failed_count from pg_stat_archiver")
                    ).one()
                if last >= segment:  # same timeline: names sort in WAL order
                    return time.monotonic()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"WAL {segment} not archived in {timeout_s}s (last {last!r}, {failed} failures)")
                time.sleep(0.1)
        finally:
            eng.dispose()

    def wait_serving(self, dbname: str, probe: str = "select 1", timeout_s: float = 120) -> float:
        """Wait until a restored server has ended recovery and answers `probe` in `dbname`; its time."""
        eng = self.engine(dbname)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    with eng.connect() as conn:
                        if not conn.execute(sa.text("select pg_is_in_recovery()")).scalar_one():
                            conn.execute(sa.text(probe)).all()
                            return time.monotonic()
                except sa.exc.OperationalError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"restored cluster not serving after {timeout_s}s; see {self.log_path}")
                time.sleep(0.1)
        finally:
            eng.dispose()
