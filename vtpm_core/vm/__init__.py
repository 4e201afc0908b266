"""A real VM with the project's vTPM: QEMU + OVMF + systemd-boot + a tpm2-tools guest.

Build once (cached): :func:`fetch_debian_kernel` → :func:`build_initramfs` →
:func:`build_esp`; then per boot: start a :class:`~vtpm_core.swtpm.SwtpmProcess`
with ``transport="qemu"``, run a :class:`QemuVm`, and drive the guest's TPM
through :class:`GuestChannel` (hello, activate_credential, quote, ima_list,
exec_copy, close). A command line from :func:`ima_cmdline` boots the guest
with IMA measuring into PCR 10.
"""

from vtpm_core.vm.channel import (
    IMA_CMDLINE_FLAG,
    PROTOCOL_VERSION,
    GuestChannel,
    GuestIdentity,
    GuestQuote,
    GuestTimeoutError,
    validate_selection,
)
from vtpm_core.vm.esp import (
    DEFAULT_CMDLINE,
    EspImage,
    build_esp,
    loader_entry,
    measured_load_options,
    sign_efi,
)
from vtpm_core.vm.guest import GuestSession, boot_guest, guest_esp, ima_cmdline
from vtpm_core.vm.initramfs import Initramfs, build_initramfs, newc_archive
from vtpm_core.vm.kernel import DebianKernel, default_cache_dir, fetch_debian_kernel
from vtpm_core.vm.qemu import OvmfFirmware, QemuVm, VmArtifacts, ovmf_firmware

__all__ = [
    "DEFAULT_CMDLINE",
    "IMA_CMDLINE_FLAG",
    "PROTOCOL_VERSION",
    "DebianKernel",
    "EspImage",
    "GuestChannel",
    "GuestIdentity",
    "GuestQuote",
    "GuestSession",
    "GuestTimeoutError",
    "Initramfs",
    "OvmfFirmware",
    "QemuVm",
    "VmArtifacts",
    "boot_guest",
    "build_esp",
    "build_initramfs",
    "default_cache_dir",
    "fetch_debian_kernel",
    "guest_esp",
    "ima_cmdline",
    "loader_entry",
    "measured_load_options",
    "newc_archive",
    "ovmf_firmware",
    "sign_efi",
    "validate_selection",
]
