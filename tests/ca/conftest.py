"""CA test fixtures: real EK publics from tpm2-tools on a real swtpm, CA homes in tmp dirs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.home import CaHome, OpenedCa
from vtpm_core.swtpm import SwtpmProcess

PASSPHRASE = b"correct horse battery staple"


def _tool(tpm: SwtpmProcess, cwd: Path, *args: str) -> None:
    result = subprocess.run(
        list(args), env=tpm.tool_env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    subprocess.run(["tpm2_flushcontext", "-t"], env=tpm.tool_env, capture_output=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed: {result.stderr}")


@pytest.fixture(scope="session")
def tpm_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """TPM2B_PUBLICs written by tpm2-tools 5.4 on one real swtpm (shared by the CA tests):
    RSA and ECC EKs (tpm2_createek), an AK (tpm2_createak) and a plain key (tpm2_create)."""
    work = tmp_path_factory.mktemp("tpmkeys")
    with SwtpmProcess(work / "state") as tpm:
        _tool(tpm, work, "tpm2_createek", "-c", "ek-rsa.ctx", "-G", "rsa", "-u", "ek-rsa.pub")
        _tool(tpm, work, "tpm2_createek", "-c", "ek-ecc.ctx", "-G", "ecc", "-u", "ek-ecc.pub")
        _tool(tpm, work, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
        _tool(tpm, work, "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-u", "ak.pub")
        _tool(tpm, work, "tpm2_createprimary", "-C", "o", "-c", "prim.ctx")
        _tool(tpm, work, "tpm2_create", "-C", "prim.ctx", "-u", "key.pub", "-r", "key.priv")
        _tool(tpm, work, "tpm2_readpublic", "-c", "ek-rsa.ctx", "-f", "pem", "-o", "ek-rsa.pem")
    names = {
        "ek-rsa": "ek-rsa.pub",
        "ek-ecc": "ek-ecc.pub",
        "ak": "ak.pub",
        "key": "key.pub",
        "ek-rsa-pem": "ek-rsa.pem",
    }
    return {k: (work / v).read_bytes() for k, v in names.items()}


@pytest.fixture
def ca_home(tmp_path: Path) -> CaHome:
    home = CaHome(tmp_path / "ca")
    home.init(passphrase=PASSPHRASE)
    return home


@pytest.fixture
def opened(ca_home: CaHome) -> Iterator[OpenedCa]:
    ca = ca_home.open(passphrase=PASSPHRASE)
    try:
        yield ca
    finally:
        ca.close()
