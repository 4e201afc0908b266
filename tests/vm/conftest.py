"""Fixtures for the real-VM tests: guest images built once per session, a provisioned vTPM.

The kernel, initramfs and ESP images live in the VM cache
(``$VTPM_VM_CACHE`` or ``~/.cache/vtpm-trust/vm``) and are reused across
sessions: they are named after digests of their inputs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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
    state_dir: Path
    ca_root: Path  # the local CA's root certificate (PEM)
    ca_issuer: Path  # the intermediate that signed the EK certificate


def provision_vtpm(work: Path) -> ProvisionedVtpm:
    """A fresh vTPM state with an RSA EK certificate in NV 0x01C00002 (swtpm_setup + swtpm_localca).

    Stand-in until the project's vTPM store provisions EK certificates from our CA.
    """
    state = work / "tpmstate"
    ca = work / "localca"
    state.mkdir(parents=True)
    ca.mkdir()
    (work / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (work / "swtpm_setup.conf").write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {work}/localca.conf\n"
        "create_certs_tool_options = /etc/swtpm-localca.options\n"
    )
    done = subprocess.run(
        [
            "swtpm_setup", "--tpm2", "--tpmstate", str(state),
            "--config", str(work / "swtpm_setup.conf"),
            "--create-ek-cert", "--lock-nvram", "--pcr-banks", "sha1,sha256",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"swtpm_setup failed: {done.stdout}{done.stderr}"
    return ProvisionedVtpm(state, ca / "swtpm-localca-rootca-cert.pem", ca / "issuercert.pem")


@pytest.fixture
def vm_vtpm(tmp_path: Path) -> Iterator[tuple[ProvisionedVtpm, SwtpmProcess]]:
    """A provisioned vTPM started for QEMU (control socket in a short private dir)."""
    prov = provision_vtpm(tmp_path / "vtpm")
    sock_dir = Path(tempfile.mkdtemp(prefix="vtpm-swtpm-"))
    try:
        with SwtpmProcess(prov.state_dir, transport="qemu", socket_dir=sock_dir) as tpm:
            yield prov, tpm
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
