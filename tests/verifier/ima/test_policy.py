"""Runtime policies: loading, strict validation, lookups, round trips."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier.ima.policy import (
    ExcludeList,
    RuntimePolicy,
    RuntimePolicyParseError,
    ViolationMode,
    is_kernel_module,
    parse_digest,
)
from verifier.ima.signature import TrustedKey, TrustedKeys
from vtpm_core.errors import ConfigError, ParseError

SHA256_A = "sha256:" + "aa" * 32
SHA256_B = "sha256:" + "bb" * 32
SHA1_A = "sha1:" + "aa" * 20


def _spki() -> tuple[str, bytes]:
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode(), TrustedKey.from_public_key(pub).keyid


def _doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": 1, "digests": {"/usr/bin/bash": [SHA256_A, SHA256_B]}}
    doc.update(extra)
    return doc


def test_full_document_round_trips(tmp_path: Path) -> None:
    spki, keyid = _spki()
    doc = _doc(
        name="web",
        excludes=["/tmp/.*", "/var/log/"],
        kernel_modules=["sha256:" + "cc" * 32],
        keyrings={".ima": ["sha256:" + "dd" * 32]},
        ignored_keyrings=[".builtin_trusted_keys"],
        ima_buf={"kexec-cmdline": ["sha256:" + "ee" * 32]},
        signing_keys=[{"keyid": keyid.hex(), "public_key": spki, "name": "release key"}],
        violations="ignore-with-flag",
        log_hash_alg="sha256",
    )
    pol = RuntimePolicy.load(json.dumps(doc))

    assert pol.digests["/usr/bin/bash"] == {("sha256", b"\xaa" * 32), ("sha256", b"\xbb" * 32)}
    assert pol.excludes.patterns == ("/tmp/.*", "/var/log/")
    assert pol.violations is ViolationMode.IGNORE_WITH_FLAG
    assert pol.signing_keys.with_id(keyid)[0].name == "release key"
    assert pol.ignored_keyrings == {".builtin_trusted_keys"}
    assert pol.log_hash_alg == "sha256"
    assert pol.id.startswith("runtime-policy:web@sha256:")

    path = tmp_path / "p.json"
    pol.save(path)
    again = RuntimePolicy.load(path)
    assert again == pol
    assert again.digest == pol.digest
    assert again.to_dict() == pol.to_dict()


def test_defaults() -> None:
    pol = RuntimePolicy.load(json.dumps(_doc()))
    assert pol.violations is ViolationMode.FAIL
    assert pol.log_hash_alg == "sha1"
    assert not pol.excludes
    assert not pol.signing_keys
    assert pol.name is None
    assert pol.id.startswith("runtime-policy:sha256:")


def test_lookups() -> None:
    pol = RuntimePolicy.load(
        json.dumps(
            _doc(kernel_modules=["sha256:" + "cc" * 32], excludes=["/tmp/", r"/var/.*\.log"])
        )
    )
    assert pol.allows_file("/usr/bin/bash", "sha256", b"\xaa" * 32)
    assert pol.allows_file("/usr/bin/bash", "sha256", b"\xbb" * 32)
    assert not pol.allows_file("/usr/bin/bash", "sha256", b"\xcc" * 32)
    # same bytes under another algorithm of that size: not the listed digest
    assert not pol.allows_file("/usr/bin/bash", "sm3", b"\xaa" * 32)
    assert not pol.allows_file("/usr/bin/sh", "sha256", b"\xaa" * 32)
    # module digests on any module path, and only on module paths
    for module in ("/lib/modules/6.1.0/kernel/fs/ext4.ko", "/usr/lib/modules/x/e1000.ko.xz"):
        assert pol.allows_file(module, "sha256", b"\xcc" * 32)
    assert not pol.allows_file("/usr/bin/ko", "sha256", b"\xcc" * 32)
    assert pol.expected_for_file("/usr/bin/bash") == (SHA256_A, SHA256_B)
    assert pol.expected_for_file("/a.ko") == ("any of 1 kernel-module digests",)
    # excludes use re.match: anchored at the start only
    assert pol.excludes.match("/tmp/x") == "/tmp/"
    assert pol.excludes.match("/var/lib/a.log") == r"/var/.*\.log"
    assert pol.excludes.match("/home/tmp/x") is None


def test_policy_is_frozen_and_independent_of_the_callers_dict() -> None:
    digests = {"/a": {("sha256", b"\1" * 32)}}
    pol = RuntimePolicy(digests=digests)  # type: ignore[arg-type]
    digests["/b"] = {("sha256", b"\2" * 32)}
    digests["/a"].add(("sha256", b"\3" * 32))
    assert set(pol.digests) == {"/a"}
    assert pol.digests["/a"] == {("sha256", b"\1" * 32)}
    with pytest.raises(TypeError):
        pol.digests["/c"] = frozenset()  # type: ignore[index]
    with pytest.raises(AttributeError):
        pol.name = "x"  # type: ignore[misc]


def test_policy_without_rules_is_refused() -> None:
    with pytest.raises(ConfigError, match="no rules"):
        RuntimePolicy()
    with pytest.raises(RuntimePolicyParseError, match="no rules"):
        RuntimePolicy.load('{"version": 1}')


def test_signing_keys_alone_are_a_rule() -> None:
    spki, keyid = _spki()
    pol = RuntimePolicy.load(
        json.dumps({"version": 1, "signing_keys": [{"keyid": keyid.hex(), "public_key": spki}]})
    )
    assert len(pol.signing_keys) == 1


def test_excludes_with_groups_and_inline_flags_match_each_pattern() -> None:
    ex = ExcludeList((r"(a)\1", "(?i)/TMP/"))
    assert ex.match("aa") == r"(a)\1"
    assert ex.match("/tmp/x") == "(?i)/TMP/"
    assert ex.match("ab") is None
    plain = ExcludeList(("/a/", "/b/"))
    assert plain.match("/b/c") == "/b/"


def test_bad_exclude_in_code_names_its_index() -> None:
    with pytest.raises(ConfigError, match=r"excludes\[1\] '\(': bad regular expression"):
        ExcludeList(("/ok", "("))


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        pytest.param([], "runtime_policy", "expected an object, got list", id="fail/not-object"),
        pytest.param(
            {"digests": {}}, "runtime_policy.version", "missing", id="fail/version/missing"
        ),
        pytest.param(
            _doc(version=2), "runtime_policy.version", "unsupported version 2", id="fail/version/2"
        ),
        pytest.param(
            _doc(version=True),
            "runtime_policy.version",
            "unsupported version True",
            id="fail/version/bool",
        ),
        pytest.param(_doc(extra=1), "runtime_policy.extra", "unknown key", id="fail/unknown-key"),
        pytest.param(_doc(meta={}), "runtime_policy", "Keylime runtime policy", id="fail/keylime"),
        pytest.param(_doc(name=3), "runtime_policy.name", "expected a string", id="fail/name"),
        pytest.param(
            _doc(digests=[]), "runtime_policy.digests", "expected an object", id="fail/digests/list"
        ),
        pytest.param(
            _doc(digests={"/a": []}),
            'runtime_policy.digests["/a"]',
            "empty list",
            id="fail/digests/empty",
        ),
        pytest.param(
            _doc(digests={"/a": SHA256_A}),
            'runtime_policy.digests["/a"]',
            "expected a list",
            id="fail/digests/str",
        ),
        pytest.param(
            _doc(digests={"/a": ["aa" * 32]}),
            'runtime_policy.digests["/a"][0]',
            "has no algorithm",
            id="fail/digest/no-algo",
        ),
        pytest.param(
            _doc(digests={"/a": ["md4:" + "aa" * 16]}),
            'runtime_policy.digests["/a"][0]',
            "unknown algorithm 'md4'",
            id="fail/digest/algo",
        ),
        pytest.param(
            _doc(digests={"/a": ["sha256:zz"]}),
            'runtime_policy.digests["/a"][0]',
            "not a hex string",
            id="fail/digest/hex",
        ),
        pytest.param(
            _doc(digests={"/a": [SHA1_A[:-2]]}),
            'runtime_policy.digests["/a"][0]',
            "sha1 digest of 19 bytes, expected 20",
            id="fail/digest/size",
        ),
        pytest.param(
            _doc(digests={"/a": [SHA256_A, 7]}),
            'runtime_policy.digests["/a"][1]',
            "got int",
            id="fail/digest/type",
        ),
        pytest.param(
            _doc(digests={"": [SHA256_A]}),
            "runtime_policy.digests",
            "empty path",
            id="fail/digests/empty-path",
        ),
        pytest.param(
            _doc(digests={"/a\0b": [SHA256_A]}),
            'runtime_policy.digests["/a\\u0000b"]',
            "NUL",
            id="fail/digests/nul",
        ),
        pytest.param(
            _doc(excludes="/tmp"),
            "runtime_policy.excludes",
            "expected a list",
            id="fail/excludes/str",
        ),
        pytest.param(
            _doc(excludes=["/ok", "(unclosed"]),
            "runtime_policy.excludes[1]",
            "bad regular expression '(unclosed'",
            id="fail/excludes/regex",
        ),
        pytest.param(
            _doc(excludes=[""]),
            "runtime_policy.excludes[0]",
            "empty pattern",
            id="fail/excludes/empty",
        ),
        pytest.param(
            _doc(excludes=["x" * 5000]),
            "runtime_policy.excludes[0]",
            "longer than 4096",
            id="fail/excludes/long",
        ),
        pytest.param(
            _doc(excludes=["a"] * 4097),
            "runtime_policy.excludes",
            "limit is 4096",
            id="fail/excludes/count",
        ),
        pytest.param(
            _doc(kernel_modules={}),
            "runtime_policy.kernel_modules",
            "expected a list",
            id="fail/modules",
        ),
        pytest.param(
            _doc(keyrings={".ima": ["x"]}),
            'runtime_policy.keyrings[".ima"][0]',
            "has no algorithm",
            id="fail/keyrings",
        ),
        pytest.param(
            _doc(ima_buf={"b": [1]}), 'runtime_policy.ima_buf["b"][0]', "got int", id="fail/ima-buf"
        ),
        pytest.param(
            _doc(ignored_keyrings=[1]),
            "runtime_policy.ignored_keyrings[0]",
            "expected a string",
            id="fail/ignored",
        ),
        pytest.param(
            _doc(violations="ignore"),
            "runtime_policy.violations",
            "'ignore' is not one of fail, ignore-with-flag",
            id="fail/violations",
        ),
        pytest.param(
            _doc(log_hash_alg="md5"),
            "runtime_policy.log_hash_alg",
            "'md5' is not one of",
            id="fail/log-hash-alg",
        ),
        pytest.param(
            _doc(signing_keys={}),
            "runtime_policy.signing_keys",
            "expected a list",
            id="fail/keys/type",
        ),
        pytest.param(
            _doc(signing_keys=[{"keyid": "00112233"}]),
            "runtime_policy.signing_keys[0].public_key",
            "missing",
            id="fail/keys/missing",
        ),
        pytest.param(
            _doc(signing_keys=[{"keyid": "0011", "public_key": ""}]),
            "runtime_policy.signing_keys[0].keyid",
            "2 bytes, expected 4",
            id="fail/keys/keyid",
        ),
        pytest.param(
            _doc(signing_keys=[{"keyid": "zz", "public_key": ""}]),
            "runtime_policy.signing_keys[0].keyid",
            "not a hex",
            id="fail/keys/keyid-hex",
        ),
        pytest.param(
            _doc(signing_keys=[{"keyid": "00112233", "public_key": "!!"}]),
            "runtime_policy.signing_keys[0].public_key",
            "not base64",
            id="fail/keys/b64",
        ),
        pytest.param(
            _doc(signing_keys=[{"keyid": "00112233", "public_key": "AAAA"}]),
            "runtime_policy.signing_keys[0].public_key",
            "not a DER SubjectPublicKeyInfo",
            id="fail/keys/der",
        ),
        pytest.param(
            _doc(signing_keys=[{"keyid": "00112233", "public_key": "AAAA", "x": 1}]),
            "runtime_policy.signing_keys[0].x",
            "unknown key",
            id="fail/keys/unknown",
        ),
    ],
)
def test_malformed_documents_name_the_field(doc: Any, field: str, message: str) -> None:
    with pytest.raises(RuntimePolicyParseError, match=None) as info:
        RuntimePolicy.from_dict(doc)
    assert info.value.field == field, str(info.value)
    assert message in info.value.message
    assert isinstance(info.value, ParseError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            b'{"version": 1, "version": 1}', "duplicate key 'version'", id="fail/duplicate"
        ),
        pytest.param(
            b'{"version": 1, "digests": {"/a": ["sha1:' + b"aa" * 20 + b'"], "/a": []}}',
            "duplicate key '/a'",
            id="fail/duplicate-path",
        ),
        pytest.param(b'{"version": 1,', "not valid JSON at line 1", id="fail/truncated"),
        pytest.param(b'{"version": NaN}', "NaN is not JSON", id="fail/nan"),
        pytest.param(b'{"version": "\xff"}', "not UTF-8 at byte 13", id="fail/utf8"),
        pytest.param(b"[" * 100000, "nested too deeply", id="fail/deep"),
    ],
)
def test_malformed_json(text: bytes, message: str) -> None:
    with pytest.raises(RuntimePolicyParseError) as info:
        RuntimePolicy.load(text)
    assert message in str(info.value)


def test_size_limit() -> None:
    with pytest.raises(RuntimePolicyParseError, match="larger than the 10-byte limit"):
        RuntimePolicy.load(json.dumps(_doc()), max_bytes=10)


def test_parse_digest_aliases() -> None:
    assert parse_digest("SM3-256:" + "00" * 32, "x") == ("sm3", b"\0" * 32)
    assert parse_digest("SHA256:" + "AB" * 32, "x") == ("sha256", b"\xab" * 32)


@pytest.mark.parametrize(
    ("path", "module"),
    [("/lib/modules/6.1/a.ko", True), ("/a.ko.zst", True), ("/a.ko.gz", True), ("/a.kox", False),
     ("/a.ko/x", False), ("/usr/bin/bash", False)],
)  # fmt: skip
def test_is_kernel_module(path: str, module: bool) -> None:
    assert is_kernel_module(path) is module


def test_built_in_code_keys() -> None:
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    pol = RuntimePolicy(signing_keys=TrustedKeys.of([TrustedKey.from_public_key(pub)]))
    assert RuntimePolicy.from_dict(pol.to_dict()) == pol


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.sampled_from([SHA256_A, SHA1_A, "/tmp/.*", "(", "fail", "00112233"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.sampled_from(["version", "digests", "excludes", "kernel_modules", "keyrings",
                         "ima_buf", "signing_keys", "violations", "keyid", "public_key",
                         "/usr/bin/a", "name"]),
        inner, max_size=5,
    ),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(doc=_json)
def test_only_the_parse_error_escapes(doc: Any) -> None:
    try:
        pol = RuntimePolicy.from_dict(doc)
    except RuntimePolicyParseError:
        return
    assert RuntimePolicy.from_dict(pol.to_dict()) == pol


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_only_the_parse_error_escapes_bytes(data: bytes) -> None:
    with pytest.raises(RuntimePolicyParseError):
        RuntimePolicy.load(data)
