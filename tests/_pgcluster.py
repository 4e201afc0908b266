"""A private PostgreSQL cluster for fault tests: its own data directory, port and processes.

Fault tests restart or stop PostgreSQL; doing that to the shared server on
127.0.0.1:5432 would break every other test (and every other user of it).
``PgCluster`` runs ``initdb`` into a temporary directory and ``pg_ctl`` on a
free loopback port, as the ``postgres`` system user when the tests run as root
(PostgreSQL refuses to run as root), with trust authentication on loopback
only. ``stop``/``start``/``restart`` are the faults; ``close`` stops it for
good (by ``pg_ctl stop -m immediate``, then by the postmaster's PID).

Usage::

    with PgCluster.create(tmp_path) as pg:
        url = pg.url("test")      # postgresql+psycopg://postgres@127.0.0.1:PORT/test
        pg.restart()
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests._server import free_port
from vtpm_core._process import stop_pid

__all__ = ["PgCluster", "pg_bin"]

START_TIMEOUT_S = 30


def pg_bin(tool: str) -> Path:
    """Path of a PostgreSQL server tool (initdb, pg_ctl), newest installed major first."""
    root = Path("/usr/lib/postgresql")
    for major in sorted((p for p in root.glob("*") if p.is_dir()), reverse=True):
        path = major / "bin" / tool
        if path.exists():
            return path
    raise AssertionError(f"PostgreSQL server tool {tool} not found under {root}")


def _as_postgres() -> list[str]:
    """Prefix that runs a command as the postgres user when we are root; nothing otherwise."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class PgCluster:
    """One private cluster; not thread-safe (one test drives it)."""

    data: Path
    port: int
    log: Path

    @classmethod
    def create(cls, base: Path, database: str = "test") -> PgCluster:
        """initdb under ``base``, start it, create ``database`` (AssertionError if not)."""
        root = base / "pgcluster"
        root.mkdir(parents=True)
        data = root / "data"
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            # the postgres user must reach its data directory through every parent
            for parent in (base, *base.parents):
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o011)
            shutil.chown(root, pw.pw_uid, pw.pw_gid)
        cluster = cls(data=data, port=free_port(), log=root / "postgres.log")
        cluster._run(
            [str(pg_bin("initdb")), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--no-sync", "-E", "UTF8"]
        )  # fmt: skip
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {cluster.port}\n"
                f"unix_socket_directories = '{root}'\nfsync = off\n"
                "max_connections = 200\n"
            )
        cluster.start()
        cluster._run(
            ["psql", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-q",
             "-c", f'CREATE DATABASE "{database}"']
        )  # fmt: skip
        return cluster

    def url(self, database: str = "test") -> str:
        """SQLAlchemy URL of ``database`` in this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the postmaster and wait until it accepts connections."""
        self._run(
            [str(pg_bin("pg_ctl")), "-D", str(self.data), "-l", str(self.log), "-w",
             "-t", str(START_TIMEOUT_S), "start"]
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop it (``fast``: abort sessions, clean shutdown; ``immediate``: like a crash)."""
        self._run([str(pg_bin("pg_ctl")), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def restart(self, mode: str = "fast", down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again."""
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def running(self) -> bool:
        """Whether the postmaster runs (pg_ctl status)."""
        status = subprocess.run(
            [*_as_postgres(), str(pg_bin("pg_ctl")), "-D", str(self.data), "status"],
            capture_output=True,
            check=False,
        )
        return status.returncode == 0

    def close(self) -> None:
        """Stop for good: ``pg_ctl stop -m immediate``, then the postmaster by PID if left."""
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return
        subprocess.run(
            [*_as_postgres(), str(pg_bin("pg_ctl")), "-D", str(self.data), "-m", "immediate",
             "-w", "stop"],
            capture_output=True,
            check=False,
        )  # fmt: skip
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            stop_pid(pid, 5.0)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run([*_as_postgres(), *cmd], capture_output=True, check=False)
        if done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise AssertionError(
                f"{Path(cmd[0]).name} failed ({done.returncode}): "
                f"{done.stderr.decode(errors='replace')[-2000:]}\n{tail}"
            )
