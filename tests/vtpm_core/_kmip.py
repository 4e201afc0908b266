"""A real PyKMIP server (``pykmip-server``) on 127.0.0.1 with mutual TLS, for tests and bench.

The certificates are made here with cryptography: a CA, a server
certificate for 127.0.0.1/localhost (serverAuth) and client certificates
(clientAuth), ECDSA P-256. The server runs as its own process from this
venv's ``pykmip-server``, on a free port, and is stopped by PID.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests._server import free_port
from vtpm_core._process import stop_child
from vtpm_core.keyprovider_kmip import KmipConfig

STOP_GRACE_S = 0.5  # the server joins every thread for 10 s on SIGTERM; its data is scratch


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of client ``name`` (made on first use)."""
        cert, key = self.ca.parent / f"{name}.pem", self.ca.parent / f"{name}.key"
        if not cert.exists():
            _issue(self.ca.parent, name, ExtendedKeyUsageOID.CLIENT_AUTH)
        return cert, key


def _save(
    directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> None:
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / f"{name}.key").chmod(0o600)
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(directory: Path, name: str) -> None:
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _save(directory, "ca", key, cert)


def _issue(directory: Path, name: str, eku: x509.ObjectIdentifier) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
    )
    if eku == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    _save(directory, name, key, builder.sign(ca_key, hashes.SHA256()))


def make_pki(directory: Path, ca_name: str = "test KMS CA") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, ca_name)
    _issue(directory, "server", ExtendedKeyUsageOID.SERVER_AUTH)
    return Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")


@dataclass(frozen=True)
class KmipServer:
    pki: Pki
    port: int
    log: Path
    pid: int

    def config(self, client: str = "vtpm-client", **kw: object) -> KmipConfig:
        cert, key = self.pki.client(client)
        return KmipConfig(
            host="127.0.0.1",
            port=self.port,
            ca=self.pki.ca,
            cert=cert,
            key=key,
            **kw,  # type: ignore[arg-type]
        )


def _listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@contextmanager
def kmip_server(directory: Path) -> Iterator[KmipServer]:
    """Start ``pykmip-server`` with mTLS (TLS 1.2 suite, client auth) in ``directory``; stop it."""
    pki = make_pki(directory / "pki")
    port = free_port()
    (directory / "policies").mkdir(exist_ok=True)
    conf = directory / "server.conf"
    conf.write_text(
        "[server]\n"
        "hostname=127.0.0.1\n"
        f"port={port}\n"
        f"certificate_path={pki.server_cert}\n"
        f"key_path={pki.server_key}\n"
        f"ca_path={pki.ca}\n"
        "auth_suite=TLS1.2\n"
        f"policy_path={directory / 'policies'}\n"
        "enable_tls_client_auth=True\n"
        "tls_cipher_suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\n"
        "    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\n"
        "logging_level=INFO\n"
        f"database_path={directory / 'kmip.sqlite'}\n"
    )
    log = directory / "server.log"
    server = Path(sys.executable).parent / "pykmip-server"
    with open(directory / "server.out", "wb") as out:
        proc = subprocess.Popen(
            [str(server), "-f", str(conf), "-l", str(log)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,  # its own group: pykmip-server forks a child per session
        )
    try:
        if not _listening(port, proc, 30.0):
            tail = (directory / "server.out").read_text()[-2000:]
            raise AssertionError(f"pykmip-server did not listen on {port}: {tail}")
        yield KmipServer(pki, port, log, proc.pid)
    finally:
        stop_child(proc, STOP_GRACE_S)
        # The session processes it forked outlive their parent; end the whole group.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
