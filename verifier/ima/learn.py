"""Learn a runtime policy: from a known-good IMA list, a directory tree, or Debian packages.

What is learned is trusted by the operator ("known good"); nothing here
proves it. Each source yields digests per path; :func:`build_policy` turns
them into a :class:`RuntimePolicy`, merged into a base policy when given
(several digests per path: the old and the new version of an updated file).

From a list (issue 14 "vtpm ima learn"), entry by entry:

- violation entries (ToMToU / open-writers) teach nothing and are counted;
- ``boot_aggregate`` is left out: it is checked against the quoted PCRs 0-9;
- ``ima-buf`` entries whose buffer is an X.509 certificate are keys loaded
  into the keyring they name (``keyrings``); other buffers go to ``ima_buf``;
- file entries (``ima``, ``ima-ng``, ``ima-sig``, ``ima-modsig``,
  ``evm-sig``) go to ``digests`` by path, kernel modules to
  ``kernel_modules`` (by digest, on any module path) unless told otherwise.

From a tree or a package, every regular file is hashed and recorded under
its absolute path in the target system: IMA records the path of the file
itself, so symbolic links are not followed (their target is recorded under
its own path when it is in the tree) and nothing but regular files is read.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from cryptography import x509

from verifier.ima.policy import (
    Digest,
    ExcludeList,
    RuntimePolicy,
    ViolationMode,
    canonical_algorithm,
    is_kernel_module,
)
from verifier.ima.signature import TrustedKey, TrustedKeys
from vtpm_core.errors import ConfigError

__all__ = [
    "FILE_TEMPLATES",
    "Learned",
    "MeasuredEntry",
    "build_policy",
    "learn_from_debs",
    "learn_from_entries",
    "learn_from_tree",
]

# Templates whose digest is a file's content hash.
FILE_TEMPLATES = frozenset({"ima", "ima-ng", "ima-sig", "ima-modsig", "evm-sig"})
BOOT_AGGREGATE = "boot_aggregate"
_CHUNK = 1 << 20


class MeasuredEntry(Protocol):
    """What learning reads from one list entry (``verifier.ima.entries.ImaEntry`` has it)."""

    @property
    def template_name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def digest_algo(self) -> str: ...
    @property
    def digest(self) -> bytes: ...
    @property
    def buf(self) -> bytes | None: ...
    @property
    def is_violation(self) -> bool: ...


@dataclass(slots=True)
class Learned:
    """Digests gathered from one or more sources, and what was left out (for the report)."""

    digests: dict[str, set[Digest]] = field(default_factory=dict)
    kernel_modules: set[Digest] = field(default_factory=set)
    keyrings: dict[str, set[Digest]] = field(default_factory=dict)
    ima_buf: dict[str, set[Digest]] = field(default_factory=dict)
    files: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def add_file(self, path: str, digest: Digest, *, modules_by_digest: bool) -> None:
        self.files += 1
        if modules_by_digest and is_kernel_module(path):
            self.kernel_modules.add(digest)
        else:
            self.digests.setdefault(path, set()).add(digest)

    def summary(self) -> str:
        parts = [
            f"{len(self.digests)} paths",
            f"{sum(len(v) for v in self.digests.values())} digests",
        ]
        if self.kernel_modules:
            parts.append(f"{len(self.kernel_modules)} kernel modules")
        if self.keyrings:
            parts.append(f"{sum(len(v) for v in self.keyrings.values())} keyring keys")
        if self.ima_buf:
            parts.append(f"{sum(len(v) for v in self.ima_buf.values())} buffers")
        text = ", ".join(parts)
        if self.skipped:
            text += "; left out: " + ", ".join(
                f"{n} {why}" for why, n in sorted(self.skipped.items())
            )
        return text


def _is_certificate(data: bytes) -> bool:
    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        return False
    return True


def learn_from_entries(
    entries: Iterable[MeasuredEntry],
    *,
    into: Learned | None = None,
    modules_by_digest: bool = True,
) -> Learned:
    """Gather what a known-good list measured (see the module docstring for the rules)."""
    learned = into if into is not None else Learned()
    for entry in entries:
        if entry.is_violation:
            learned.skip("violation entries")
            continue
        if entry.path == BOOT_AGGREGATE:
            learned.skip("boot_aggregate (checked against PCRs 0-9)")
            continue
        digest = (canonical_algorithm(entry.digest_algo), entry.digest)
        if entry.template_name == "ima-buf":
            target = (
                learned.keyrings if entry.buf and _is_certificate(entry.buf) else learned.ima_buf
            )
            target.setdefault(entry.path, set()).add(digest)
        elif entry.template_name in FILE_TEMPLATES:
            learned.add_file(entry.path, digest, modules_by_digest=modules_by_digest)
        else:
            learned.skip(f"{entry.template_name} entries (template not learned)")
    return learned


def _hash_stream(fh: IO[bytes], algo: str) -> bytes:
    try:
        h = hashlib.new(algo)
    except ValueError:
        raise ConfigError(f"hash {algo!r} is not available here") from None
    while chunk := fh.read(_CHUNK):
        h.update(chunk)
    return h.digest()


def _target_path(rel: str, prefix: str) -> str:
    return str(PurePosixPath(prefix) / rel)


def learn_from_tree(
    root: Path,
    *,
    algo: str = "sha256",
    prefix: str = "/",
    skip_dirs: Iterable[str] = (),
    into: Learned | None = None,
    modules_by_digest: bool = True,
) -> Learned:
    """Hash every regular file under ``root``, recorded as ``prefix`` + its path under root.

    ``skip_dirs`` are paths in the target system (``/proc``, ``/var/log``)
    whose contents are not hashed. Files that cannot be read are counted,
    never guessed.
    """
    learned = into if into is not None else Learned()
    hashlib_algo = _hashlib_name(algo)
    root = root.resolve()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    skipped = {str(PurePosixPath(d)) for d in skip_dirs}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        kept = []
        for d in sorted(dirnames):
            if _target_path(os.path.join(rel_dir, d), prefix) in skipped:
                learned.skip("skipped directories")
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                # O_NOFOLLOW: a symlink is not the file IMA measures at this path;
                # O_NONBLOCK: a FIFO put here after the walk must not hang us.
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                learned.skip("symbolic links or unreadable files")
                continue
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    learned.skip("special files")
                    continue
                digest = _hash_stream(fh, hashlib_algo)
            path = _target_path(os.path.join(rel_dir, name), prefix)
            learned.add_file(path, (algo, digest), modules_by_digest=modules_by_digest)
    return learned


def learn_from_debs(
    debs: Iterable[Path],
    *,
    algo: str = "sha256",
    into: Learned | None = None,
    modules_by_digest: bool = True,
) -> Learned:
    """Hash every regular file a Debian package installs, without installing it.

    The file system tree comes from ``dpkg-deb --fsys-tarfile`` and is read
    as a stream; nothing is extracted to disk. Hard links in the archive
    are recorded with the content of their target.
    """
    learned = into if into is not None else Learned()
    hashlib_algo = _hashlib_name(algo)
    for deb in debs:
        for path, fh in _deb_files(deb, learned):
            digest = _hash_stream(fh, hashlib_algo)
            learned.add_file(path, (algo, digest), modules_by_digest=modules_by_digest)
    return learned


def _deb_files(deb: Path, learned: Learned) -> Iterator[tuple[str, IO[bytes]]]:
    try:
        proc = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=False, timeout=600
        )
    except FileNotFoundError:
        raise ConfigError("dpkg-deb is not installed (Debian package dpkg)") from None
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ConfigError(
            f"{deb}: not a Debian package ({message[-1] if message else 'dpkg-deb failed'})"
        )
    with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:") as tar:
        for member in tar:
            name = PurePosixPath("/") / PurePosixPath(member.name)
            if ".." in name.parts:
                raise ConfigError(f"{deb}: member {member.name!r} leaves the tree")
            if member.isfile() or member.islnk():
                fh = tar.extractfile(member)
                if fh is None:  # pragma: no cover - regular members always have data
                    learned.skip("unreadable archive members")
                    continue
                yield str(name), fh
            elif member.issym():
                learned.skip("symbolic links or unreadable files")


# IMA's names for the algorithms learning can hash -> hashlib's
_HASHLIB = {
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sm3": "sm3",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}


def _hashlib_name(algo: str) -> str:
    name = _HASHLIB.get(algo)
    if name is None:
        raise ConfigError(f"cannot learn {algo!r} digests (known: {', '.join(_HASHLIB)})")
    try:
        hashlib.new(name)
    except ValueError:
        raise ConfigError(f"hash {algo!r} is not available in this Python") from None
    return name


def build_policy(
    learned: Learned,
    *,
    base: RuntimePolicy | None = None,
    name: str | None = None,
    excludes: Iterable[str] = (),
    signing_keys: Iterable[TrustedKey] = (),
    violations: ViolationMode | None = None,
) -> RuntimePolicy:
    """A policy allowing what was learned, added to ``base`` (whose other settings it keeps).

    Raises ConfigError when there is nothing to allow (an empty tree, a list of
    violations only) and no base policy.
    """

    def merged(
        old: Mapping[str, frozenset[Digest]], new: dict[str, set[Digest]]
    ) -> dict[str, frozenset[Digest]]:
        out = dict(old)
        for k, v in new.items():
            out[k] = out.get(k, frozenset()) | v
        return out

    b = base
    patterns = tuple(b.excludes.patterns) if b else ()
    patterns += tuple(p for p in excludes if p not in patterns)
    keys = list(b.signing_keys.keys) if b else []
    keys += [k for k in signing_keys if all(k.keyid != o.keyid or k.spki != o.spki for o in keys)]
    return RuntimePolicy(
        digests=merged(b.digests if b else {}, learned.digests),
        excludes=ExcludeList(patterns),
        kernel_modules=frozenset(b.kernel_modules if b else ()) | learned.kernel_modules,
        keyrings=merged(b.keyrings if b else {}, learned.keyrings),
        ignored_keyrings=b.ignored_keyrings if b else frozenset(),
        ima_buf=merged(b.ima_buf if b else {}, learned.ima_buf),
        signing_keys=TrustedKeys.of(keys),
        violations=violations or (b.violations if b else ViolationMode.FAIL),
        log_hash_alg=b.log_hash_alg if b else "sha1",
        name=name if name is not None else (b.name if b else None),
    )
