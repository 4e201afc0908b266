"""appraise() on real evidence: a corpus log replayed into a swtpm's PCRs, quoted by
tpm2-tools with RSA and ECC AKs; then each attack, and the signed EAR result."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.conftest import CORPUS
from tests.verifier.appraisal_lab import Lab, Quoted, build_lab
from verifier.appraisal import Appraiser, Evidence, appraise
from verifier.ear import EarSigner, verify_result
from verifier.eventlog import EventLog
from verifier.eventlog.events import EventType
from verifier.policy import Policy, learn_policy
from vtpm_core.errors import ParseError
from vtpm_core.tpm import PcrValues

pytestmark = pytest.mark.swtpm

RHEL9 = CORPUS / "eventlogs" / "vm_rhel9_qemu_ovmf_secureboot_keylime.bin"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    base = tmp_path_factory.mktemp("appraisal")
    return build_lab(base / "state", base, RHEL9)


@pytest.fixture(scope="module")
def policy(lab: Lab) -> Policy:
    log = EventLog.parse(lab.log)
    return learn_policy(log.verify(log.replay()), name="rhel9")


def _evidence(q: Quoted, log: bytes | None) -> Evidence:
    return Evidence(q.attest, q.signature, q.pcrs, log)


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_good_evidence_affirms_and_signs(lab: Lab, policy: Policy, kind: str) -> None:
    q = lab.quotes[kind]
    result = appraise(_evidence(q, lab.log), policy, nonce=lab.nonce, ak=q.ak)
    assert result.status == "affirming", [str(f) for f in result.failures]
    assert result.trust_vector.instance_identity == 2
    assert result.trust_vector.executables == 3 and result.trust_vector.configuration == 2
    assert result.quote is not None and result.quote.reset_count >= 0
    assert result.policy_id == policy.id
    signer = EarSigner.generate()
    token = signer.sign(result, lab.nonce, "vm-rhel9", result.policy_id)
    ear = verify_result(token, signer.jwks(), expected_nonce=lab.nonce)
    assert ear.status == "affirming"
    assert ear.submods["vtpm-boot"].policy_id == policy.id


def _tamper_pcr(pcrs: PcrValues, index: int) -> PcrValues:
    values = pcrs.as_mapping()
    values["sha256"][index] = bytes(32)
    return PcrValues(values)


def _relabel(pcrs: PcrValues) -> PcrValues:
    values = pcrs.as_mapping()
    values["sha256"][15] = values["sha256"].pop(14)
    return PcrValues(values)


def _truncated(log: bytes) -> bytes:
    parsed = EventLog.parse(log)
    return log[: parsed.events[-5].offset]


def _other_boot_app(log: bytes) -> bytes:
    """A log naming another boot application digest (as if another shim were booted)."""
    parsed = EventLog.parse(log)
    app = next(
        e for e in parsed.events if e.event_type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION
    )
    digest = app.digests["sha256"]
    at = log.index(digest, app.offset)
    return log[:at] + bytes(32) + log[at + 32 :]


@pytest.mark.parametrize(
    ("case", "rule", "claim_value"),
    [
        ("fail/nonce/wrong", "quote.nonce", ("instance_identity", 99)),
        ("fail/pcr/tampered-value", "quote.pcr_digest", ("instance_identity", 99)),
        ("fail/pcr/relabelled-selection", "quote.pcr_select", ("instance_identity", 99)),
        ("fail/signature/other-key", "quote.signature", ("instance_identity", 99)),
        ("fail/ak/attributes-unknown", "ak.attributes", ("instance_identity", 99)),
        ("fail/log/truncated", "eventlog.incomplete", ("executables", 99)),
        ("fail/log/other-boot-app", "eventlog.incomplete", ("executables", 99)),
    ],
)
def test_attacks_are_contraindicated(
    lab: Lab, policy: Policy, case: str, rule: str, claim_value: tuple[str, int]
) -> None:
    q = lab.quotes["rsa"]
    ev = _evidence(q, lab.log)
    nonce, ak = lab.nonce, q.ak
    if case == "fail/nonce/wrong":
        nonce = b"\x01" * 32
    elif case == "fail/pcr/tampered-value":
        ev = replace(ev, pcrs=_tamper_pcr(q.pcrs, 4))
    elif case == "fail/pcr/relabelled-selection":
        ev = replace(ev, pcrs=_relabel(q.pcrs))
    elif case == "fail/signature/other-key":
        ak = lab.quotes["ecc"].ak
    elif case == "fail/ak/attributes-unknown":
        ak = replace(q.ak, from_pem=True)  # a bare key: its TPM attributes are unknown
    elif case == "fail/log/truncated":
        ev = replace(ev, eventlog=_truncated(lab.log))
    elif case == "fail/log/other-boot-app":
        ev = replace(ev, eventlog=_other_boot_app(lab.log))
    result = appraise(ev, policy, nonce=nonce, ak=ak)
    assert result.status == "contraindicated"
    (failure,) = result.failures
    assert failure.rule == rule
    name, value = claim_value
    assert getattr(result.trust_vector, name) == value


def test_forged_event_data_with_quote(lab: Lab, policy: Policy) -> None:
    """The log still replays (digests kept) but SecureBoot's data says 0: the rule fails."""
    parsed = EventLog.parse(lab.log)
    sb = next(
        e
        for e in parsed.events
        if e.event_type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG
        and b"S\x00e\x00c\x00u\x00r\x00e\x00B\x00" in e.untrusted_data
    )
    end = sb.data_offset + len(sb.untrusted_data)
    forged = lab.log[: end - 1] + b"\x00" + lab.log[end:]
    q = lab.quotes["ecc"]
    result = appraise(
        _evidence(q, forged), replace_secure_boot(policy, False), nonce=lab.nonce, ak=q.ak
    )
    assert result.status == "contraindicated"
    (failure,) = result.failures
    assert failure.rule == "secure_boot" and "does not match its digest" in failure.message
    assert failure.event is not None and failure.event.index == sb.index


def replace_secure_boot(policy: Policy, value: bool) -> Policy:
    doc = policy.to_dict()
    doc["secure_boot"] = value
    return Policy.from_dict(doc)


def test_policy_failures_with_a_valid_quote(lab: Lab, policy: Policy) -> None:
    q = lab.quotes["rsa"]
    doc = policy.to_dict()
    doc["secure_boot"] = False
    doc["kernel_cmdlines"] = [{"exact": "quiet"}]
    doc["pcrs"] = {"sha256": {"14": "00" * 32, "16": "00" * 32}}
    result = appraise(_evidence(q, lab.log), Policy.from_dict(doc), nonce=lab.nonce, ak=q.ak)
    assert result.status == "contraindicated"
    rules = sorted(f.rule for f in result.failures)
    assert rules == ["kernel_cmdline", "pcrs.sha256.14", "pcrs.sha256.16", "secure_boot"]
    pcr16 = next(f for f in result.failures if f.rule == "pcrs.sha256.16")
    assert pcr16.actual == "not quoted"
    assert result.trust_vector.instance_identity == 2


def test_no_event_log_only_literal_pcrs(lab: Lab) -> None:
    q = lab.quotes["rsa"]
    pcr7 = q.pcrs.value("sha256", 7).hex()
    literal = Policy.from_dict({"version": 1, "pcrs": {"sha256": {"7": pcr7}}})
    assert appraise(_evidence(q, None), literal, nonce=lab.nonce, ak=q.ak).status == "affirming"
    sb = Policy.from_dict({"version": 1, "secure_boot": True})
    result = appraise(_evidence(q, None), sb, nonce=lab.nonce, ak=q.ak)
    assert result.status == "contraindicated"
    assert result.failures[0].message == "no SecureBoot variable was measured"


def test_malformed_log_is_a_parse_error(lab: Lab, policy: Policy) -> None:
    q = lab.quotes["rsa"]
    with pytest.raises(ParseError):
        appraise(_evidence(q, lab.log[:30]), policy, nonce=lab.nonce, ak=q.ak)


def test_appraiser_cache_agrees_and_never_hides_a_change(lab: Lab, policy: Policy) -> None:
    appraiser = Appraiser(log_cache_size=2)
    q = lab.quotes["ecc"]
    first = appraiser.appraise(_evidence(q, lab.log), policy, nonce=lab.nonce, ak=q.ak)
    again = appraiser.appraise(_evidence(q, lab.log), policy, nonce=lab.nonce, ak=q.ak)
    fresh = appraise(_evidence(q, lab.log), policy, nonce=lab.nonce, ak=q.ak)
    assert first == again == fresh and first.status == "affirming"
    assert (appraiser.hits, appraiser.misses) == (1, 1)
    bad = appraiser.appraise(
        _evidence(q, _other_boot_app(lab.log)), policy, nonce=lab.nonce, ak=q.ak
    )
    assert bad.status == "contraindicated"
    wrong_nonce = appraiser.appraise(_evidence(q, lab.log), policy, nonce=b"\x02" * 32, ak=q.ak)
    assert wrong_nonce.failures[0].rule == "quote.nonce"
