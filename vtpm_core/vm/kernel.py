"""Fetch Debian's kernel for the test VM without installing it on the host.

``apt-get download`` of the ``linux-image-<version>-amd64`` package that the
``linux-image-amd64`` meta-package points at, then ``dpkg-deb -x`` into a
cache directory. Debian's kernel is an EFI-stub bzImage (PE/COFF), so UEFI
firmware and systemd-boot load it directly and measure it (PCR4).

Guarantees: the returned paths exist; extraction happens in a temporary
directory renamed into place, so a crash never leaves a half-extracted
kernel that a later run would trust. Not checked: the package signature
beyond what apt does for ``apt-get download``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vtpm_core.errors import ConfigError, NotFoundError

__all__ = ["DebianKernel", "default_cache_dir", "fetch_debian_kernel"]

_META_PACKAGE = "linux-image-amd64"
_PACKAGE_RE = re.compile(r"^linux-image-[0-9][A-Za-z0-9.+~-]*$")
_TOOL_TIMEOUT_S = 300


def default_cache_dir() -> Path:
    """``$VTPM_VM_CACHE``, else ``~/.cache/vtpm-trust/vm``."""
    env = os.environ.get("VTPM_VM_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vtpm-trust" / "vm"


@dataclass(frozen=True, slots=True)
class DebianKernel:
    """An extracted Debian kernel package."""

    package: str
    version: str  # the modules directory name, e.g. 6.1.0-56-amd64
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<version>


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"{cmd[0]} not found: install it (Debian package)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"{' '.join(cmd)} did not finish in {_TOOL_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"{' '.join(cmd)} failed ({done.returncode}): {last}")
    return done.stdout


def _depends_on() -> str | None:
    try:
        out = _run(["apt-cache", "depends", _META_PACKAGE])
    except ConfigError:
        return None  # "no packages found": the package lists are not there yet
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-[0-9]\S*)", line)
        if m:
            return m.group(1)
    return None


def resolve_kernel_package() -> str:
    """The versioned linux-image package that ``linux-image-amd64`` depends on.

    On a machine whose apt lists were never fetched, root runs one
    ``apt-get update`` and asks again.
    """
    found = _depends_on()
    if found is None and os.geteuid() == 0:
        _run(["apt-get", "update", "-qq"])
        found = _depends_on()
    if found is not None:
        return found
    raise NotFoundError(
        f"apt-cache knows no kernel behind {_META_PACKAGE} (run 'apt-get update' first)"
    )


def _find_extracted(root: Path, package: str) -> DebianKernel | None:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    mods = (
        sorted((root / "lib" / "modules").glob("*")) if (root / "lib" / "modules").is_dir() else []
    )
    if not kernels or not mods:
        return None
    return DebianKernel(package, mods[0].name, kernels[0], mods[0])


def fetch_debian_kernel(cache_dir: Path | None = None, package: str | None = None) -> DebianKernel:
    """Return the cached kernel, downloading and extracting it on first use.

    ``package`` defaults to what ``linux-image-amd64`` depends on (resolved
    only when nothing is cached yet for it).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if package is None:
        cached = sorted(p for p in cache.glob("linux-image-*") if p.is_dir())
        if cached:
            found = _find_extracted(cached[-1], cached[-1].name)
            if found is not None:
                return found
        package = resolve_kernel_package()
    if not _PACKAGE_RE.match(package):
        raise ConfigError(f"not a Debian kernel image package name: {package!r}")
    target = cache / package
    if target.is_dir():
        found = _find_extracted(target, package)
        if found is not None:
            return found
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".dl-") as tmp:
        tmpdir = Path(tmp)
        _run(["apt-get", "download", package], cwd=tmpdir)
        debs = sorted(tmpdir.glob(f"{package}_*.deb"))
        if not debs:
            raise NotFoundError(f"apt-get download {package} produced no .deb")
        extract = tmpdir / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(extract)])
        if _find_extracted(extract, package) is None:
            raise NotFoundError(f"{package} holds no boot/vmlinuz-* and lib/modules/*")
        try:
            extract.rename(target)
        except OSError:
            if not target.is_dir():  # another process won the race: use its copy
                raise
    found = _find_extracted(target, package)
    if found is None:
        raise NotFoundError(f"{target} holds no extracted kernel")
    return found
