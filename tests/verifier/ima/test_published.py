"""IMA measurement lists that others published (tests/data/ima/README.md says where from).

Each is read by our parser (which checks every template hash), written back
byte for byte in both forms, replayed into PCR 10 and appraised; Keylime
7.14.3's own IMA code gets the same lines and the same policy, and must
reach the same PCR 10 value and fail the same entries.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.verifier.ima.keylime_oracle import keylime_line_verdicts
from verifier.ima.appraise import appraise_entries
from verifier.ima.entries import ImaEntry
from verifier.ima.keylime import to_keylime
from verifier.ima.parse import parse_binary, parse_list
from verifier.ima.policy import Digest, ExcludeList, RuntimePolicy, ViolationMode
from verifier.ima.replay import ExtendMode, replay
from verifier.ima.signature import TrustedKey, TrustedKeys, verify_ima_signature

DATA = Path(__file__).resolve().parents[2] / "data" / "ima"

# name: (entries, violations, templates)
LISTS = {
    "embrave-rpi-ima-ng.ascii": (27, 0, {"ima-ng"}),
    "keylime-openpower-ima-sig.ascii": (6, 0, {"ima-sig"}),
    "keylime-ast-templates.ascii": (3, 0, {"ima", "ima-ng", "ima-buf"}),
    "keylime-create-policy-sha256.ascii": (2, 0, {"ima-ng"}),
    "keylime-create-policy-sha1.ascii": (2, 1, {"ima-ng"}),
    "lkml-overlayfs-tomtou.ascii": (5, 2, {"ima-ng"}),
    "lkml-overlayfs-open-writers.ascii": (5, 2, {"ima-ng"}),
}


def _read(name: str) -> tuple[bytes, tuple[ImaEntry, ...]]:
    data = (DATA / name).read_bytes()
    return data, parse_list(data)


def _learned(entries: tuple[ImaEntry, ...]) -> RuntimePolicy:
    """Every digest the list shows, per path (what ``vtpm ima learn`` does from a good VM),
    and one path never measured, so that the policy keeps a rule when a test drops one."""
    files: dict[str, set[Digest]] = {"/never/measured": {("sha256", bytes(32))}}
    bufs: dict[str, set[Digest]] = {}
    for e in entries:
        if e.is_violation:
            continue
        target = bufs if e.template_name == "ima-buf" else files
        target.setdefault(e.path, set()).add((e.digest_algo, e.digest))
    return RuntimePolicy(digests=files, ima_buf=bufs, name="learned")


@pytest.mark.parametrize("name", sorted(LISTS))
def test_published_list_parses_and_round_trips(name: str) -> None:
    data, entries = _read(name)
    count, violations, templates = LISTS[name]
    assert len(entries) == count
    assert sum(e.is_violation for e in entries) == violations
    assert {e.template_name for e in entries} == templates
    assert "\n".join(e.to_ascii() for e in entries) + "\n" == data.decode()
    binary = b"".join(e.to_bytes() for e in entries)
    assert parse_binary(binary) == parse_list(binary)
    assert [e.to_ascii() for e in parse_binary(binary)] == [e.to_ascii() for e in entries]


@pytest.mark.parametrize("bank", ["sha1", "sha256"])
@pytest.mark.parametrize("name", sorted(LISTS))
def test_replay_agrees_with_keylime(name: str, bank: str) -> None:
    """PCR 10 after the list (5.8+ per-bank extends; all ones for a violation): Keylime's
    running hash over the same lines is the same value, and it finds our value in the list."""
    from tests.verifier.ima import keylime_oracle  # noqa: F401, I001  (stubs gpg first)
    from keylime.common import algorithms
    from keylime.ima import ima

    data, entries = _read(name)
    ours = replay(entries, [bank], mode=ExtendMode.PER_BANK)[bank]
    theirs, failure = ima.process_measurement_list(
        None, data.decode().splitlines(), pcrval=ours.hex(), hash_alg=algorithms.Hash(bank)
    )
    assert theirs == ours.hex()
    assert "ima.pcr_mismatch" not in {e.event_id for e in failure.events}
    if bank == "sha1":  # older kernels: SHA-1 template digest into SHA-1 is the same thing
        assert replay(entries, ["sha1"], mode=ExtendMode.SHA1_PADDED)["sha1"] == ours


def _verdicts(entries: tuple[ImaEntry, ...], pol: RuntimePolicy, doc: dict[str, Any]) -> None:
    """Ours and Keylime's entry by entry; returns nothing, asserts they agree."""
    failed = {f.index for f in appraise_entries(entries, pol).failures}
    ours = [i not in failed for i in range(len(entries))]
    theirs = keylime_line_verdicts([e.to_ascii() for e in entries], copy.deepcopy(doc))
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(LISTS))
def test_appraisal_agrees_with_keylime(name: str) -> None:
    """The learned policy, then the same policy wrong in each way a policy goes wrong:
    a path missing, a digest changed, a path excluded. Violations fail in both (Keylime
    7.14.3 records a ``tomtou`` failure event even with ignore_tomtou_errors on; our
    default is ``violations: fail``)."""
    _, entries = _read(name)
    pol = _learned(entries)
    doc = to_keylime(pol).doc
    _verdicts(entries, pol, doc)
    result = appraise_entries(entries, pol)
    assert [f.index for f in result.failures] == [
        i for i, e in enumerate(entries) if e.is_violation
    ]

    victim = next(
        i
        for i, e in enumerate(entries)
        if not e.is_violation and e.template_name != "ima-buf" and e.path != "boot_aggregate"
    )
    path = entries[victim].path
    same_path = [i for i, e in enumerate(entries) if e.path == path and not e.is_violation]

    missing = dataclasses.replace(pol, digests={p: d for p, d in pol.digests.items() if p != path})
    _verdicts(entries, missing, to_keylime(missing).doc)
    fails = {f.index: f for f in appraise_entries(entries, missing).failures}
    reasons = {"path not in the policy", "kernel module not in the policy"}  # .ko paths: the latter
    assert all(fails[i].reason in reasons for i in same_path)

    algo = entries[victim].digest_algo
    zero = frozenset({(algo, bytes(len(entries[victim].digest)))})
    wrong = dataclasses.replace(pol, digests={**pol.digests, path: zero})
    _verdicts(entries, wrong, to_keylime(wrong).doc)
    fails = {f.index: f for f in appraise_entries(entries, wrong).failures}
    assert fails[victim].reason == "digest not allowed for this path"
    assert fails[victim].actual == f"{algo}:{entries[victim].digest.hex()}"

    excluded = dataclasses.replace(missing, excludes=ExcludeList((path.replace(".", r"\.") + "$",)))
    _verdicts(entries, excluded, to_keylime(excluded).doc)
    assert not set(same_path) & {f.index for f in appraise_entries(entries, excluded).failures}


def test_violations_ignored_with_flag_are_reported() -> None:
    _, entries = _read("lkml-overlayfs-tomtou.ascii")
    pol = dataclasses.replace(_learned(entries), violations=ViolationMode.IGNORE_WITH_FLAG)
    result = appraise_entries(entries, pol)
    assert result.ok
    assert [w.split(":")[0] for w in result.warnings] == [
        "entry 3 ima-ng 'test-file'",
        "entry 4 ima-ng '/root/test-dir/d/test-file'",
    ]


def test_all_zero_boot_aggregate_is_a_violation() -> None:
    """Keylime's sha1 test list starts with an all-zero boot_aggregate (a kernel without
    a TPM, or a copy with zeros): an all-zero template hash, so a violation for both."""
    _, entries = _read("keylime-create-policy-sha1.ascii")
    assert entries[0].path == "boot_aggregate" and entries[0].is_violation
    (failure,) = appraise_entries(entries, _learned(entries)).failures
    assert failure.index == 0 and "violation" in failure.reason


def _keys() -> TrustedKeys:
    return TrustedKeys.of(
        TrustedKey.load((DATA / name).read_bytes(), name=name)
        for name in ("keylime-rsa2048.pub.pem", "keylime-secp256k1.pub.pem")
    )


def test_published_signatures() -> None:
    """Keylime's signed entries: /usr/bin/dd (RSA-2048), /usr/bin/zmore (ECDSA secp256k1)
    verify with Keylime's published public keys; /usr/bin/zless is DSA-signed, for which
    no key is published here (and the kernel has not verified DSA since 4.x): it fails."""
    _, entries = _read("keylime-openpower-ima-sig.ascii")
    keys = _keys()
    states = {
        e.path: verify_ima_signature(e.signature, e.digest_algo, e.digest, keys)
        for e in entries
        if e.signature
    }
    assert states["/usr/bin/dd"].valid and states["/usr/bin/zmore"].valid
    assert not states["/usr/bin/zless"].valid
    assert "no trusted key" in states["/usr/bin/zless"].describe()


def test_signed_appraisal_agrees_with_keylime() -> None:
    """Digests only for the unsigned entries; the signed ones pass by key or fail."""
    _, entries = _read("keylime-openpower-ima-sig.ascii")
    unsigned = tuple(e for e in entries if not e.signature)
    pol = dataclasses.replace(_learned(unsigned), signing_keys=_keys())
    _verdicts(entries, pol, to_keylime(pol).doc)
    result = appraise_entries(entries, pol)
    assert (result.by_signature, [f.path for f in result.failures]) == (2, ["/usr/bin/zless"])
    assert "no trusted key" in (result.failures[0].signature or "")
