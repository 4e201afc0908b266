"""Fixtures for the real-VM tests: guest images built once per session, a provisioned vTPM.

The kernel, initramfs and ESP images live in the VM cache
(``$VTPM_VM_CACHE`` or ``~/.cache/vtpm-trust/vm``) and are reused across
sessions: they are named after digests of their inputs.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from vtpm_core.authenticode import authenticode_digest
from vtpm_core.store import VtpmStore
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.vm import (
    DEFAULT_CMDLINE,
    DebianKernel,
    EspImage,
    Initramfs,
    build_esp,
    build_initramfs,
    default_cache_dir,
    fetch_debian_kernel,
    measured_load_options,
)


@pytest.fixture(scope="session")
def vm_cache() -> Path:
    return default_cache_dir()


@pytest.fixture(scope="session")
def guest_kernel(vm_cache: Path) -> DebianKernel:
    return fetch_debian_kernel(vm_cache)


@pytest.fixture(scope="session")
def guest_initramfs(guest_kernel: DebianKernel, vm_cache: Path) -> Initramfs:
    return build_initramfs(guest_kernel, vm_cache)


@dataclass(frozen=True)
class GuestImages:
    kernel: DebianKernel
    initramfs: Initramfs
    cache: Path

    def esp(self, *, secure_boot: bool = False, cmdline: str | None = None) -> EspImage:
        return build_esp(
            self.cache,
            kernel=self.kernel.vmlinuz,
            initrd=self.initramfs.path,
            secure_boot=secure_boot,
            cmdline=DEFAULT_CMDLINE if cmdline is None else cmdline,
        )


@pytest.fixture(scope="session")
def guest_images(
    guest_kernel: DebianKernel, guest_initramfs: Initramfs, vm_cache: Path
) -> GuestImages:
    return GuestImages(guest_kernel, guest_initramfs, vm_cache)


@dataclass(frozen=True)
class ProvisionedVtpm:
    name: str
    store: VtpmStore
    ca_chain: Path  # the project CA's chain.pem (its certificate up to the root)


CA_PASSPHRASE = b"vm test CA passphrase"


def provision_vtpm(work: Path, name: str = "vm", *, ca_dir: Path | None = None) -> ProvisionedVtpm:
    """A vTPM in a fresh store, its EK certificates issued by the project CA (in NV).

    The CA is ``ca_dir`` (made with :data:`CA_PASSPHRASE`) or a fresh one in ``work/ca``.
    """
    from ca.home import CaHome
    from ca.issuer import LocalCaIssuer

    if ca_dir is None:
        ca_dir = work / "ca"
        CaHome(ca_dir).init(passphrase=CA_PASSPHRASE)
    store = VtpmStore.init(work / "store")
    with LocalCaIssuer.open(ca_dir, passphrase=CA_PASSPHRASE) as issuer:
        store.create(name, issuer=issuer)
    return ProvisionedVtpm(name, store, ca_dir / "chain.pem")


@dataclass(frozen=True)
class VmVerifier:
    """`vtpm verifier serve` (gunicorn, SQLite) whose only trust root is the project CA ``ca``."""

    url: str
    admin: str
    ca: Path  # the CA home (passphrase CA_PASSPHRASE)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.admin}", **kwargs.pop("headers", {})}
        return requests.put(f"{self.url}{path}", headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="session")
def vm_verifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmVerifier]:
    from ca.home import CaHome
    from tests.verifier.service.conftest import Server
    from verifier.service.config import init_home

    root = tmp_path_factory.mktemp("vm-verifier")
    CaHome(root / "ca").init(passphrase=CA_PASSPHRASE)
    home = root / "verifier"
    admin = init_home(home, verifier_id="vm-test-verifier")
    shutil.copyfile(root / "ca" / "ca.pem", home / "roots" / "vtpm-ca.pem")
    server = Server(home, None).start()
    try:
        yield VmVerifier(server.url, admin, root / "ca")
    finally:
        server.stop()


@pytest.fixture
def vm_vtpm(
    tmp_path: Path, vm_verifier: VmVerifier
) -> Iterator[tuple[ProvisionedVtpm, SwtpmProcess]]:
    """A store vTPM (EK certs from the verifier's CA) started for QEMU, short socket dir."""
    prov = provision_vtpm(tmp_path / "vtpm", ca_dir=vm_verifier.ca)
    sock_dir = Path(tempfile.mkdtemp(prefix="vtpm-swtpm-"))
    try:
        with prov.store.running(prov.name, transport="qemu", socket_dir=sock_dir) as tpm:
            yield prov, tpm
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def files_policy(name: str, esp: EspImage, *, secure_boot: bool, cmdline: str) -> str:
    """A policy made from the boot files, no boot needed: our Authenticode digests + options."""
    doc = {
        "version": 1,
        "name": name,
        "secure_boot": secure_boot,
        "boot_applications": [
            {
                "name": "BOOTX64.EFI",
                "sha256": authenticode_digest(esp.bootloader.read_bytes()).hex(),
            },
            {"name": "vmlinuz", "sha256": authenticode_digest(esp.kernel.read_bytes()).hex()},
        ],
        "kernel_cmdlines": [{"exact": measured_load_options(cmdline)}],
    }
    return str(yaml.safe_dump(doc, sort_keys=False))


def upload_policy(vmv: VmVerifier, name: str, body: str) -> None:
    """PUT /v1/policies/{name} with the YAML body (admin token)."""
    r = vmv.put(
        f"/v1/policies/{name}", data=body.encode(), headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code in (200, 201), r.text


def upload_and_assign(vmv: VmVerifier, attester_id: str, name: str, body: str) -> None:
    upload_policy(vmv, name, body)
    r = vmv.put(f"/v1/attesters/{attester_id}/policy", json={"policy": name})
    assert r.status_code == 200, r.text
