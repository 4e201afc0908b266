"""`vtpm ima learn` and `vtpm ima policy convert|show`, end to end through the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.verifier.ima.keylime_oracle import keylime_validate, run_keylime_policy
from tests.verifier.ima.test_signature import _cert
from verifier.ima.policy import RuntimePolicy, ViolationMode
from vtpm_cli.main import cli


def _run(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(argv))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "var/log").mkdir(parents=True)
    (root / "usr/bin/true").write_bytes(Path("/bin/true").read_bytes())
    (root / "var/log/messages").write_text("x\n")
    return root


def test_learn_tree_then_show(tree: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = tmp_path / "signer.pem"
    cert.write_bytes(_cert(key, b"\x01" * 20).public_bytes(serialization.Encoding.PEM))
    out = tmp_path / "policy.json"
    code, stdout, stderr = _run(
        "ima", "learn", "--tree", str(tree), "--skip", "/var/log", "--exclude", "/tmp/.*",
        "--signing-key", str(cert), "--violations", "ignore-with-flag", "--name", "web",
        "-o", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    assert "learned 1 paths, 1 digests; left out: 1 skipped directories" in stdout
    pol = RuntimePolicy.load(out)
    assert f"wrote {out} ({pol.id})" in stdout
    assert pol.digests == {
        "/usr/bin/true": {("sha256", hashlib.sha256(Path("/bin/true").read_bytes()).digest())}
    }
    assert pol.violations is ViolationMode.IGNORE_WITH_FLAG
    assert pol.signing_keys.keys[0].keyid == b"\x01" * 4

    code, stdout, _ = _run("ima", "policy", "show", str(out))
    assert code == 0
    assert stdout.splitlines()[0] == pol.id
    assert "signing key 01010101 CN=ima test signer" in stdout
    assert "    /tmp/.*" in stdout
    code, stdout, _ = _run("ima", "policy", "show", "--json", str(out))
    assert json.loads(stdout) == pol.to_dict()


def test_learn_adds_to_a_base_policy(tree: Path, tmp_path: Path) -> None:
    first = tmp_path / "v1.json"
    assert _run("ima", "learn", "--tree", str(tree), "-o", str(first))[0] == 0
    (tree / "usr/bin/true").write_bytes(Path("/bin/false").read_bytes())  # an update
    second = tmp_path / "v2.json"
    code, _, stderr = _run(
        "ima", "learn", "--tree", str(tree), "--base", str(first), "-o", str(second)
    )
    assert code == 0, stderr
    assert len(RuntimePolicy.load(second).digests["/usr/bin/true"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["ima", "learn", "-o", "x.json"], "give at least one source", id="fail/no-source"
        ),
        pytest.param(
            ["ima", "learn", "--tree", ".", "--algo", "md5", "-o", "x.json"],
            "cannot learn 'md5'",
            id="fail/algo",
        ),
        pytest.param(
            ["ima", "learn", "--tree", ".", "--exclude", "(", "-o", "x.json"],
            "bad regular expression",
            id="fail/regex",
        ),
    ],
)
def test_learn_errors_exit_2(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, stderr = _run(*argv)
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr


VM_LIST = Path(__file__).resolve().parents[1] / "data" / "ima" / "vtpm-guest" / "ima.bin"


def test_learn_from_a_vm_list(tmp_path: Path) -> None:
    """The list `vtpm vm boot --ima` wrote: every measured file allowed as measured."""
    from verifier.ima.appraise import appraise_entries
    from verifier.ima.parse import parse_list

    out = tmp_path / "runtime.json"
    code, stdout, stderr = _run(
        "ima", "learn", "--list", str(VM_LIST), "--name", "vm", "-o", str(out)
    )
    assert code == 0, stderr
    assert stdout.splitlines()[0] == (
        "learned 39 paths, 39 digests, 6 kernel modules; "
        "left out: 1 boot_aggregate (checked against PCRs 0-9)"
    )
    pol = RuntimePolicy.load(out)
    entries = parse_list(VM_LIST.read_bytes())
    busybox = next(e for e in entries if e.path == "/bin/busybox")
    assert pol.digests["/bin/busybox"] == {("sha256", busybox.digest)}
    # all but boot_aggregate pass (that one is for the quoted PCRs 0-9)
    failures = appraise_entries(entries, pol).failures
    assert [f.index for f in failures] == [0]

    forged = bytearray(VM_LIST.read_bytes())
    forged[-40] ^= 1  # a byte of busybox's file digest: its template hash no longer matches
    (tmp_path / "forged.bin").write_bytes(bytes(forged))
    never = tmp_path / "never.json"
    code, _, stderr = _run("ima", "learn", "--list", str(tmp_path / "forged.bin"), "-o", str(never))
    assert code == 1 and f"in {tmp_path / 'forged.bin'}" in stderr, stderr
    (tmp_path / "short.bin").write_bytes(VM_LIST.read_bytes()[:50])
    code, _, stderr = _run("ima", "learn", "--list", str(tmp_path / "short.bin"), "-o", str(never))
    assert code == 2 and "truncated" in stderr and "short.bin" in stderr, stderr
    assert "Traceback" not in stderr and not never.exists()


def test_learn_bad_signing_key_names_the_file(tree: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("nope")
    code, _, stderr = _run(
        "ima", "learn", "--tree", str(tree), "--signing-key", str(bad), "-o", str(tmp_path / "p")
    )
    assert code == 2
    assert f"{bad}: not an X.509 certificate or a public key" in stderr


def test_convert_keylime_and_back(tree: Path, tmp_path: Path) -> None:
    keylime = tmp_path / "keylime.json"
    run_keylime_policy("create", "runtime", "--rootfs", str(tree), "-o", str(keylime), cwd=tmp_path)
    ours = tmp_path / "ours.json"
    code, _, stderr = _run(
        "ima",
        "policy",
        "convert",
        "--from",
        "keylime",
        str(keylime),
        "-o",
        str(ours),
        "--name",
        "kl",
    )
    assert code == 0, stderr
    pol = RuntimePolicy.load(ours)
    assert pol.name == "kl"
    assert set(pol.digests) == {"/usr/bin/true"}

    back = tmp_path / "back.json"
    code, _, stderr = _run("ima", "policy", "convert", "--from", "vtpm", str(ours), "-o", str(back))
    assert code == 0, stderr
    assert "note: violations: fail is not part of a Keylime policy" in stderr
    exported = json.loads(back.read_text())
    assert keylime_validate(exported) is None
    original = json.loads(keylime.read_text())
    assert exported["digests"] == original["digests"]


def test_convert_sm3(tmp_path: Path) -> None:
    doc = {
        "meta": {"version": 1, "generator": 1}, "release": 0, "digests": {"/a": ["ab" * 32]},
        "excludes": [], "keyrings": {}, "ima-buf": {}, "verification-keys": "",
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
    }  # fmt: skip
    src = tmp_path / "k.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "o.json"
    code, _, stderr = _run(
        "ima", "policy", "convert", "--from", "keylime", "--sm3", str(src), "-o", str(out)
    )
    assert code == 0, stderr
    assert "note: meta.generator is 1: Keylime does not appraise IMA lists" in stderr
    assert RuntimePolicy.load(out).digests["/a"] == {("sm3", bytes.fromhex("ab" * 32))}


@pytest.mark.parametrize(
    ("content", "from_format", "message"),
    [
        pytest.param(
            '{"version": 1, "digests": {}}',
            "keylime",
            "looks like a vtpm runtime policy",
            id="fail/wrong-format",
        ),
        pytest.param(
            '{"meta": {}}', "vtpm", "this is a Keylime runtime policy", id="fail/keylime-as-vtpm"
        ),
        pytest.param("{", "keylime", "not valid JSON at line 1", id="fail/json"),
    ],
)
def test_convert_errors(content: str, from_format: str, message: str, tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_text(content)
    code, _, stderr = _run(
        "ima", "policy", "convert", "--from", from_format, str(src), "-o", str(tmp_path / "o")
    )
    assert code == 2
    assert message in stderr


def test_convert_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_text("{}")
    code, _, stderr = _run("ima", "policy", "convert", "--from", "vtpm", str(src), "-o", str(src))
    assert code == 2
    assert "would overwrite the input" in stderr
