"""Appraising entries against runtime policies, and the incremental PCR 10 state."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.verifier.ima._entries import Entry, extend_values, ima_ng, replay
from tests.verifier.ima.keylime_oracle import keylime_line_verdicts
from tests.verifier.ima.test_signature import _cert, _pem, evmctl_sign
from verifier.ima.appraise import ImaProgress, advance, appraise_entries
from verifier.ima.keylime import to_keylime
from verifier.ima.policy import ExcludeList, RuntimePolicy, ViolationMode
from verifier.ima.signature import TrustedKey, TrustedKeys
from vtpm_core.errors import ParseError, VerificationError

BASH = b"bash v1"
BASH2 = b"bash v2"


def _d(content: bytes) -> tuple[str, bytes]:
    return ("sha256", hashlib.sha256(content).digest())


def _policy(**changes: object) -> RuntimePolicy:
    base = RuntimePolicy(
        digests={
            "/usr/bin/bash": {_d(BASH), _d(BASH2)},
            "/usr/bin/ls": {_d(b"ls")},
            "boot_aggregate": {("sha256", b"\xba" * 32)},
        },
        excludes=ExcludeList(("/tmp/", "/var/log/.*")),
        kernel_modules=frozenset({_d(b"ext4")}),
        name="test",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_entries_pass_and_fail_with_names() -> None:
    entries = [
        Entry("ima-ng", "boot_aggregate", "sha256", b"\xba" * 32),
        ima_ng("/usr/bin/bash", BASH),
        ima_ng("/usr/bin/bash", BASH2),
        ima_ng("/tmp/scratch", b"anything"),
        ima_ng("/lib/modules/6.1.0/ext4.ko", b"ext4"),
        ima_ng("/usr/bin/bash", b"evil bash"),
        ima_ng("/usr/bin/nc", b"netcat"),
        ima_ng("/lib/modules/6.1.0/rootkit.ko", b"rootkit"),
        ima_ng("/usr/bin/ls", b"ls", algo="sha1"),  # right bytes? no: another algorithm
        Entry("ima-ng", "/usr/bin/ls", "sha256", _d(b"ls")[1], pcr=11),
    ]
    result = appraise_entries(entries, _policy(), first_index=100)
    assert not result.ok
    assert (result.checked, result.by_digest, result.excluded, result.by_signature) == (10, 4, 1, 0)
    fails = {f.index: f for f in result.failures}
    assert sorted(fails) == [105, 106, 107, 108, 109]
    assert fails[105].reason == "digest not allowed for this path"
    assert fails[105].actual == "sha256:" + hashlib.sha256(b"evil bash").hexdigest()
    assert set(fails[105].expected) == {
        f"sha256:{_d(BASH)[1].hex()}",
        f"sha256:{_d(BASH2)[1].hex()}",
    }
    assert str(fails[106]).startswith(
        "entry 106 ima-ng '/usr/bin/nc': path not in the policy (got sha256:"
    )
    assert fails[107].reason == "kernel module not in the policy"
    assert fails[107].expected == ("any of 1 kernel-module digests",)
    assert fails[108].actual.startswith("sha1:")  # type: ignore[union-attr]
    assert "extends PCR 11, not PCR 10" in fails[109].reason
    assert result.to_json()["failures"][0]["path"] == "/usr/bin/bash"


def test_violations() -> None:
    v = Entry("ima-ng", "/usr/bin/python3", "sha256", b"\0" * 32, is_violation=True)
    failed = appraise_entries([v], _policy())
    assert failed.failures[0].reason.startswith("violation (ToMToU or open-writers)")
    flagged = appraise_entries([v], _policy(violations=ViolationMode.IGNORE_WITH_FLAG))
    assert flagged.ok
    assert flagged.warnings == (
        "entry 0 ima-ng '/usr/bin/python3': violation (ToMToU or open-writers) ignored",
    )


def test_boot_aggregate_is_never_passed_unchecked() -> None:
    agg = Entry("ima-ng", "boot_aggregate", "sha256", b"\x01" * 32)
    no_rule = RuntimePolicy(digests={"/a": {_d(b"a")}})
    result = appraise_entries([agg], no_rule)
    assert result.failures[0].reason == (
        "boot_aggregate not checked: no quoted PCRs 0-9 given and none in the policy"
    )
    assert appraise_entries([agg], no_rule, boot_aggregates=[("sha256", b"\x01" * 32)]).ok
    wrong = appraise_entries([agg], no_rule, boot_aggregates=[("sha256", b"\x02" * 32)])
    assert wrong.failures[0].reason == "boot_aggregate does not match the quoted PCRs 0-9"


def test_buffers_and_keyrings() -> None:
    cert = _cert(ec.generate_private_key(ec.SECP256R1()), None).public_bytes(
        serialization.Encoding.DER
    )
    other = _cert(ec.generate_private_key(ec.SECP256R1()), None).public_bytes(
        serialization.Encoding.DER
    )
    pol = _policy(
        keyrings={".ima": {_d(cert)}},
        ignored_keyrings=frozenset({".builtin_trusted_keys"}),
        ima_buf={"kexec-cmdline": {_d(b"root=/dev/vda")}},
    )
    entries = [
        Entry("ima-buf", ".ima", "sha256", _d(cert)[1], buf=cert),
        Entry("ima-buf", ".builtin_trusted_keys", "sha256", _d(other)[1], buf=other),
        Entry("ima-buf", "kexec-cmdline", "sha256", _d(b"root=/dev/vda")[1], buf=b"root=/dev/vda"),
        Entry("ima-buf", ".ima", "sha256", _d(other)[1], buf=other),
        Entry("ima-buf", ".evm", "sha256", _d(cert)[1], buf=cert),
        Entry("ima-buf", "kexec-cmdline", "sha256", _d(b"init=/bin/sh")[1], buf=b"init=/bin/sh"),
        Entry("ima-buf", "dm_table_load", "sha256", _d(b"x")[1], buf=b"x"),
        Entry("evm-xattrs", "/x", "sha256", b"\0" * 32),
    ]
    result = appraise_entries(entries, pol)
    assert [(f.index, f.reason) for f in result.failures] == [
        (3, "key not allowed in this keyring"),
        (4, "keyring not in the policy"),
        (5, "buffer not allowed"),
        (6, "buffer name not in the policy"),
        (7, "template 'evm-xattrs' is not appraised"),
    ]
    assert appraise_entries(entries[4:5], _policy(ignored_keyrings=frozenset({"*"}))).ok


@pytest.fixture(scope="module")
def signer() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _signed_entry(tmp_path: Path, key: rsa.RSAPrivateKey, path: str, content: bytes) -> Entry:
    f = tmp_path / "file"
    f.write_bytes(content)
    sig = evmctl_sign(f, _pem(key, tmp_path / "k.pem"), "sha256")
    return Entry("ima-sig", path, "sha256", hashlib.sha256(content).digest(), signature=sig)


def test_signed_entries(tmp_path: Path, signer: rsa.RSAPrivateKey) -> None:
    keys = TrustedKeys.of([TrustedKey.from_public_key(signer.public_key())])
    pol = _policy(signing_keys=keys)
    signed = _signed_entry(tmp_path, signer, "/opt/app/run", b"signed app")
    result = appraise_entries([signed], pol)
    assert result.ok and result.by_signature == 1
    # a signature over other content: falls back to the digest, fails naming the state
    forged = dataclasses.replace(signed, digest=hashlib.sha256(b"patched app").digest())
    failure = appraise_entries([forged], pol).failures[0]
    assert failure.signature is not None and "signature invalid keyid" in failure.signature
    # an unsigned ima-sig entry in a policy with keys: named as absent
    bare = dataclasses.replace(signed, signature=None)
    assert appraise_entries([bare], pol).failures[0].signature == "signature absent"
    # a bad signature on a file the policy lists by digest still passes by digest
    listed = dataclasses.replace(forged, path="/usr/bin/bash", digest=_d(BASH)[1])
    assert appraise_entries([listed], pol).ok
    # the same signature is worthless without the key
    assert appraise_entries([signed], _policy()).failures[0].reason == "path not in the policy"


def test_appraisal_agrees_with_keylime(tmp_path: Path, signer: rsa.RSAPrivateKey) -> None:
    """The same entries as ASCII lines through Keylime's own IMA code, under the same policy."""
    cert = _cert(ec.generate_private_key(ec.SECP256R1()), None).public_bytes(
        serialization.Encoding.DER
    )
    pol = _policy(
        kernel_modules=frozenset(),
        digests={"/usr/bin/bash": {_d(BASH), _d(BASH2)}, "/lib/modules/6.1/ext4.ko": {_d(b"ext4")}},
        signing_keys=TrustedKeys.of([TrustedKey.from_public_key(signer.public_key())]),
        keyrings={".ima": {_d(cert)}},
        ignored_keyrings=frozenset({".platform"}),
        ima_buf={"kexec-cmdline": {_d(b"ro")}},
    )
    signed = _signed_entry(tmp_path, signer, "/opt/app/run", b"signed app")
    entries = [
        ima_ng("/usr/bin/bash", BASH),
        ima_ng("/usr/bin/bash", b"evil"),
        ima_ng("/usr/bin/nc", b"nc"),
        ima_ng("/tmp/x", b"x"),
        ima_ng("/var/log/syslog", b"x"),
        ima_ng("/srv/tmp/x", b"x"),
        ima_ng("/lib/modules/6.1/ext4.ko", b"ext4"),
        signed,
        dataclasses.replace(signed, digest=hashlib.sha256(b"patched").digest()),
        dataclasses.replace(signed, path="/usr/bin/bash", digest=_d(BASH2)[1]),
        Entry("ima-sig", "/usr/bin/bash", "sha256", _d(BASH)[1], signature=b""),
        Entry("ima-buf", ".ima", "sha256", _d(cert)[1], buf=cert),
        Entry("ima-buf", ".platform", "sha256", _d(b"k")[1], buf=cert),
        Entry("ima-buf", ".evm", "sha256", _d(cert)[1], buf=cert),
        Entry("ima-buf", "kexec-cmdline", "sha256", _d(b"ro")[1], buf=b"ro"),
        Entry("ima-buf", "kexec-cmdline", "sha256", _d(b"rw")[1], buf=b"rw"),
        Entry("ima-ng", "/usr/bin/bash", "sha256", _d(BASH)[1], pcr=11),
        Entry("ima-ng", "/usr/bin/python3", "sha256", b"\0" * 32, is_violation=True),
    ]
    doc = to_keylime(pol).doc
    theirs = keylime_line_verdicts([e.ascii_line() for e in entries], doc)
    failed = {f.index for f in appraise_entries(entries, pol).failures}
    ours = [i not in failed for i in range(len(entries))]
    assert ours == theirs
    assert ours == [True, False, False, True, True, False, True, True, False, True, True,
                    True, True, False, True, False, False, False]  # fmt: skip


# -- incremental appraisal --------------------------------------------------------------


def _list(n: int, offset: int = 0) -> list[Entry]:
    return [ima_ng(f"/usr/bin/p{offset + i}", f"prog {offset + i}".encode()) for i in range(n)]


def _allow(entries: list[Entry]) -> RuntimePolicy:
    return RuntimePolicy(digests={e.path: {(e.digest_algo, e.digest)} for e in entries})


BANKS = ("sha1", "sha256")


def _step(state, entries, start, quoted, policy, reset=1):  # type: ignore[no-untyped-def]
    return advance(
        state, reset_count=reset, start_index=start, entries=entries, quoted_pcr10=quoted,
        policy=policy, extend_values=extend_values,
    )  # fmt: skip


def test_full_then_deltas() -> None:
    full = _list(50)
    pol = _allow(full)
    step = _step(None, full[:20], 0, replay(full[:20], BANKS), pol)
    assert step.ok and (step.proven, step.pending, step.state.count) == (20, 0, 20)
    assert step.state.pcr10 == replay(full[:20], BANKS)
    step = _step(step.state, full[20:50], 20, replay(full, BANKS), pol)
    assert step.ok and step.state.count == 50
    # nothing new since: an empty delta against an unchanged PCR passes
    again = _step(step.state, [], 50, replay(full, BANKS), pol)
    assert again.ok and again.state == step.state
    # the stored state is small and parses back
    blob = step.state.to_bytes()
    assert len(blob) == 4 + 17 + (1 + 20) + (1 + 32) + 32
    assert ImaProgress.parse(blob) == step.state


def test_list_ahead_of_quote_proves_a_prefix() -> None:
    full = _list(10)
    step = _step(None, full, 0, replay(full[:7], BANKS), _allow(full))
    assert (step.proven, step.pending, step.state.count) == (7, 3, 7)
    assert step.appraisal.checked == 7
    nxt = _step(step.state, full[7:], 7, replay(full, BANKS), _allow(full))
    assert nxt.state.count == 10


def test_gap_reorder_replay_are_refused() -> None:
    full = _list(30)
    pol = _allow(full)
    state = _step(None, full[:10], 0, replay(full[:10], BANKS), pol).state
    quoted = replay(full[:20], BANKS)
    with pytest.raises(
        VerificationError,
        match=r"ima\.start_index: delta starts at entry 11, the verified list stands at 10",
    ):
        _step(state, full[11:20], 11, quoted, pol)
    with pytest.raises(VerificationError, match=r"ima\.pcr10: no prefix of the 9 entries"):
        _step(state, full[11:20], 10, quoted, pol)  # claims the right start, skips one
    swapped = full[10:20]
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(VerificationError, match=r"ima\.pcr10"):
        _step(state, swapped, 10, quoted, pol)
    with pytest.raises(VerificationError, match=r"ima\.pcr10"):
        _step(state, full[0:10], 10, quoted, pol)  # a replayed (old) suffix
    with pytest.raises(VerificationError, match=r"ima\.pcr10"):
        _step(state, full[10:20], 10, {**quoted, "sha1": b"\0" * 20}, pol)  # one bank disagrees


def test_reboot_and_reverted_snapshot() -> None:
    first = _list(10)
    second = _list(5, offset=100)
    pol = _allow(first + second)
    state = _step(None, first, 0, replay(first, BANKS), pol, reset=3).state
    assert state.resume_index(4, pol) == 0
    with pytest.raises(
        VerificationError, match="a new boot, policy or bank set: send the list from entry 0"
    ):
        _step(state, second, 10, replay(second, BANKS), pol, reset=4)
    rebooted = _step(state, second, 0, replay(second, BANKS), pol, reset=4)
    assert rebooted.ok and rebooted.state.count == 5 and rebooted.state.reset_count == 4
    with pytest.raises(
        VerificationError, match=r"ima\.reset_count: resetCount went down \(4 -> 3\)"
    ):
        _step(rebooted.state, [], 5, replay(second, BANKS), pol, reset=3)


def test_policy_change_restarts_from_zero() -> None:
    full = _list(10)
    state = _step(None, full, 0, replay(full, BANKS), _allow(full)).state
    stricter = _allow(full[:9])
    assert state.resume_index(1, stricter) == 0
    with pytest.raises(VerificationError, match=r"ima\.start_index"):
        _step(state, [], 10, replay(full, BANKS), stricter)
    redo = _step(state, full, 0, replay(full, BANKS), stricter)
    assert [f.index for f in redo.appraisal.failures] == [9]


def test_failing_delta_names_absolute_indices() -> None:
    full = [*_list(10), ima_ng("/usr/bin/evil", b"evil")]
    step = _step(None, full[:10], 0, replay(full[:10], BANKS), _allow(full[:10]))
    bad = _step(step.state, full[10:], 10, replay(full, BANKS), _allow(full[:10]))
    assert not bad.ok
    assert bad.appraisal.failures[0].index == 10
    assert bad.appraisal.failures[0].path == "/usr/bin/evil"


def test_violation_extends_all_ones() -> None:
    entries = [ima_ng("/a", b"a"), Entry("ima-ng", "/b", "sha256", b"\0" * 32, is_violation=True)]
    pol = RuntimePolicy(digests={"/a": {_d(b"a")}}, violations=ViolationMode.IGNORE_WITH_FLAG)
    step = _step(None, entries, 0, replay(entries, BANKS), pol)
    assert step.ok and step.appraisal.warnings


def test_quote_and_extend_errors() -> None:
    pol = _allow(_list(1))
    with pytest.raises(VerificationError, match="covers no PCR 10 bank"):
        _step(None, [], 0, {}, pol)
    with pytest.raises(VerificationError, match="sha256 value has 3 bytes"):
        _step(None, [], 0, {"sha256": b"abc"}, pol)
    one = _list(1)
    state = _step(None, one, 0, replay(one, ("sha256",)), pol).state
    assert state.resume_index(1, pol, ["sha1", "sha256"]) == 0
    both = replay(one, BANKS)
    with pytest.raises(VerificationError, match="bank set: send the list from entry 0"):
        _step(state, [], 1, both, pol)
    assert _step(state, one, 0, both, pol).state.pcr10 == both
    with pytest.raises(VerificationError, match="no sha512 template digest"):
        advance(
            None,
            reset_count=1,
            start_index=0,
            entries=_list(1),
            quoted_pcr10={"sha512": b"\1" * 64},
            policy=pol,
            extend_values=lambda e: {"sha256": b"\0" * 32},
        )


@pytest.mark.parametrize(
    ("blob", "field"),
    [
        (b"", "magic"),
        (b"IMA1" + b"\0" * 5, "header"),
        (b"IMA1" + bytes(16) + b"\x01", "bank"),
        (b"IMA1" + bytes(16) + b"\x01\x09", "bank"),
        (b"IMA1" + bytes(16) + b"\x01\x02" + bytes(5), "pcr10.sha256"),
        (b"IMA1" + bytes(16) + b"\x01\x02" + bytes(32) + bytes(3), "policy_digest"),
    ],
)
def test_progress_parse_errors(blob: bytes, field: str) -> None:
    with pytest.raises(ParseError) as info:
        ImaProgress.parse(blob)
    assert info.value.field == field
