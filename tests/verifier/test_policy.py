"""Policy schema (versioned, strict, path-named errors), rules, learning, offline appraisal.

Real logs: every corpus log learns a policy that the same log satisfies; a
policy changed in one place (secure boot, boot application, command line,
firmware, db/dbx, a PCR) makes that log contraindicated with each failure
named; an event whose data was changed with its digest kept never satisfies
a rule.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import CORPUS as CORPUS_ROOT
from verifier.appraisal import appraise_log
from verifier.eventlog import EfiVariable, EventLog, IplString, SignatureDatabase
from verifier.eventlog.events import EventType
from verifier.policy import AllOf, AnyOf, BootEvidence, Policy, PolicyViolationError, learn_policy
from verifier.policy.rules import (
    Failure,
    PcrValueRule,
    SecureBootRule,
    _cmdline_candidates,
    _never_cmdline,
    _References,
)
from vtpm_core.errors import ConfigError, ParseError

CORPUS = CORPUS_ROOT / "eventlogs"
SDBOOT = Path(__file__).parents[1] / "data" / "eventlog" / "qemu_ovmf_swtpm_sdboot.bin"
RHEL9 = CORPUS / "vm_rhel9_qemu_ovmf_secureboot_keylime.bin"
H32 = "ab" * 32


def _learn(path: Path) -> tuple[EventLog, Policy]:
    log = EventLog.parse(path.read_bytes())
    return log, learn_policy(log.verify(log.replay()), name=path.stem)


def _with(policy: Policy, **changes: Any) -> Policy:
    doc = policy.to_dict()
    doc.update(changes)
    return Policy.from_dict(doc)


# --- schema -------------------------------------------------------------------------------


def test_load_yaml_and_json_agree() -> None:
    doc = {
        "version": 1,
        "secure_boot": True,
        "boot_applications": [{"name": "shim", "sha256": H32}],
    }
    from_yaml = Policy.load(yaml.safe_dump(doc))
    from_json = Policy.load(__import__("json").dumps(doc).encode())
    assert from_yaml == from_json
    assert from_yaml.id == from_json.id and from_yaml.id.startswith("policy:sha256:")
    assert Policy.load(from_yaml.to_yaml()) == from_yaml


def test_load_from_path(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nname: lab\nsecure_boot: false\n")
    policy = Policy.load(path)
    assert policy.secure_boot is False and policy.id.startswith("policy:lab@sha256:")


@pytest.mark.parametrize(
    ("doc", "path", "match"),
    [
        ({"secure_boot": True}, "policy.version", "missing"),
        ({"version": 2, "secure_boot": True}, "policy.version", "unsupported version 2"),
        ({"version": 1}, "policy", "has no rules"),
        ({"version": 1, "secureboot": True}, "policy.secureboot", "unknown key"),
        ({"version": 1, "secure_boot": "yes"}, "policy.secure_boot", "true or false"),
        (
            {
                "version": 1,
                "boot_applications": [{"sha256": H32}, {"sha256": H32}, {"sha256": "zz"}],
            },
            "policy.boot_applications[2].sha256",
            "not a hex string",
        ),
        (
            {"version": 1, "boot_applications": [{"sha256": "ab" * 20}]},
            "policy.boot_applications[0].sha256",
            "20 bytes, expected 32",
        ),
        (
            {"version": 1, "boot_applications": [{"name": "x"}]},
            "policy.boot_applications[0]",
            "no digest",
        ),
        ({"version": 1, "kernel_cmdlines": []}, "policy.kernel_cmdlines", "empty list"),
        (
            {"version": 1, "kernel_cmdlines": [{"pattern": "("}]},
            "policy.kernel_cmdlines[0].pattern",
            "bad regular expression",
        ),
        (
            {"version": 1, "kernel_cmdlines": [{"exact": "a", "pattern": "b"}]},
            "policy.kernel_cmdlines[0]",
            "exactly one",
        ),
        ({"version": 1, "pcrs": {"md5": {"0": H32}}}, "policy.pcrs.md5", "unknown key"),
        ({"version": 1, "pcrs": {"sha256": {"24": H32}}}, "policy.pcrs.sha256.24", "out of range"),
        ({"version": 1, "pcrs": {"sha256": {"x": H32}}}, "policy.pcrs.sha256.x", "not an integer"),
        ({"version": 1, "dbx": {"min_entries": -1}}, "policy.dbx.min_entries", "integer >= 0"),
        ({"version": 1, "dbx": {}}, "policy.dbx", "empty"),
        (
            {"version": 1, "firmware": {"pcr0": {"sha256": []}}},
            "policy.firmware.pcr0.sha256",
            "empty",
        ),
        ([1, 2], "policy", "expected a mapping"),
    ],
    ids=[
        "fail/version/missing",
        "fail/version/unknown",
        "fail/rules/none",
        "fail/key/unknown",
        "fail/type/bool",
        "fail/digest/not-hex",
        "fail/digest/size",
        "fail/boot-app/no-digest",
        "fail/cmdline/empty",
        "fail/cmdline/bad-regex",
        "fail/cmdline/both",
        "fail/pcrs/bank",
        "fail/pcrs/index-range",
        "fail/pcrs/index-type",
        "fail/dbx/negative",
        "fail/dbx/empty",
        "fail/firmware/empty-list",
        "fail/doc/not-mapping",
    ],
)
def test_schema_errors_name_the_path(doc: Any, path: str, match: str) -> None:
    with pytest.raises(ParseError, match=match) as info:
        Policy.from_dict(doc)
    assert info.value.field == path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"version: 1\nsecure_boot: [", "not valid YAML"),
        (b"a: &x [1]\nb: *x\n", "aliases are not allowed"),
        (b"version: 1\nname: " + b"x" * (1 << 20), "byte limit"),
        (b"[" * 20000 + b"]" * 20000, "nested deeper than 16"),
        (b"version: 1\nsecure_boot: !!python/object:os.system x", "not valid YAML"),
    ],
    ids=[
        "fail/yaml/syntax",
        "fail/yaml/alias",
        "fail/yaml/oversize",
        "fail/yaml/deep",
        "fail/yaml/python-tag",
    ],
)
def test_load_rejects_bad_documents(text: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        Policy.load(text)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    )


_DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    _containers,
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(_DOCUMENTS)
def test_only_parse_errors_escape(doc: Any) -> None:
    if isinstance(doc, dict):
        doc = {"version": 1, **doc}
    with contextlib.suppress(ParseError):
        Policy.from_dict(doc)


# --- rule composition -----------------------------------------------------------------------


def test_empty_compositions_are_errors() -> None:
    with pytest.raises(ConfigError, match="empty all-of would pass anything"):
        AllOf(())
    with pytest.raises(ConfigError, match="empty any-of"):
        AnyOf(())


def test_all_of_reports_every_failure_and_any_of_needs_one() -> None:
    evidence = BootEvidence((), {"sha256": {7: b"\x01" * 32}}, {"sha256": frozenset({7})})
    ok = PcrValueRule("sha256", 7, (b"\x01" * 32,), "pcr7")
    bad = PcrValueRule("sha256", 7, (b"\x02" * 32,), "pcr7-other")
    missing = PcrValueRule("sha256", 9, (b"\x02" * 32,), "pcr9")
    with pytest.raises(PolicyViolationError) as info:
        AllOf((bad, ok, missing, SecureBootRule(True))).check(evidence)
    assert [f.rule for f in info.value.failures] == ["pcr7-other", "pcr9", "secure_boot"]
    AnyOf((bad, ok)).check(evidence)
    with pytest.raises(PolicyViolationError) as info:
        AnyOf((bad, missing)).check(evidence)
    assert len(info.value.failures) == 2


# --- learning and offline appraisal on real logs -------------------------------------------------

_LOGS = [*sorted(p for p in CORPUS.glob("*.bin")), SDBOOT]
assert len(_LOGS) > 1, f"no corpus logs under {CORPUS} (set VTPM_CORPUS)"


@pytest.mark.parametrize("path", _LOGS, ids=[p.stem for p in _LOGS])
def test_learned_policy_affirms_its_own_log(path: Path) -> None:
    log, policy = _learn(path)
    result = appraise_log(log, Policy.load(policy.to_yaml()))
    assert result.status == "affirming", [str(f) for f in result.failures]
    assert result.failures == ()
    assert result.warnings[0].startswith("offline check")


def test_learned_rhel9_policy_content() -> None:
    _, policy = _learn(RHEL9)
    assert policy.secure_boot is True
    assert policy.boot_applications is not None and len(policy.boot_applications) >= 3
    assert policy.kernel_cmdlines is not None
    assert policy.db is not None and policy.dbx is not None and policy.dbx.min_entries
    assert policy.firmware is not None and policy.firmware.pcr0 is not None


def test_each_changed_expectation_is_reported() -> None:
    log, policy = _learn(RHEL9)
    doc = policy.to_dict()
    apps = [dict(a) for a in doc["boot_applications"]]
    apps[0]["sha256"] = H32  # shim is no longer allowed
    changed = _with(
        policy,
        secure_boot=False,
        boot_applications=apps,
        kernel_cmdlines=[{"pattern": "root=/dev/sda1( quiet)?"}],
        firmware={"scrtm_versions": ["Other Firmware 1.0"]},
        db={"require": [H32]},
        dbx={"min_entries": 100000},
        pcrs={"sha256": {"7": H32}},
    )
    result = appraise_log(log, changed)
    assert result.status == "contraindicated"
    by_rule = {f.rule: f for f in result.failures}
    assert set(by_rule) >= {
        "secure_boot",
        "boot_applications",
        "kernel_cmdline",
        "firmware.scrtm_version",
        "db.require",
        "dbx.min_entries",
        "pcrs.sha256.7",
    }
    sb = by_rule["secure_boot"]
    assert (sb.expected, sb.actual) == ("disabled", "enabled")
    assert (
        sb.event is not None
        and sb.event.pcr == 7
        and sb.event.type_name == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    )
    app = by_rule["boot_applications"]
    assert app.event is not None and app.event.pcr == 4 and app.actual.startswith("sha256:")
    cmd = by_rule["kernel_cmdline"]
    assert cmd.expected == "/root=/dev/sda1( quiet)?/" and "root=" in cmd.actual
    assert by_rule["dbx.min_entries"].expected == ">= 100000"
    assert result.trust_vector.configuration == 96 and result.trust_vector.executables == 96


def test_pattern_cmdline_passes() -> None:
    log, policy = _learn(RHEL9)
    assert policy.kernel_cmdlines is not None
    text = policy.kernel_cmdlines[0].exact
    assert text is not None
    first = text.split(" ", 1)[0]
    ok = _with(policy, kernel_cmdlines=[{"pattern": re.escape(first) + " .*"}])
    assert appraise_log(log, ok).status == "affirming"


def test_db_reference_by_cert_hash_and_dbx_forbid() -> None:
    log, policy = _learn(RHEL9)
    replayed = log.verify(log.replay())
    dbx = next(
        e.decoded for e in replayed.events
        if isinstance(e.decoded, EfiVariable) and e.decoded.name == "dbx"
    )  # fmt: skip
    assert dbx is not None and dbx.value is not None
    entry = dbx.value.lists[0].signatures[0].data  # type: ignore[union-attr]
    result = appraise_log(log, _with(policy, dbx={"forbid": [entry.hex()]}))
    (failure,) = result.failures
    assert failure.rule == "dbx.forbid" and failure.actual == "present"
    hashed = hashlib.sha256(entry).hexdigest()
    assert (
        appraise_log(log, _with(policy, dbx={"forbid": [hashed]})).failures[0].rule == "dbx.forbid"
    )


def _forge_data(path: Path, pick: Any, mutate: Any) -> bytes:
    """Change one event's data in place, keeping its digests (and the log's framing)."""
    data = bytearray(path.read_bytes())
    log = EventLog.parse(bytes(data))
    event = next(e for e in log.events if pick(e))
    start = event.data_offset
    new = mutate(event.untrusted_data)
    assert len(new) == len(event.untrusted_data)
    data[start : start + len(new)] = new
    return bytes(data)


def test_forged_secure_boot_never_satisfies() -> None:
    # the sdboot VM booted with secure boot OFF; flip the logged byte to 1
    _log, policy = _learn(SDBOOT)
    forged = _forge_data(
        SDBOOT,
        lambda e: (
            e.event_type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG
            and e.untrusted_data.endswith(b"\x00")
            and b"S\x00e\x00c\x00u\x00r\x00e\x00B" in e.untrusted_data
        ),
        lambda d: d[:-1] + b"\x01",
    )
    result = appraise_log(forged, _with(policy, secure_boot=True))
    (failure,) = [f for f in result.failures if f.rule == "secure_boot"]
    assert "does not match its digest" in failure.message
    assert result.status == "contraindicated"
    # nor does it pass the policy learned from the genuine log
    assert appraise_log(forged, policy).status == "contraindicated"


def test_forged_cmdline_never_satisfies() -> None:
    _log, policy = _learn(RHEL9)
    forged = _forge_data(
        RHEL9,
        lambda e: (
            e.event_type == EventType.EV_IPL and e.untrusted_data.startswith(b"kernel_cmdline: ")
        ),
        lambda d: d.replace(b" ro ", b" rw "),
    )
    parsed = EventLog.parse(forged)
    ipl = [
        e
        for e in parsed.verify(parsed.replay()).events
        if isinstance(e.untrusted_decoded, IplString)
    ]
    assert any(e.data_verified is False for e in ipl)
    doc = policy.to_dict()
    text = doc["kernel_cmdlines"][0]["exact"].replace(" ro ", " rw ")
    result = appraise_log(forged, _with(policy, kernel_cmdlines=[{"exact": text}]))
    assert result.status == "contraindicated"
    assert any("does not match its digest" in f.message for f in result.failures)


def test_learning_refuses_an_empty_log() -> None:
    log = EventLog.parse((CORPUS / "short_no_action_truncated.bin").read_bytes())
    # a one-event SHA-1 log: only its (replayed) PCR 0 is learnable
    policy = learn_policy(log.verify(log.replay()))
    assert policy.firmware is not None


def test_events_in_unquoted_pcrs_never_satisfy() -> None:
    """The sdboot VM's quote covered sha256 PCRs 0-9; systemd-boot logged the kernel
    command line in PCR 12, which was not quoted: the cmdline rule must fail."""
    import json

    from verifier.policy import rules_for

    quoted_json = json.loads(
        SDBOOT.with_name("qemu_ovmf_swtpm_sdboot.quoted_pcrs.json").read_text()
    )
    quoted = {b: {int(i): bytes.fromhex(v) for i, v in p.items()} for b, p in quoted_json.items()}
    log, policy = _learn(SDBOOT)
    replayed = log.verify(quoted)
    assert 12 not in replayed.verified["sha256"]
    evidence = BootEvidence(replayed.events, quoted, replayed.verified)
    with pytest.raises(PolicyViolationError) as info:
        rules_for(policy).check(evidence)
    failures = [f for f in info.value.failures if f.rule == "kernel_cmdline"]
    assert [f.actual for f in failures] == ["not quoted"]
    assert failures[0].event is not None and failures[0].event.pcr == 12
    # everything else the quote covers passes
    assert {f.rule for f in info.value.failures} == {"kernel_cmdline"}


def test_rules_read_a_replayed_log_as_they_read_its_events() -> None:
    """BootEvidence over a ReplayedLog (events built as rules read them) and over the
    same log's events give the same failures, for every corpus log against a policy
    learned from another boot (so that rules fail and name events)."""
    from verifier.policy import rules_for

    logs = []
    for path in sorted((CORPUS_ROOT / "eventlogs").glob("*.bin")):
        with contextlib.suppress(ParseError):
            logs.append(EventLog.parse(path.read_bytes()))
    policies = []
    for log in logs:
        with contextlib.suppress(ConfigError):
            policies.append(rules_for(learn_policy(log.verify(log.replay()), name="x")))
    assert len(logs) >= 15 and len(policies) >= 10
    compared = 0
    for log, rules in zip(logs, policies[1:] + policies[:1], strict=False):
        outcomes = []
        for lazy in (True, False):
            replayed = log.verify(log.replay())
            events = replayed if lazy else replayed.events
            evidence = BootEvidence(events, replayed.pcrs, replayed.verified)
            assert evidence.data_mismatches == tuple(
                e for e in replayed.events if e.data_verified is False
            )
            try:
                rules.check(evidence)
                outcomes.append(())
            except PolicyViolationError as exc:
                outcomes.append(exc.failures)
        assert outcomes[0] == outcomes[1]
        compared += bool(outcomes[0])
    assert compared >= 10


class _RaisingRule:
    """A Rule written against the protocol alone: ``check`` raises."""

    id = "custom"
    claim = "configuration"

    def check(self, evidence: BootEvidence) -> None:
        failure = Failure(self.id, self.claim, "custom says no", "yes", "no")
        raise PolicyViolationError((failure, failure))


def test_all_of_reads_protocol_only_rules_through_check() -> None:
    evidence = BootEvidence((), {"sha256": {7: b"\x01" * 32}}, {"sha256": frozenset({7})})
    bad = PcrValueRule("sha256", 7, (b"\x02" * 32,), "pcr7-other")
    rules = AllOf((bad, _RaisingRule(), PcrValueRule("sha256", 7, (b"\x01" * 32,), "pcr7")))
    with pytest.raises(PolicyViolationError) as info:
        rules.check(evidence)
    assert [f.rule for f in info.value.failures] == ["pcr7-other", "custom", "custom"]
    assert str(info.value) == "policy: " + "; ".join(str(f) for f in info.value.failures)
    assert rules.failures(evidence) == list(info.value.failures)
    assert AllOf((rules, bad)).failures(evidence) == [
        *info.value.failures,
        bad.failures(evidence)[0],
    ]


_IPL_DATA = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"kernel_cmdline: ", b"grub_kernel_cmdline ", b"grub_cmd: ", b"k"]).flatmap(
        lambda label: st.binary(max_size=12).map(lambda body: label + body)
    ),
    st.text(max_size=12).map(lambda t: t.encode("utf-16-le")),
)


@given(st.lists(st.tuples(st.integers(0, 15), _IPL_DATA), max_size=12))
def test_cmdline_candidates_are_the_rows_never_cmdline_keeps(rows: list[tuple[int, bytes]]) -> None:
    indexed = [(i, pcr, data) for i, (pcr, data) in enumerate(rows)]
    assert _cmdline_candidates(indexed) == [
        r for r in indexed if r[1] in (8, 9, 12) and not _never_cmdline(r[2])
    ]


def _signature_databases() -> list[EfiVariable]:
    found = []
    for path in _LOGS:
        with contextlib.suppress(ParseError):
            log = EventLog.parse(path.read_bytes())
            for e in log.verify(log.replay()).events:
                var = e.untrusted_decoded
                if isinstance(var, EfiVariable) and var.name in ("db", "dbx", "KEK", "PK"):
                    found.append(var)
    return found


def test_db_references_are_the_entries_and_their_sha256() -> None:
    """``in`` on _References (hashes entries only as needed) answers as the set of every
    entry and every entry's SHA-256 does, whatever the order of the questions."""
    variables = _signature_databases()
    assert {v.name for v in variables if isinstance(v.value, SignatureDatabase)} >= {"db", "dbx"}
    for var in variables:
        entries = []  # (a value that is no signature database names nothing)
        if isinstance(var.value, SignatureDatabase):
            entries = [d for lst in var.value.lists for d in lst.entry_data()]
        hashes = [hashlib.sha256(d).digest() for d in entries]
        every = set(entries) | set(hashes)
        others = [b"", b"\x00" * 32, b"\x01" * 48, *(h[:20] for h in hashes[:3])]
        for questions in (
            entries + hashes + others,
            others + hashes[::-1] + entries[::-1],
            hashes[-1:] + hashes[:1] + others + hashes + entries,
        ):
            refs = _References(var)
            assert refs.count == len(entries)
            assert [q in refs for q in questions] == [q in every for q in questions]
