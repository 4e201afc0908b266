"""Fixtures for the attestation service: real gunicorn, real swtpm TPMs with EK certificates.

- ``ek_ca``: a swtpm_localca CA (root + issuer) that every provisioned TPM's EK
  certificate chains to; the verifier trusts its root.
- ``tpm_factory``: swtpm_setup-provisioned TPMs (RSA EK + certificate in NV
  0x01C00002), started with :class:`SwtpmProcess`, stopped by PID.
- ``service``: a verifier home and ``vtpm verifier serve`` under gunicorn
  (2 workers) on a free 127.0.0.1 port, once per module and backend; SQLite
  or a dedicated PostgreSQL database created for the run and dropped after.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy
import yaml

from tests._server import STOP_GRACE_S, answers, free_port
from vtpm_core._process import stop_child
from vtpm_core.swtpm import SwtpmProcess

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class EkCa:
    root: Path
    issuer: Path
    setup_conf: Path


@pytest.fixture(scope="session")
def ek_ca(tmp_path_factory: pytest.TempPathFactory) -> EkCa:
    return make_ek_ca(tmp_path_factory.mktemp("ekca"))


def make_ek_ca(d: Path) -> EkCa:
    """The swtpm_localca configuration under ``d``; its CA is made by the first
    :func:`provision_tpm`."""
    (d / "ca").mkdir(parents=True)
    conf = d / "localca.conf"
    conf.write_text(
        f"statedir = {d}/ca\nsigningkey = {d}/ca/signkey.pem\n"
        f"issuercert = {d}/ca/issuercert.pem\ncertserial = {d}/ca/certserial\n"
    )
    setup = d / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {conf}\n"
        "create_certs_tool_options = /etc/swtpm-localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    return EkCa(d / "ca" / "swtpm-localca-rootca-cert.pem", d / "ca" / "issuercert.pem", setup)


def provision_tpm(ca: EkCa, state: Path) -> Path:
    """swtpm_setup: EK (RSA-2048) + EK certificate from ``ca`` in NV; returns the state dir."""
    state.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state),
            "--config",
            str(ca.setup_conf),
            "--create-ek-cert",
            "--pcr-banks",
            "sha256",
            "--overwrite",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return state


@pytest.fixture(scope="module")
def tpm_factory(
    ek_ca: EkCa, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], SwtpmProcess]]:
    """Provision and start TPMs on demand; all stopped when the module ends."""
    started: list[SwtpmProcess] = []
    base = tmp_path_factory.mktemp("tpms")

    def make() -> SwtpmProcess:
        state = provision_tpm(ek_ca, base / f"tpm{len(started)}")
        tpm = SwtpmProcess(state)
        tpm.start()
        started.append(tpm)
        return tpm

    yield make
    for tpm in started:
        tpm.stop()


@dataclass
class Server:
    """One `vtpm verifier serve` process (the gunicorn master after exec)."""

    home: Path
    db_url: str | None
    workers: int = 2
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> Server:
        """Start on a free port (or on ``port``: a restart where clients expect it)."""
        for _attempt in range(3):
            self.port = port or free_port()
            self.log = self.home / f"serve-{self.port}.log"
            cmd = [
                sys.executable,
                "-m",
                "vtpm_cli.main",
                "verifier",
                "serve",
                "--home",
                str(self.home),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.workers),
            ]
            if self.db_url:
                cmd += ["--db", self.db_url]
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ)
                )
            if answers(self.proc, f"{self.url}/healthz"):
                return self
            self.stop()
        raise AssertionError(f"verifier did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_child(proc, STOP_GRACE_S)


@dataclass
class Service:
    backend: str
    home: Path
    db_url: str | None
    admin: str
    reader: str
    server: Server
    ca: EkCa

    @property
    def url(self) -> str:
        return self.server.url

    def headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> requests.Response:
        return requests.request(
            method, f"{self.url}{path}", headers=self.headers(token), timeout=30, **kwargs
        )


def make_home(path: Path, ca: EkCa, **overrides: Any) -> tuple[str, str]:
    """A verifier home trusting ``ca``; returns (admin token, reader token)."""
    from verifier.service.config import add_reader_token, init_home

    admin = init_home(path, verifier_id="test-verifier")
    shutil.copyfile(ca.root, path / "roots" / "root.pem")
    shutil.copyfile(ca.issuer, path / "intermediates" / "issuer.pem")
    if overrides:
        cfg = path / "verifier.yaml"
        raw = yaml.safe_load(cfg.read_text())
        raw.update(overrides)
        cfg.write_text(yaml.safe_dump(raw))
    reader = add_reader_token(path)
    return admin, reader


@pytest.fixture(scope="session")
def pg_database(postgres_url: str) -> Iterator[Callable[[], str]]:
    """Creates dedicated PostgreSQL databases on demand; drops them at the end."""
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"vtpm_svc_{secrets.token_hex(4)}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        made.append(name)
        return postgres_url.rsplit("/", 1)[0] + "/" + name

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def service(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    ek_ca: EkCa,
) -> Iterator[Service]:
    backend = request.param
    home = tmp_path_factory.mktemp(f"home-{backend}")
    # ek_ca's CA only exists once a TPM was provisioned: make one now
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    admin, reader = make_home(home, ek_ca, nonce_lifetime_s=3)
    db_url = request.getfixturevalue("pg_database")() if backend == "postgres" else None
    server = Server(home, db_url).start()
    try:
        yield Service(backend, home, db_url, admin, reader, server, ek_ca)
    finally:
        server.stop()
