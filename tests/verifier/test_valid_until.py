"""Time-windowed reference values (issue 20): ``valid_until`` on boot applications and
command lines, enforced against the appraisal time, on real swtpm-quoted evidence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import CORPUS
from tests.verifier.appraisal_lab import Lab, build_lab
from verifier.appraisal import AppraisalResult, Appraiser, Evidence, appraise
from verifier.eventlog import EventLog
from verifier.policy import Policy, learn_policy
from verifier.policy.schema import PolicyParseError

pytestmark = pytest.mark.swtpm

RHEL9 = CORPUS / "eventlogs" / "vm_rhel9_qemu_ovmf_secureboot_keylime.bin"
END = datetime(2027, 1, 31, tzinfo=UTC)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    base = tmp_path_factory.mktemp("valid-until")
    return build_lab(base / "state", base, RHEL9)


@pytest.fixture(scope="module")
def windowed(lab: Lab) -> Policy:
    """The learned policy with its last boot application and every command line windowed."""
    log = EventLog.parse(lab.log)
    doc = learn_policy(log.verify(log.replay()), name="rhel9").to_dict()
    doc["boot_applications"][-1] |= {"valid_until": "2027-01-31T00:00:00Z", "note": "old kernel"}
    for c in doc["kernel_cmdlines"]:
        c["valid_until"] = "2027-01-31T00:00:00+00:00"
    return Policy.from_dict(doc)


def _at(lab: Lab, policy: Policy, now: datetime) -> AppraisalResult:
    q = lab.quotes["ecc"]
    ev = Evidence(q.attest, q.signature, q.pcrs, lab.log)
    return appraise(ev, policy, nonce=lab.nonce, ak=q.ak, now=now)


def test_inside_the_window_affirms(lab: Lab, windowed: Policy) -> None:
    result = _at(lab, windowed, END - timedelta(seconds=1))
    assert result.status == "affirming", [str(f) for f in result.failures]


def test_expired_value_names_which_and_when(lab: Lab, windowed: Policy) -> None:
    result = _at(lab, windowed, END)
    assert result.status == "contraindicated"
    rules = sorted({f.rule for f in result.failures})
    assert rules == ["boot_applications.valid_until", "kernel_cmdline.valid_until"]
    app = next(f for f in result.failures if f.rule == "boot_applications.valid_until")
    name = windowed.boot_applications[-1].name  # type: ignore[index]
    assert f"boot application {name} sha256:" in app.message
    assert "valid until 2027-01-31T00:00:00Z" in app.message
    assert app.actual == "expired at 2027-01-31T00:00:00Z"
    assert app.expected == "a value valid at 2027-01-31T00:00:00Z"
    assert app.event is not None and app.event.pcr == 4
    assert result.trust_vector.executables == 96  # AR4SI contraindicated runtime


def test_the_cache_key_holds_the_time(lab: Lab, windowed: Policy) -> None:
    appraiser = Appraiser()
    q = lab.quotes["ecc"]
    ev = Evidence(q.attest, q.signature, q.pcrs, lab.log)
    kw = {"nonce": lab.nonce, "ak": q.ak}
    before = appraiser.appraise(ev, windowed, now=END - timedelta(days=1), **kw)  # type: ignore[arg-type]
    after = appraiser.appraise(ev, windowed, now=END + timedelta(days=1), **kw)  # type: ignore[arg-type]
    again = appraiser.appraise(ev, windowed, now=END - timedelta(days=2), **kw)  # type: ignore[arg-type]
    assert (before.status, after.status, again.status) == (
        "affirming",
        "contraindicated",
        "affirming",
    )
    assert (appraiser.hits, appraiser.misses) == (1, 2)


def test_schema_round_trip_and_errors() -> None:
    doc = {
        "version": 1,
        "boot_applications": [{"name": "k", "sha256": "00" * 32, "valid_until": END}],
        "kernel_cmdlines": [{"pattern": "ro( quiet)?", "valid_until": "2027-01-31T00:00:00Z"}],
    }
    policy = Policy.from_dict(doc)
    assert policy.expiries == (END,)
    assert Policy.load(policy.to_yaml()) == policy
    assert policy.to_dict()["boot_applications"][0]["valid_until"] == "2027-01-31T00:00:00Z"
    naive = {"version": 1, "kernel_cmdlines": [{"exact": "ro", "valid_until": "2027-01-31"}]}
    with pytest.raises(PolicyParseError, match=r"kernel_cmdlines\[0\]\.valid_until: .*time zone"):
        Policy.from_dict(naive)
    bad = {"version": 1, "kernel_cmdlines": [{"valid_until": "2027-01-31T00:00:00Z"}]}
    with pytest.raises(PolicyParseError, match="exactly one of exact or pattern"):
        Policy.from_dict(bad)
