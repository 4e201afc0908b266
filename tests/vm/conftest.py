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

import pytest

from vtpm_core.store import VtpmStore
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.vm import (
    DebianKernel,
    EspImage,
    Initramfs,
    build_esp,
    build_initramfs,
    default_cache_dir,
    fetch_debian_kernel,
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
        kwargs = {} if cmdline is None else {"cmdline": cmdline}
        return build_esp(
            self.cache,
            kernel=self.kernel.vmlinuz,
            initrd=self.initramfs.path,
            secure_boot=secure_boot,
            **kwargs,
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


def provision_vtpm(work: Path, name: str = "vm") -> ProvisionedVtpm:
    """A vTPM in a fresh store, its EK certificates issued by a fresh project CA (in NV)."""
    from ca.home import CaHome
    from ca.issuer import LocalCaIssuer

    home = CaHome(work / "ca")
    home.init(passphrase=CA_PASSPHRASE)
    store = VtpmStore.init(work / "store")
    with LocalCaIssuer.open(work / "ca", passphrase=CA_PASSPHRASE) as issuer:
        store.create(name, issuer=issuer)
    return ProvisionedVtpm(name, store, work / "ca" / "chain.pem")


@pytest.fixture
def vm_vtpm(tmp_path: Path) -> Iterator[tuple[ProvisionedVtpm, SwtpmProcess]]:
    """A store vTPM (EK certs from our CA) started for QEMU, sockets in a short private dir."""
    prov = provision_vtpm(tmp_path / "vtpm")
    sock_dir = Path(tempfile.mkdtemp(prefix="vtpm-swtpm-"))
    try:
        with prov.store.running(prov.name, transport="qemu", socket_dir=sock_dir) as tpm:
            yield prov, tpm
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
