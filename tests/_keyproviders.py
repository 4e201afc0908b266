"""Key-provider fixtures shared by tests/vtpm_core and tests/cli: a SoftHSM2 token, a PyKMIP server.

Loaded by ``pytest_plugins`` in tests/conftest.py.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vtpm_core._kmip import KmipServer, kmip_server

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SOFTHSM_PIN = "1234"


@dataclass(frozen=True)
class SoftHsmToken:
    module: str
    label: str
    pin: str
    conf: Path


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsmToken]:
    """A fresh SoftHSM2 token in ``tmp_path`` (SOFTHSM2_CONF points at it).

    python-pkcs11 keeps one loaded library per process and SoftHSM2 reads
    SOFTHSM2_CONF at C_Initialize, so the module is unloaded before and after.
    """
    import pkcs11

    pkcs11.unload(SOFTHSM_MODULE)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    label = f"vtpm-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", label),
            *("--pin", SOFTHSM_PIN, "--so-pin", "5678"),
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield SoftHsmToken(SOFTHSM_MODULE, label, SOFTHSM_PIN, conf)
    finally:
        pkcs11.unload(SOFTHSM_MODULE)


@pytest.fixture(scope="session")
def kmip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmipServer]:
    """One real PyKMIP server (mutual TLS on 127.0.0.1) for the session."""
    with kmip_server(tmp_path_factory.mktemp("kmip")) as server:
        yield server
