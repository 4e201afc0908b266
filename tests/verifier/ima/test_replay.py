"""Replay into PCR 10 per bank (both kernel generations) and boot_aggregate from PCRs 0-9."""

from __future__ import annotations

import hashlib

import pytest

from tests.verifier.ima import _entries
from tests.verifier.ima._entries import Entry, ima_ng
from verifier.ima.appraise import ImaProgress, advance
from verifier.ima.boot_aggregate import boot_aggregates
from verifier.ima.policy import RuntimePolicy
from verifier.ima.replay import ExtendMode, extend_values, replay
from vtpm_core.errors import VerificationError

BANKS = ("sha1", "sha256", "sha384", "sha512")


def _list() -> list[Entry]:
    return [
        ima_ng("/a", b"a"),
        Entry("ima-ng", "/tmp/x", "sha256", bytes(32), is_violation=True),
        ima_ng("/b", b"b", algo="sha1"),
    ]


def test_per_bank_matches_an_independent_replay() -> None:
    specs = _list()
    parsed = [s.parsed(i) for i, s in enumerate(specs)]
    assert replay(parsed, BANKS) == _entries.replay(specs, BANKS)
    half = replay(parsed[:1], BANKS)
    assert replay(parsed[1:], BANKS, start=half) == replay(parsed, BANKS)


def test_sha1_padded_older_kernels() -> None:
    parsed = [s.parsed() for s in _list()]
    pcr = bytes(32)
    for e in parsed:
        value = b"\xff" * 20 if e.is_violation else hashlib.sha1(e.template_data).digest()
        pcr = hashlib.sha256(pcr + value + bytes(12)).digest()
    assert replay(parsed, ["sha256"], mode=ExtendMode.SHA1_PADDED) == {"sha256": pcr}
    assert replay(parsed, ["sha256"]) != {"sha256": pcr}


def test_advance_with_real_extend_values() -> None:
    parsed = [s.parsed(i) for i, s in enumerate(_list())]
    pol = RuntimePolicy(digests={"/a": {("sha256", hashlib.sha256(b"a").digest())}})
    step = advance(
        ImaProgress.start(1, ["sha256"], pol), reset_count=1, start_index=0, entries=parsed,
        quoted_pcr10=replay(parsed, ["sha256"]), policy=pol, extend_values=extend_values(),
    )  # fmt: skip
    assert step.proven == 3 and step.state.count == 3


def test_bad_start_and_bank() -> None:
    with pytest.raises(VerificationError, match="no 32-byte start value for sha256"):
        replay([], ["sha256"], start={"sha256": b"x"})
    with pytest.raises(VerificationError, match="unknown PCR bank 'md5'"):
        replay([ima_ng("/a", b"a").parsed()], ["md5"])


def test_boot_aggregate_forms() -> None:
    pcrs = {i: bytes([i]) * 32 for i in range(10)}
    sha1 = {i: bytes([i]) * 20 for i in range(10)}
    got = boot_aggregates({"sha256": pcrs, "sha1": sha1})
    assert got == (
        ("sha1", hashlib.sha1(b"".join(sha1[i] for i in range(8))).digest()),
        ("sha256", hashlib.sha256(b"".join(pcrs[i] for i in range(10))).digest()),
    )
    # a bank quoted without PCRs 8-9 gives no sha256 form (the kernel hashes 0-9)
    assert boot_aggregates({"sha256": {i: pcrs[i] for i in range(8)}}) == ()
