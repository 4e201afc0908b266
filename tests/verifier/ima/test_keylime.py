"""Keylime runtime policies: import, export, and Keylime's own code as the oracle.

Keylime 7.14.3 is installed from PyPI ([dev] extra). Its policy tool
(``keylime-policy create runtime``) writes the policies imported here, its
schema check judges what we export, and its ima-ng / signature checks are
compared with ours on the same inputs. Every disagreement is a test case
with its reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.verifier.ima.keylime_oracle import (
    keylime_allows,
    keylime_sig_valid,
    keylime_validate,
    run_keylime_policy,
)
from tests.verifier.ima.test_signature import _cert, _pem, evmctl_sign
from verifier.ima.keylime import from_keylime, load_keylime, to_keylime
from verifier.ima.policy import ExcludeList, RuntimePolicy, RuntimePolicyParseError
from verifier.ima.signature import TrustedKey, TrustedKeys, verify_ima_signature
from vtpm_core.errors import ConfigError


def _sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


@pytest.fixture(scope="module")
def signer() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def keylime_made(tmp_path_factory: pytest.TempPathFactory, signer: rsa.RSAPrivateKey) -> Path:
    """A policy written by Keylime's own tool over a real tree, with a key and excludes."""
    work = tmp_path_factory.mktemp("keylime")
    tree = work / "rootfs"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    for prog in ("true", "false", "ls"):
        (tree / "usr" / "bin" / prog).write_bytes(Path(f"/bin/{prog}").read_bytes())
    (tree / "etc" / "hostname").write_text("vm\n")
    cert = work / "signer.der"
    cert.write_bytes(_cert(signer, bytes(range(20))).public_bytes(serialization.Encoding.DER))
    excludes = work / "excludes.txt"
    excludes.write_text("/tmp/.*\n/var/log/\n")
    run_keylime_policy(
        "create", "runtime", "--rootfs", str(tree), "--excludelist", str(excludes),
        "--add-ima-signature-verification-key", str(cert), "-o", str(work / "policy.json"),
        cwd=work,
    )  # fmt: skip
    return work


def test_import_keylime_tool_output(keylime_made: Path, signer: rsa.RSAPrivateKey) -> None:
    doc = json.loads((keylime_made / "policy.json").read_text())
    assert keylime_validate(doc) is None
    imported = load_keylime(keylime_made / "policy.json", name="from-keylime")
    pol = imported.policy

    tree = keylime_made / "rootfs"
    assert set(pol.digests) == {"/usr/bin/true", "/usr/bin/false", "/usr/bin/ls", "/etc/hostname"}
    for path, allowed in pol.digests.items():
        assert allowed == {("sha256", _sha256(tree / path.lstrip("/")))}
    assert pol.excludes.patterns == ("/tmp/.*", "/var/log/")
    assert pol.name == "from-keylime"
    (key,) = pol.signing_keys.keys
    assert key.keyid == bytes(range(16, 20))  # the certificate's SKID, as Keylime read it
    assert key.key.public_numbers() == signer.public_key().public_numbers()
    assert imported.notes == ()


def test_keylime_round_trip_is_exact(keylime_made: Path) -> None:
    original = json.loads((keylime_made / "policy.json").read_text())
    exported = to_keylime(load_keylime(keylime_made / "policy.json").policy)
    expected = copy.deepcopy(original)
    del expected["meta"]["timestamp"]
    expected["excludes"] = sorted(expected["excludes"])
    assert exported.doc == expected
    assert keylime_validate(exported.doc) is None


def test_our_policy_round_trips_through_keylime() -> None:
    keys = TrustedKeys.of(
        [TrustedKey.from_public_key(ec.generate_private_key(ec.SECP384R1()).public_key())]
    )
    pol = RuntimePolicy(
        digests={
            "/usr/bin/a": {("sha1", b"\1" * 20), ("sha256", b"\2" * 32)},
            "/usr/bin/b": {("sha384", b"\3" * 48), ("sha512", b"\4" * 64)},
            "boot_aggregate": {("sha1", b"\5" * 20)},
        },
        excludes=ExcludeList(("/tmp/", "(?:/var)?/log/.*")),
        keyrings={".ima": {("sha256", b"\6" * 32)}},
        ignored_keyrings=frozenset({".builtin_trusted_keys"}),
        ima_buf={"kexec-cmdline": {("sha256", b"\7" * 32)}},
        signing_keys=keys,
        log_hash_alg="sha256",
    )
    exported = to_keylime(pol)
    assert keylime_validate(exported.doc) is None
    assert exported.doc["meta"] == {"version": 1, "generator": 3}
    assert any("ignore_tomtou_errors" in n for n in exported.notes)
    back = from_keylime(json.loads(exported.to_json())).policy
    assert back == pol


def test_export_notes_what_keylime_cannot_say() -> None:
    pol = RuntimePolicy(
        digests={"/a": {("sm3", b"\1" * 32)}}, kernel_modules=frozenset({("sha256", b"\2" * 32)})
    )
    exported = to_keylime(pol)
    assert keylime_validate(exported.doc) is None
    notes = " | ".join(exported.notes)
    assert "kernel_modules (1 digests) have no Keylime equivalent" in notes
    assert "digests under sm3 lose their algorithm" in notes
    # read back as sha256 unless told otherwise
    assert from_keylime(exported.doc).policy.digests["/a"] == {("sha256", b"\1" * 32)}
    sm3 = {40: "sha1", 64: "sm3"}
    assert from_keylime(exported.doc, algorithms=sm3).policy.digests["/a"] == {("sm3", b"\1" * 32)}


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        pytest.param((r"(a)\1",), "has a backreference", id="fail/backref"),
        pytest.param((r"(?P<x>a)(?P=x)",), "has a backreference", id="fail/named-backref"),
        pytest.param(("/a", "(?i)/b"), "cannot be joined into one regex", id="fail/inline-flag"),
    ],
)
def test_export_refuses_excludes_that_change_meaning(
    patterns: tuple[str, ...], message: str
) -> None:
    pol = RuntimePolicy(excludes=ExcludeList(patterns))
    with pytest.raises(ConfigError, match=message):
        to_keylime(pol)


# -- validation: Keylime's schema and ours on the same documents -----------------------------


def _kl(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(
        {
            "meta": {"version": 1, "generator": 3},
            "release": 0,
            "digests": {"/usr/bin/a": ["aa" * 32]},
            "excludes": [],
            "keyrings": {},
            "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
            "ima-buf": {},
            "verification-keys": "",
        }
    )
    for key, value in changes.items():
        if value is _DELETE:
            del doc[key.replace("_", "-") if key == "ima_buf" else key]
        else:
            doc[key.replace("_", "-") if key in ("ima_buf", "verification_keys") else key] = value
    return doc


_DELETE = object()

# (id, document, field our error names or None when we accept, Keylime accepts?)
_AGREE = [
    ("ok/minimal", _kl(), None, True),
    ("ok/sha1-and-sha512", _kl(digests={"/a": ["aa" * 20, "bb" * 64]}), None, True),
    ("ok/keyrings", _kl(keyrings={".ima": ["cc" * 32]}), None, True),
    ("ok/excludes", _kl(excludes=["/tmp/.*", "^/var/"]), None, True),
    ("fail/no-meta", _kl(meta=_DELETE), "keylime.meta", False),
    ("fail/no-digests", _kl(digests=_DELETE), "keylime.digests", False),
    ("fail/upper-hex", _kl(digests={"/a": ["AA" * 32]}), 'keylime.digests["/a"][0]', False),
    ("fail/short-hex", _kl(digests={"/a": ["aa" * 10]}), 'keylime.digests["/a"][0]', False),
    ("fail/empty-list", _kl(digests={"/a": []}), 'keylime.digests["/a"]', False),
    ("fail/digest-not-str", _kl(digests={"/a": [1]}), 'keylime.digests["/a"][0]', False),
    ("fail/release", _kl(release=-1), "keylime.release", False),
    ("fail/generator", _kl(meta={"version": 1, "generator": 9}), "keylime.meta.generator", False),
    (
        "fail/log-hash-alg",
        _kl(ima={"ignored_keyrings": [], "log_hash_alg": "md5", "dm_policy": None}),
        "keylime.ima.log_hash_alg",
        False,
    ),
    (
        "fail/dm-policy",
        _kl(ima={"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": {}}),
        "keylime.ima.dm_policy",
        False,
    ),
    (
        "fail/no-ignored-keyrings",
        _kl(ima={"log_hash_alg": "sha1", "dm_policy": None}),
        "keylime.ima.ignored_keyrings",
        False,
    ),
    ("fail/excludes-type", _kl(excludes="/tmp"), "keylime.excludes", False),
    ("fail/bad-regex", _kl(excludes=["("]), "keylime.excludes[0]", False),
    ("fail/keys-json", _kl(verification_keys="{"), "keylime.verification-keys", False),
    (
        "fail/keys-schema",
        _kl(verification_keys='{"pubkeys": []}'),
        "keylime.verification-keys.keyids",
        False,
    ),
    # Disagreements, each on purpose:
    # Keylime ignores unknown keys, so a misspelt "exclude" silently excludes nothing.
    ("disagree/unknown-key", _kl(exclude=["/tmp/"]), "keylime.exclude", True),
    # Keylime's pattern takes 40..128 hex digits; 41 is no hash and can never match.
    ("disagree/odd-length", _kl(digests={"/a": ["a" * 41]}), 'keylime.digests["/a"][0]', True),
    # An empty Keylime policy (generator 1) means "do not appraise IMA"; a policy
    # without rules is refused here rather than imported as one that fails everything.
    ("disagree/empty", _kl(digests={}, meta={"version": 1, "generator": 1}), "keylime", True),
    # A key Keylime cannot load is logged and skipped by Keylime; refused here.
    (
        "disagree/bad-key",
        _kl(verification_keys='{"keyids": [1], "pubkeys": ["AAAA"]}'),
        "keylime.verification-keys.pubkeys[0]",
        True,
    ),
]


@pytest.mark.parametrize(
    ("doc", "field", "keylime_accepts"),
    [pytest.param(doc, fld, ok, id=case) for case, doc, fld, ok in _AGREE],
)
def test_validation_against_keylime(
    doc: dict[str, Any], field: str | None, keylime_accepts: bool
) -> None:
    assert (keylime_validate(doc) is None) is keylime_accepts
    if field is None:
        from_keylime(doc)
        return
    with pytest.raises(RuntimePolicyParseError) as info:
        from_keylime(doc)
    assert info.value.field == field, str(info.value)


def test_import_refuses_dsse_and_our_own_format() -> None:
    with pytest.raises(RuntimePolicyParseError, match="DSSE-signed"):
        from_keylime({"payload": "e30=", "payloadType": "x", "signatures": []})
    with pytest.raises(RuntimePolicyParseError, match="vtpm runtime policy"):
        from_keylime({"version": 1, "digests": {}})


def test_generator_note() -> None:
    imported = from_keylime(_kl(meta={"version": 1, "generator": 1}))
    assert "Keylime does not appraise IMA lists" in imported.notes[0]


def test_doubly_encoded_verification_keys() -> None:
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    exported = to_keylime(
        RuntimePolicy(signing_keys=TrustedKeys.of([TrustedKey.from_public_key(pub)]))
    )
    doc = exported.doc
    doc["verification-keys"] = json.dumps(doc["verification-keys"])
    assert (
        from_keylime(doc).policy.signing_keys.keys[0].key.public_numbers() == pub.public_numbers()
    )


# -- decisions: Keylime's ima-ng check and ours on the same entries ---------------------------


def test_file_decisions_agree_with_keylime(keylime_made: Path) -> None:
    doc = json.loads((keylime_made / "policy.json").read_text())
    pol = load_keylime(keylime_made / "policy.json").policy
    true_digest = _sha256(keylime_made / "rootfs" / "usr" / "bin" / "true")
    cases = [
        ("/usr/bin/true", "sha256", true_digest, True),
        ("/usr/bin/true", "sha256", b"\0" * 32, False),  # wrong digest
        ("/usr/bin/false", "sha256", true_digest, False),  # another file's digest
        ("/usr/bin/cat", "sha256", true_digest, False),  # path not in the policy
        ("/tmp/x", "sha256", b"\0" * 32, True),  # excluded
        ("/var/log/syslog", "sha256", b"\0" * 32, True),  # excluded (prefix match)
        ("/srv/var/log/x", "sha256", b"\0" * 32, False),  # re.match: anchored at the start
    ]
    for path, algo, digest, expected in cases:
        ours = pol.excludes.match(path) is not None or pol.allows_file(path, algo, digest)
        assert keylime_allows(doc, path, algo, digest) is expected, path
        assert ours is expected, path

    # Disagreement: Keylime compares hex only, so the listed bytes under another
    # algorithm of the same size pass there. Here a digest is (algorithm, bytes).
    assert keylime_allows(doc, "/usr/bin/true", "sm3", true_digest)
    assert not pol.allows_file("/usr/bin/true", "sm3", true_digest)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_signature_decisions_agree_with_keylime(kind: str, tmp_path: Path) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(65537, 2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    prog = tmp_path / "prog"
    prog.write_bytes(Path("/bin/true").read_bytes())
    sig = evmctl_sign(prog, _pem(key, tmp_path / "k.pem"), "sha256")
    digest = _sha256(prog)
    pol = RuntimePolicy(signing_keys=TrustedKeys.of([TrustedKey.from_public_key(key.public_key())]))
    vkeys = to_keylime(pol).doc["verification-keys"]
    cases = [
        (sig, digest, True),
        (sig, hashlib.sha256(b"other").digest(), False),
        (sig[:-1] + bytes([sig[-1] ^ 1]), digest, False),
        (sig[:3] + b"\0\0\0\0" + sig[7:], digest, False),  # another key id
        (sig[:-1], digest, False),  # truncated
    ]
    for data, dig, expected in cases:
        assert keylime_sig_valid(vkeys, data, "sha256", dig) is expected
        assert verify_ima_signature(data, "sha256", dig, pol.signing_keys).valid is expected
