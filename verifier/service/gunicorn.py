"""Serving the attestation service with gunicorn.

``vtpm verifier serve`` migrates the database once, then *replaces itself*
(``os.execve``) with ``python -m gunicorn`` so the PID it was started with is
the gunicorn master's (stop it by that PID: SIGTERM is a graceful shutdown).
Workers build the app with ``create_app()`` from ``VTPM_VERIFIER_HOME`` /
``VTPM_VERIFIER_DB``; this module is also gunicorn's config module
(``-c python:verifier.service.gunicorn``) for the multiprocess-metrics hook.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from vtpm_core._process import pid_exists

__all__ = ["child_exit", "gunicorn_argv", "make_wsgi", "serve"]

_ENV_HOME = "VTPM_VERIFIER_HOME"
_ENV_DB = "VTPM_VERIFIER_DB"
_ENV_METRICS = "PROMETHEUS_MULTIPROC_DIR"
# tmpfs for gunicorn's worker heartbeat files (made with mkstemp and unlinked
# at once, gunicorn/workers/workertmp.py): nothing predictable is created there
_HEARTBEAT_DIR = "/dev/shm"  # noqa: S108


def make_wsgi() -> Any:
    """gunicorn's app factory: ``verifier.service.gunicorn:make_wsgi()``."""
    from verifier.service.app import create_app

    return create_app()


def child_exit(_server: Any, worker: Any) -> None:
    """gunicorn hook: a dead worker's live gauges leave the metrics (prometheus-client docs)."""
    if os.environ.get(_ENV_METRICS):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def gunicorn_argv(bind: str, workers: int, workdir: Path) -> list[str]:
    # -P and --chdir: a directory named like one of our packages (a verifier
    # home called "verifier" under the current directory) must not shadow it.
    return [
        sys.executable,
        "-P",
        "-m",
        "gunicorn",
        "--chdir",
        str(workdir),
        "--bind",
        bind,
        "--workers",
        str(workers),
        # gthread for HTTP/1.1 keep-alive (sync workers close every connection);
        # one thread: more threads in a worker only contend for its GIL
        "--worker-class",
        "gthread",
        "--threads",
        "1",
        "--config",
        "python:verifier.service.gunicorn",
        "--no-control-socket",
        # the heartbeat file is touched on every loop of every worker: on a
        # disk-backed /tmp that is a journaled metadata write each time
        *(["--worker-tmp-dir", _HEARTBEAT_DIR] if os.path.isdir(_HEARTBEAT_DIR) else []),
        "--graceful-timeout",
        "5",
        # no access log unless asked for: gunicorn formats every line even
        # when it goes to /dev/null (~70 us a request)
        *(["--access-logfile", "-"] if os.environ.get("VTPM_VERIFIER_ACCESS_LOG") else []),
        "verifier.service.gunicorn:make_wsgi()",
    ]


def _purge_stale_metrics(run: Path) -> None:
    """Remove metrics directories of masters that no longer run (their PID is in the name)."""
    if not run.is_dir():
        return
    for d in run.glob("metrics-*"):
        pid = d.name.removeprefix("metrics-")
        if not pid.isdigit():
            continue
        if not pid_exists(int(pid)):  # someone else's process counts as alive
            shutil.rmtree(d, ignore_errors=True)


def serve(home: Path, bind: str, workers: int, database_url: str | None) -> None:
    """Migrate, then exec gunicorn. Never returns."""
    from verifier.service.config import load_config
    from verifier.service.db import Database, upgrade
    from vtpm_core.errors import ConfigError

    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--bind {bind!r}: expected HOST:PORT")
    if workers < 1 or workers > 64:
        raise ConfigError("--workers must be 1..64")
    config = load_config(home, database_url=database_url)
    db = Database(config.database_url)
    try:
        upgrade(db.engine)
    finally:
        db.dispose()
    env = dict(os.environ)
    env[_ENV_HOME] = str(config.home)
    if database_url:
        env[_ENV_DB] = database_url
    else:
        env.pop(_ENV_DB, None)
    run = config.home / "run"
    _purge_stale_metrics(run)
    metrics_dir = run / f"metrics-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env[_ENV_METRICS] = str(metrics_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, gunicorn_argv(bind, workers, run), env)  # noqa: S606
