"""A reproducible initramfs for the attestation guest, built in pure Python.

Format: the "newc" cpio archive (magic ``070701``) as the kernel's
initramfs unpacker reads it (Linux ``Documentation/driver-api/early-userspace/
buffer-format.rst``), gzip-compressed (RFC 1952) with a zero mtime and no
file name. Device nodes (/dev/console, /dev/null) are cpio entries, so
nothing here needs root or ``mknod``.

Reproducible: entries in byte-sorted path order, inode numbers assigned in
that order, mtime 0, uid/gid 0. The same inputs give the same bytes, hence
the same PCR9 initrd digest that the kernel's EFI stub measures.

Contents: busybox (static), ``/usr/bin/tpm2`` and every shared library it
needs (found with ``ldd``) plus ``libtss2-tcti-device.so.0``, which the TCTI
loader dlopen()s and ldd cannot see; the virtio / fw_cfg modules of the
guest kernel (``.ko.xz`` decompressed with lzma); and ``/init``
(``guest_init.sh``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import lzma
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vtpm_core.errors import ConfigError, NotFoundError
from vtpm_core.vm.kernel import DebianKernel

__all__ = [
    "GUEST_MODULES",
    "CpioEntry",
    "Initramfs",
    "build_initramfs",
    "guest_init_script",
    "newc_archive",
]

# load order matters: dependencies first
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "qemu_fw_cfg",
)
_BUSYBOX = Path("/bin/busybox")
_TPM2 = Path("/usr/bin/tpm2")
_DLOPENED = (Path("/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0"),)
_LIBDIR = "lib/x86_64-linux-gnu"
_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFCHR = 0o020000


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member: a directory, a regular file or a character device."""

    path: str  # relative, no leading slash
    mode: int  # full st_mode (type bits + permissions)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class Initramfs:
    """A built initramfs image."""

    path: Path
    sha256: bytes
    members: tuple[str, ...] = field(default=())


def _header(ino: int, entry: CpioEntry, nlink: int, namesize: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        namesize,
        0,  # check
    )
    return b"070701" + b"".join(b"%08X" % v for v in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """The uncompressed newc cpio archive of ``entries`` plus the parent directories.

    Entries are sorted by path; missing parent directories are added with
    mode 0755. Duplicate paths are a ConfigError.
    """
    by_path: dict[str, CpioEntry] = {}
    for e in entries:
        p = e.path.strip("/")
        if not p or ".." in p.split("/"):
            raise ConfigError(f"bad initramfs path {e.path!r}")
        if p in by_path:
            raise ConfigError(f"duplicate initramfs path {p!r}")
        by_path[p] = CpioEntry(p, e.mode, e.data, e.rdev)
    for p in list(by_path):
        parts = p.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            by_path.setdefault(parent, CpioEntry(parent, _S_IFDIR | 0o755))
    out = bytearray()
    for ino, path in enumerate(sorted(by_path, key=lambda s: s.encode()), start=1):
        e = by_path[path]
        name = path.encode() + b"\0"
        nlink = 2 if e.mode & 0o170000 == _S_IFDIR else 1
        hdr = _header(ino, e, nlink, len(name))
        out += hdr + name + _pad4(len(hdr) + len(name))
        out += e.data + _pad4(len(e.data))
    trailer = CpioEntry("TRAILER!!!", 0)
    name = b"TRAILER!!!\0"
    hdr = _header(0, trailer, 1, len(name))
    out += hdr + name + _pad4(len(hdr) + len(name))
    return bytes(out)


def guest_init_script() -> bytes:
    """The guest's /init (``guest_init.sh`` shipped with this package)."""
    return importlib.resources.files("vtpm_core.vm").joinpath("guest_init.sh").read_bytes()


def _shared_libraries(binary: Path) -> list[Path]:
    """What ``ldd`` says ``binary`` loads (absolute paths, the loader included)."""
    try:
        done = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError as exc:
        raise ConfigError("ldd not found (Debian package libc-bin)") from exc
    if done.returncode != 0:
        raise ConfigError(f"ldd {binary} failed: {done.stderr.strip() or done.stdout.strip()}")
    libs = []
    for line in done.stdout.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _module_file(kernel: DebianKernel, name: str) -> Path:
    for suffix in (".ko", ".ko.xz"):
        hits = sorted(kernel.modules_dir.rglob(name + suffix))
        if hits:
            return hits[0]
    raise NotFoundError(f"kernel module {name} not found under {kernel.modules_dir}")


def _input_files(kernel: DebianKernel) -> dict[str, Path]:
    for required in (_BUSYBOX, _TPM2, *_DLOPENED):
        if not required.exists():
            raise NotFoundError(
                f"{required} missing (Debian packages busybox-static, tpm2-tools, libtss2-dev)"
            )
    files: dict[str, Path] = {"bin/busybox": _BUSYBOX, "usr/bin/tpm2": _TPM2}
    for lib in _DLOPENED:
        files[f"{_LIBDIR}/{lib.name}"] = lib
    for binary in (_TPM2, *_DLOPENED):
        for lib in _shared_libraries(binary):
            if lib.parent.name == "lib64":
                files[f"lib64/{lib.name}"] = lib
            else:
                files[f"{_LIBDIR}/{lib.name}"] = lib
    for mod in GUEST_MODULES:
        files[f"lib/modules/{mod}.ko"] = _module_file(kernel, mod)
    return files


def _read(path: Path) -> bytes:
    data = path.read_bytes()  # follows symlinks, like cp -L
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def build_initramfs(
    kernel: DebianKernel,
    out_dir: Path,
    *,
    init_script: bytes | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Initramfs:
    """Build (or reuse) the guest initramfs in ``out_dir``.

    The file is named after a digest of its inputs, so a second call with
    the same inputs returns the existing file without rebuilding it.
    ``extra_files`` maps archive paths to contents (mode 0644).
    """
    init = init_script if init_script is not None else guest_init_script()
    sources = _input_files(kernel)
    entries = [
        CpioEntry("init", _S_IFREG | 0o755, init),
        CpioEntry("dev/console", _S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", _S_IFCHR | 0o666, rdev=(1, 3)),
    ]
    entries += [CpioEntry(d, _S_IFDIR | 0o755) for d in ("proc", "sys", "tmp", "run")]
    for path, src in sorted(sources.items()):
        executable = path.startswith(("bin/", "usr/bin/", "lib64/"))
        entries.append(CpioEntry(path, _S_IFREG | (0o755 if executable else 0o644), _read(src)))
    for path, data in sorted((extra_files or {}).items()):
        entries.append(CpioEntry(path, _S_IFREG | 0o644, data))
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(b"%s\0%o\0%d:%d\0" % (e.path.encode(), e.mode, *e.rdev))
        h.update(hashlib.sha256(e.data).digest())
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"initrd-{h.hexdigest()[:16]}.img"
    members = tuple(sorted(e.path for e in entries))
    if target.is_file():
        data = target.read_bytes()
        return Initramfs(target, hashlib.sha256(data).digest(), members)
    data = gzip.compress(newc_archive(entries), compresslevel=6, mtime=0)
    tmp = target.with_suffix(f".tmp.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(target)
    return Initramfs(target, hashlib.sha256(data).digest(), members)
