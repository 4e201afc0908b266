"""An EFI system partition image that boots the guest with systemd-boot.

Layout (UEFI 2.10 section 13.3.1.3, removable-media boot path; systemd's
Boot Loader Specification, type #1 entries)::

    EFI/BOOT/BOOTX64.EFI           systemd-boot
    loader/loader.conf             default attest.conf, timeout 0
    loader/entries/attest.conf     linux /vmlinuz, initrd /initrd.img, options <cmdline>
    vmlinuz, initrd.img

A FAT32 "superfloppy" (no partition table) made with mkfs.vfat and filled
with mtools, so no loop device or root is needed.

What the firmware and the loader measure (TCG PC Client PFP 1.05 10.4.4,
systemd-boot 252): OVMF measures systemd-boot and the kernel file as
EV_EFI_BOOT_SERVICES_APPLICATION into PCR4 (Authenticode digests of the
exact files put here, signed or not); systemd-boot measures the entry's
options (UTF-16LE with a NUL) into PCR12; the kernel's EFI stub measures the
command line into PCR9 and the initrd file into PCR9.

Secure boot: both binaries are signed with Debian's *test-only* snakeoil key
shipped with the ovmf package, whose enrolled variables
(OVMF_VARS_4M.snakeoil.fd) trust it. Its documented password is
"snakeoil"; it protects nothing and must never sign anything real.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vtpm_core.errors import ConfigError, NotFoundError

__all__ = [
    "DEFAULT_CMDLINE",
    "SNAKEOIL_CERT",
    "SNAKEOIL_KEY",
    "SYSTEMD_BOOT",
    "EspImage",
    "build_esp",
    "loader_entry",
    "measured_load_options",
    "sign_efi",
]

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
SNAKEOIL_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")
SNAKEOIL_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
# Debian documents this password (ovmf README.Debian); the key is test-only.
_SNAKEOIL_PASSWORD = b"snakeoil"
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 loglevel=4"
ENTRY_NAME = "attest.conf"
_TOOL_TIMEOUT_S = 120
_MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class EspImage:
    """A built ESP image and the exact files on it (for digest checks)."""

    path: Path
    bootloader: Path  # the file at EFI/BOOT/BOOTX64.EFI (signed if secure_boot)
    kernel: Path  # the file at /vmlinuz (signed if secure_boot)
    initrd: Path
    cmdline: str
    secure_boot: bool


def loader_entry(cmdline: str) -> bytes:
    """The systemd-boot entry text for ``cmdline``; ConfigError on control characters."""
    if not cmdline.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in cmdline):
        raise ConfigError("kernel command line must be one non-empty line without control chars")
    return (
        f"title vtpm-trust attestation guest\nlinux /vmlinuz\ninitrd /initrd.img\n"
        f"options {cmdline}\n"
    ).encode()


def measured_load_options(cmdline: str) -> str:
    """The kernel LoadOptions systemd-boot 252 builds from our entry.

    It prepends ``initrd=\\initrd.img`` for the entry's initrd; this string,
    UTF-16LE with a terminating NUL, is what lands in PCR12 (EV_IPL, by
    systemd-boot) and PCR9 (EV_EVENT_TAG, by the kernel's EFI stub).
    """
    return f"initrd=\\initrd.img {cmdline}"


def _loader_conf() -> bytes:
    return f"default {ENTRY_NAME}\ntimeout 0\n".encode()


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, env=env, check=False
        )
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{cmd[0]} not found (Debian packages dosfstools, mtools, sbsigntool)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"{cmd[0]} did not finish in {_TOOL_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        msg = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise ConfigError(f"{cmd[0]} failed ({done.returncode}): {msg[-1] if msg else ''}")


def sign_efi(
    src: Path,
    dst: Path,
    *,
    key: Path = SNAKEOIL_KEY,
    cert: Path = SNAKEOIL_CERT,
    password: bytes | None = _SNAKEOIL_PASSWORD,
) -> Path:
    """Sign a PE/COFF EFI binary with sbsign (an existing signature is kept, one is added).

    The key is decrypted into a private temporary file that is removed at
    once; with the default snakeoil key that protects nothing.
    """
    from cryptography.hazmat.primitives import serialization

    for p in (key, cert, src):
        if not p.is_file():
            raise NotFoundError(f"{p} missing (the snakeoil key comes with the 'ovmf' package)")
    try:
        pkey = serialization.load_pem_private_key(key.read_bytes(), password=password)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load signing key {key}: {exc}") from exc
    pem = pkey.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with tempfile.TemporaryDirectory(prefix="vtpm-sign-") as tmp:
        key_file = Path(tmp) / "key.pem"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        out = Path(tmp) / "signed.efi"
        _run(
            ["sbsign", "--key", str(key_file), "--cert", str(cert), "--output", str(out), str(src)]
        )
        shutil.copyfile(out, dst)
    return dst


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_esp(
    out_dir: Path,
    *,
    kernel: Path,
    initrd: Path,
    cmdline: str = DEFAULT_CMDLINE,
    secure_boot: bool = False,
    bootloader: Path = SYSTEMD_BOOT,
) -> EspImage:
    """Build (or reuse) an ESP image in ``out_dir`` booting ``kernel`` + ``initrd``.

    Named after a digest of its inputs: a second call with the same inputs
    returns the existing image. With ``secure_boot`` the bootloader and the
    kernel are signed with the snakeoil test key first.
    """
    entry = loader_entry(cmdline)
    for p in (kernel, initrd, bootloader):
        if not p.is_file():
            raise NotFoundError(f"{p} missing")
    h = hashlib.sha256()
    for part in (_file_digest(kernel), _file_digest(initrd), _file_digest(bootloader)):
        h.update(part.encode() + b"\0")
    h.update(entry + b"\0" + (b"sb" if secure_boot else b"nosb"))
    tag = h.hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / f"esp-{tag}"
    image = work / "esp.img"
    boot_file, kernel_file = work / "BOOTX64.EFI", work / "vmlinuz"
    result = EspImage(image, boot_file, kernel_file, initrd, cmdline, secure_boot)
    if image.is_file() and boot_file.is_file() and kernel_file.is_file():
        return result
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".esp-"))
    try:
        t_boot, t_kernel = tmp / "BOOTX64.EFI", tmp / "vmlinuz"
        if secure_boot:
            sign_efi(bootloader, t_boot)
            sign_efi(kernel, t_kernel)
        else:
            shutil.copyfile(bootloader, t_boot)
            shutil.copyfile(kernel, t_kernel)
        (tmp / "loader.conf").write_bytes(_loader_conf())
        (tmp / ENTRY_NAME).write_bytes(entry)
        payload = sum(p.stat().st_size for p in (t_boot, t_kernel, initrd))
        size_mib = max(48, (payload * 5 // 4) // _MIB + 16)
        img = tmp / "esp.img"
        with open(img, "wb") as f:
            f.truncate(size_mib * _MIB)
        _run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-i", "7654321A", str(img)])
        env = dict(os.environ, MTOOLS_SKIP_CHECK="1")  # a superfloppy has no partition table
        _run(
            ["mmd", "-i", str(img), "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"], env
        )
        for src, dst in (
            (t_boot, "::/EFI/BOOT/BOOTX64.EFI"),
            (tmp / "loader.conf", "::/loader/loader.conf"),
            (tmp / ENTRY_NAME, f"::/loader/entries/{ENTRY_NAME}"),
            (t_kernel, "::/vmlinuz"),
            (initrd, "::/initrd.img"),
        ):
            _run(["mcopy", "-i", str(img), str(src), dst], env)
        work.mkdir(exist_ok=True)
        for name in ("BOOTX64.EFI", "vmlinuz", "esp.img"):
            (tmp / name).replace(work / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
