"""One call from "a running vTPM" to "a booted guest whose TPM I can drive".

:func:`boot_guest` builds (or reuses from the cache) the kernel, the
initramfs and the ESP, boots a :class:`QemuVm` with the given swtpm, waits for
the guest's READY and yields a :class:`GuestSession`. On exit it asks the
guest to power off, waits for QEMU, and stops it by PID if it lingers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.vm.channel import IMA_CMDLINE_FLAG, GuestChannel
from vtpm_core.vm.esp import DEFAULT_CMDLINE, EspImage, build_esp
from vtpm_core.vm.initramfs import build_initramfs
from vtpm_core.vm.kernel import default_cache_dir, fetch_debian_kernel
from vtpm_core.vm.qemu import QemuVm, VmArtifacts

__all__ = ["GuestSession", "boot_guest", "guest_esp", "ima_cmdline"]


@dataclass
class GuestSession:
    """A booted guest: its channel, its VM and the ESP it booted."""

    channel: GuestChannel
    vm: QemuVm
    esp: EspImage
    artifacts: VmArtifacts | None = None  # set when the session has ended


def ima_cmdline(cmdline: str = DEFAULT_CMDLINE) -> str:
    """``cmdline`` with the flag that makes the guest load its IMA policy (once)."""
    if IMA_CMDLINE_FLAG in cmdline.split():
        return cmdline
    return f"{cmdline} {IMA_CMDLINE_FLAG}"


def guest_esp(
    *,
    kernel: Path | None = None,
    initrd: Path | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    secure_boot: bool = False,
    cache_dir: Path | None = None,
) -> EspImage:
    """The ESP for these inputs; kernel and initrd default to Debian's kernel and our initramfs."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    if kernel is None or initrd is None:
        debian = fetch_debian_kernel(cache)
        kernel = kernel if kernel is not None else debian.vmlinuz
        initrd = initrd if initrd is not None else build_initramfs(debian, cache).path
    return build_esp(cache, kernel=kernel, initrd=initrd, cmdline=cmdline, secure_boot=secure_boot)


@contextlib.contextmanager
def boot_guest(
    tpm: SwtpmProcess,
    run_dir: Path,
    *,
    esp: EspImage | None = None,
    secure_boot: bool = False,
    cmdline: str = DEFAULT_CMDLINE,
    cache_dir: Path | None = None,
    timeout_s: float = 240.0,
    boot_timeout_s: float = 180.0,
    memory_mib: int = 1024,
) -> Iterator[GuestSession]:
    """Boot the attestation guest on ``tpm`` (started with ``transport="qemu"``)."""
    if esp is None:
        esp = guest_esp(cmdline=cmdline, secure_boot=secure_boot, cache_dir=cache_dir)
    vm = QemuVm(run_dir, esp=esp, tpm=tpm, timeout_s=timeout_s, memory_mib=memory_mib)
    with vm:
        channel = vm.connect(boot_timeout=boot_timeout_s)
        session = GuestSession(channel, vm, esp)
        try:
            yield session
        finally:
            channel.close()
            session.artifacts = vm.wait(30)
