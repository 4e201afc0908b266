"""The guest images without booting: the cpio writer, the initramfs contents, the ESP layout."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

from tests.vm.conftest import GuestImages
from tests.vtpm_core.test_authenticode import embedded_digests
from vtpm_core.authenticode import authenticode_digest
from vtpm_core.errors import ConfigError
from vtpm_core.vm import DEFAULT_CMDLINE, build_initramfs, loader_entry, newc_archive
from vtpm_core.vm.esp import SNAKEOIL_CERT
from vtpm_core.vm.initramfs import CpioEntry

pytestmark = pytest.mark.vm


def _cpio_list(archive: bytes, tmp_path: Path) -> list[str]:
    """``cpio -itv`` (GNU cpio, an independent reader) on the archive."""
    f = tmp_path / "a.cpio"
    f.write_bytes(archive)
    done = subprocess.run(
        ["cpio", "-itv", "--quiet", "-F", str(f)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_newc_archive_is_read_by_gnu_cpio(tmp_path: Path) -> None:
    archive = newc_archive(
        [
            CpioEntry("init", 0o100755, b"#!/bin/sh\n"),
            CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
            CpioEntry("usr/bin/x", 0o100644, b"abc"),
        ]
    )
    lines = _cpio_list(archive, tmp_path)
    names = [ln.split()[-1] for ln in lines]
    assert names == ["dev", "dev/console", "init", "usr", "usr/bin", "usr/bin/x"]
    console = next(ln for ln in lines if ln.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    assert len(archive) % 4 == 0


def test_newc_archive_is_reproducible() -> None:
    entries = [CpioEntry("b", 0o100644, b"2"), CpioEntry("a/c", 0o100644, b"1")]
    assert newc_archive(entries) == newc_archive(list(reversed(entries)))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([CpioEntry("a", 0o100644), CpioEntry("/a", 0o100644)], "duplicate initramfs path"),
        ([CpioEntry("../etc/passwd", 0o100644)], "bad initramfs path"),
        ([CpioEntry("/", 0o040755)], "bad initramfs path"),
    ],
    ids=["fail/path/duplicate", "fail/path/dotdot", "fail/path/empty"],
)
def test_newc_archive_rejects_bad_paths(entries: list[CpioEntry], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        newc_archive(entries)


def test_initramfs_holds_what_the_guest_needs(guest_images: GuestImages, tmp_path: Path) -> None:
    archive = gzip.decompress(guest_images.initramfs.path.read_bytes())
    lines = _cpio_list(archive, tmp_path)
    names = {ln.split()[-1] for ln in lines}
    for needed in (
        "init",
        "bin/busybox",
        "usr/bin/tpm2",
        "lib/x86_64-linux-gnu/libtss2-tcti-device.so.0",  # dlopen()ed: ldd cannot see it
        "lib/x86_64-linux-gnu/libtss2-esys.so.0",
        "lib/x86_64-linux-gnu/libcrypto.so.3",
        "lib64/ld-linux-x86-64.so.2",
        "lib/modules/qemu_fw_cfg.ko",
        "lib/modules/virtio_pci.ko",
    ):
        assert needed in names, needed
    assert any(ln.startswith("crw-rw-rw-") and ln.endswith("dev/null") for ln in lines)
    assert all("Jan  1  1970" in ln for ln in lines)  # mtime 0 everywhere


def test_initramfs_rebuild_is_bit_identical(guest_images: GuestImages, tmp_path: Path) -> None:
    again = build_initramfs(guest_images.kernel, tmp_path)
    assert again.path != guest_images.initramfs.path
    assert again.sha256 == guest_images.initramfs.sha256


def test_debian_kernel_signature_digest_equals_ours(guest_images: GuestImages) -> None:
    kernel = guest_images.kernel.vmlinuz.read_bytes()
    assert embedded_digests(kernel) == [("sha256", authenticode_digest(kernel))]


def _mtype(image: Path, path: str) -> bytes:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    done = subprocess.run(
        ["mtype", "-i", str(image), path], capture_output=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_esp_layout_and_entry(guest_images: GuestImages) -> None:
    esp = guest_images.esp()
    assert _mtype(esp.path, "::/loader/entries/attest.conf") == loader_entry(DEFAULT_CMDLINE)
    assert _mtype(esp.path, "::/loader/loader.conf") == b"default attest.conf\ntimeout 0\n"
    assert _mtype(esp.path, "::/vmlinuz") == esp.kernel.read_bytes()
    assert _mtype(esp.path, "::/EFI/BOOT/BOOTX64.EFI") == esp.bootloader.read_bytes()
    assert _mtype(esp.path, "::/initrd.img") == guest_images.initramfs.path.read_bytes()


def test_other_cmdline_gives_another_esp(guest_images: GuestImages) -> None:
    a = guest_images.esp()
    b = guest_images.esp(cmdline=DEFAULT_CMDLINE + " quiet")
    assert a.path != b.path
    assert _mtype(b.path, "::/loader/entries/attest.conf").endswith(b"loglevel=4 quiet\n")
    assert guest_images.esp().path == a.path  # cached by content


def test_secure_boot_esp_is_signed_with_the_snakeoil_key(guest_images: GuestImages) -> None:
    esp = guest_images.esp(secure_boot=True)
    for f in (esp.bootloader, esp.kernel):
        done = subprocess.run(
            ["sbverify", "--cert", str(SNAKEOIL_CERT), str(f)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr + done.stdout
    # Debian's own signature stays beside ours on the kernel
    assert len(embedded_digests(esp.kernel.read_bytes())) == 2


@pytest.mark.parametrize(
    "cmdline",
    ["", "   ", "console=ttyS0\ninitrd /evil", "a\tb"],
    ids=["fail/cmdline/empty", "fail/cmdline/blank", "fail/cmdline/newline", "fail/cmdline/tab"],
)
def test_loader_entry_rejects_bad_cmdlines(cmdline: str) -> None:
    with pytest.raises(ConfigError, match="one non-empty line"):
        loader_entry(cmdline)
