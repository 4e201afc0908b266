"""Truncated is not tampered (issue 20): a corpus log replayed into a real swtpm and
quoted, then cut short (the firmware stopped logging while extends went on) or
forged (an event's data no longer hashes to its digest). Both fail closed, each
with its own finding."""

from __future__ import annotations

import pytest

from tests.conftest import CORPUS
from tests.verifier.appraisal_lab import Lab, build_lab
from verifier.appraisal import AppraisalResult, Evidence, appraise
from verifier.eventlog import EventLog
from verifier.eventlog.events import EventType
from verifier.eventlog.replay import FORGED_EVENT, INCOMPLETE, ReplayMismatchError
from verifier.policy import Policy, learn_policy

pytestmark = pytest.mark.swtpm

RHEL9 = CORPUS / "eventlogs" / "vm_rhel9_qemu_ovmf_secureboot_keylime.bin"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    base = tmp_path_factory.mktemp("truncated")
    return build_lab(base / "state", base, RHEL9)


@pytest.fixture(scope="module")
def policy(lab: Lab) -> Policy:
    log = EventLog.parse(lab.log)
    return learn_policy(log.verify(log.replay()), name="rhel9")


def _appraise(lab: Lab, policy: Policy, log: bytes) -> AppraisalResult:
    q = lab.quotes["rsa"]
    return appraise(Evidence(q.attest, q.signature, q.pcrs, log), policy, nonce=lab.nonce, ak=q.ak)


@pytest.mark.parametrize("keep", [5, 20, -1])
def test_log_cut_short_is_incomplete_after_event_n(lab: Lab, policy: Policy, keep: int) -> None:
    events = EventLog.parse(lab.log).events
    cut_at = events[keep]  # the log stops just before this event; its extend still happened
    last = events[events.index(cut_at) - 1]
    short = lab.log[: cut_at.offset]
    result = _appraise(lab, policy, short)
    assert result.status == "contraindicated"  # fails closed
    (failure,) = result.failures
    assert failure.rule == INCOMPLETE
    assert f"the log is incomplete after event {last.index}:" in failure.message
    assert f"PCR {cut_at.pcr}" in failure.message
    assert failure.event is not None and failure.event.index == last.index
    assert result.trust_vector.executables == 99 and result.trust_vector.instance_identity == 2


def _secure_boot_event(log: bytes) -> tuple[int, int, int, bytes]:
    parsed = EventLog.parse(log)
    sb = next(
        e
        for e in parsed.events
        if e.event_type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG
        and b"S\x00e\x00c\x00u\x00r\x00e\x00B\x00" in e.untrusted_data
    )
    return sb.index, sb.offset, sb.data_offset + len(sb.untrusted_data), sb.digests["sha256"]


def test_forged_event_is_its_own_finding(lab: Lab, policy: Policy) -> None:
    """SecureBoot's data edited and its digest changed (not to the data's hash): replay
    falls short AND the event is proven forged: forged-event, naming the event."""
    index, offset, end, digest = _secure_boot_event(lab.log)
    at = lab.log.index(digest, offset)
    forged = bytearray(lab.log)
    forged[end - 1] ^= 1
    forged[at] ^= 1
    result = _appraise(lab, policy, bytes(forged))
    assert result.status == "contraindicated"
    (failure,) = result.failures
    assert failure.rule == FORGED_EVENT
    assert failure.event is not None
    assert failure.event.index == index and failure.event.pcr == 7
    assert "data does not match its digest" in failure.message


def test_replay_error_carries_the_classification(lab: Lab) -> None:
    """Only the digest edited (the data stays): EventLog.verify's error still has check
    eventlog.replay, and says forged-event with the event and the PCRs that disagree."""
    index, offset, _, digest = _secure_boot_event(lab.log)
    at = lab.log.index(digest, offset)
    forged = bytearray(lab.log)
    forged[at] ^= 1
    with pytest.raises(ReplayMismatchError) as info:
        EventLog.parse(bytes(forged)).verify(
            {b: dict(v) for b, v in lab.quotes["rsa"].pcrs.as_mapping().items()}
        )
    assert info.value.finding == FORGED_EVENT and info.value.event is not None
    assert info.value.event[0] == index
    assert info.value.check == "eventlog.replay"  # (what verify-quote reports, unchanged)
    assert ("sha256", 7) in info.value.mismatched
