"""Learning runtime policies from trees, Debian packages and list entries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.verifier.ima.keylime_oracle import run_keylime_policy
from tests.verifier.ima.test_signature import _cert
from verifier.ima.keylime import load_keylime
from verifier.ima.learn import (
    Learned,
    build_policy,
    learn_from_debs,
    learn_from_entries,
    learn_from_tree,
)
from verifier.ima.policy import ExcludeList, RuntimePolicy, ViolationMode
from vtpm_core.errors import ConfigError


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in ("usr/bin", "etc", "var/log", "lib/modules/6.1.0/kernel/fs"):
        (root / d).mkdir(parents=True)
    (root / "usr/bin/true").write_bytes(Path("/bin/true").read_bytes())
    (root / "usr/bin/false").write_bytes(Path("/bin/false").read_bytes())
    (root / "usr/bin/with space").write_bytes(b"spaced\n")
    os.symlink("true", root / "usr/bin/alias")
    os.symlink("/etc/shadow", root / "usr/bin/escape")
    os.mkfifo(root / "etc/fifo")
    (root / "etc/hostname").write_text("vm\n")
    (root / "var/log/syslog").write_text("changes\n")
    (root / "lib/modules/6.1.0/kernel/fs/ext4.ko").write_bytes(b"\x7fELF module")
    return root


def test_tree(tree: Path) -> None:
    learned = learn_from_tree(tree, skip_dirs=["/var/log"])
    assert set(learned.digests) == {
        "/usr/bin/true", "/usr/bin/false", "/usr/bin/with space", "/etc/hostname",
    }  # fmt: skip
    assert learned.digests["/usr/bin/true"] == {("sha256", _sha256(Path("/bin/true").read_bytes()))}
    assert learned.kernel_modules == {("sha256", _sha256(b"\x7fELF module"))}
    assert learned.skipped == {
        "skipped directories": 1,
        "symbolic links or unreadable files": 2,  # symlinks are not the file IMA measures
        "special files": 1,  # the FIFO, opened without blocking and not read
    }
    assert learned.files == 5
    assert "4 paths" in learned.summary()


def test_tree_options(tree: Path) -> None:
    learned = learn_from_tree(tree, algo="sha512", prefix="/sysroot", modules_by_digest=False)
    assert "/sysroot/lib/modules/6.1.0/kernel/fs/ext4.ko" in learned.digests
    assert "/sysroot/var/log/syslog" in learned.digests
    assert not learned.kernel_modules
    ((algo, digest),) = learned.digests["/sysroot/etc/hostname"]
    assert (algo, digest) == ("sha512", hashlib.sha512(b"vm\n").digest())


@pytest.mark.parametrize(
    ("algo", "message"),
    [("md5", "cannot learn 'md5' digests"), ("whirlpool", "cannot learn")],
)
def test_tree_bad_algorithm(tree: Path, algo: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        learn_from_tree(tree, algo=algo)


def test_tree_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        learn_from_tree(tmp_path / "missing")


def test_tree_agrees_with_keylime(tree: Path, tmp_path: Path) -> None:
    """Keylime's own tool over the same tree finds the same files and digests."""
    (tree / "etc/fifo").unlink()  # Keylime's tool would block reading it
    out = tmp_path / "kl.json"
    run_keylime_policy("create", "runtime", "--rootfs", str(tree), "-o", str(out), cwd=tmp_path)
    keylime = load_keylime(out).policy.digests
    ours = learn_from_tree(tree, modules_by_digest=False).digests
    # Keylime leaves /var out of a rootfs (BASE_EXCLUDE_DIRS) and writes spaces as "_",
    # as IMA's ASCII list does; the binary list and this policy keep the real name.
    expected = {p.replace(" ", "_"): v for p, v in ours.items() if not p.startswith("/var/")}
    assert dict(keylime) == expected


def _build_deb(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/bin").mkdir(parents=True)
    (pkg / "usr/lib/modules/6.1.0").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        "Package: vtpm-ima-test\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: test <t@example.invalid>\nDescription: test package\n"
    )
    (pkg / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(pkg / "usr/bin/tool", 0o755)  # noqa: S103 - an executable in the package
    os.link(pkg / "usr/bin/tool", pkg / "usr/bin/tool2")
    os.symlink("tool", pkg / "usr/bin/tool-link")
    (pkg / "usr/lib/modules/6.1.0/m.ko.xz").write_bytes(b"xz module")
    deb = tmp_path / "vtpm-ima-test_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return deb


def test_debian_package(tmp_path: Path) -> None:
    deb = _build_deb(tmp_path)
    learned = learn_from_debs([deb])
    tool = ("sha256", _sha256(b"#!/bin/sh\necho tool\n"))
    assert learned.digests == {"/usr/bin/tool": {tool}, "/usr/bin/tool2": {tool}}
    assert learned.kernel_modules == {("sha256", _sha256(b"xz module"))}
    assert learned.skipped == {"symbolic links or unreadable files": 1}
    # the same files as learning the installed tree
    installed = tmp_path / "installed"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(installed)], check=True, timeout=120)
    assert learn_from_tree(installed).digests == learned.digests


def test_not_a_debian_package(tmp_path: Path) -> None:
    bogus = tmp_path / "x.deb"
    bogus.write_bytes(b"not an ar archive")
    with pytest.raises(ConfigError, match=r"x\.deb: not a Debian package"):
        learn_from_debs([bogus])


@dataclass(frozen=True)
class Entry:
    """Plain values in the shape of verifier.ima.entries.ImaEntry."""

    template_name: str
    path: str
    digest_algo: str
    digest: bytes
    buf: bytes | None = None
    is_violation: bool = False


def test_entries() -> None:
    cert = _cert(ec.generate_private_key(ec.SECP256R1()), None).public_bytes(
        serialization.Encoding.DER
    )
    entries = [
        Entry("ima-ng", "boot_aggregate", "sha256", b"\1" * 32),
        Entry("ima-ng", "/usr/bin/bash", "sha256", b"\2" * 32),
        Entry("ima-sig", "/usr/bin/bash", "sha256", b"\3" * 32),  # updated in place
        Entry("ima", "/init", "sha1", b"\4" * 20),
        Entry("ima-ng", "/lib/modules/6.1/e1000.ko", "sha256", b"\5" * 32),
        Entry("ima-buf", ".ima", "sha256", _sha256(cert), buf=cert),
        Entry(
            "ima-buf", "kexec-cmdline", "sha256", _sha256(b"root=/dev/vda"), buf=b"root=/dev/vda"
        ),
        Entry("ima-ng", "/tmp/x", "sha256", b"\0" * 32, is_violation=True),
        Entry("ima-ng", "/tmp/y", "sm3-256", b"\6" * 32),
        Entry("custom", "/x", "sha256", b"\7" * 32),
    ]
    learned = learn_from_entries(entries)
    assert learned.digests == {
        "/usr/bin/bash": {("sha256", b"\2" * 32), ("sha256", b"\3" * 32)},
        "/init": {("sha1", b"\4" * 20)},
        "/tmp/y": {("sm3", b"\6" * 32)},
    }
    assert learned.kernel_modules == {("sha256", b"\5" * 32)}
    assert learned.keyrings == {".ima": {("sha256", _sha256(cert))}}
    assert learned.ima_buf == {"kexec-cmdline": {("sha256", _sha256(b"root=/dev/vda"))}}
    assert learned.skipped == {
        "violation entries": 1,
        "boot_aggregate (checked against PCRs 0-9)": 1,
        "custom entries (template not learned)": 1,
    }
    pol = build_policy(learned, name="vm")
    assert pol.allows_file("/usr/bin/bash", "sha256", b"\3" * 32)
    assert pol.allows_file("/lib/modules/other/e1000.ko", "sha256", b"\5" * 32)
    assert RuntimePolicy.from_dict(json.loads(pol.to_json())) == pol


def test_build_merges_into_base() -> None:
    base = RuntimePolicy(
        digests={"/a": {("sha256", b"\1" * 32)}},
        excludes=ExcludeList(("/tmp/",)),
        violations=ViolationMode.IGNORE_WITH_FLAG,
        name="base",
    )
    learned = Learned()
    learned.add_file("/a", ("sha256", b"\2" * 32), modules_by_digest=True)
    learned.add_file("/b", ("sha256", b"\3" * 32), modules_by_digest=True)
    pol = build_policy(learned, base=base, excludes=["/tmp/", "/run/"])
    assert pol.digests["/a"] == {("sha256", b"\1" * 32), ("sha256", b"\2" * 32)}
    assert pol.excludes.patterns == ("/tmp/", "/run/")
    assert pol.violations is ViolationMode.IGNORE_WITH_FLAG
    assert pol.name == "base"
    assert (
        build_policy(learned, base=base, violations=ViolationMode.FAIL).violations
        is ViolationMode.FAIL
    )


def test_build_nothing_learned() -> None:
    with pytest.raises(ConfigError, match="no rules"):
        build_policy(Learned())
