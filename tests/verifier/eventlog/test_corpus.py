"""Every real log in ../shared/corpus/eventlogs parses, round-trips and replays to
the PCR values recorded beside it; where tpm2_eventlog 5.4 disagrees, the test
says why it is the tool that is wrong.

Provenance of the expected values (corpus INDEX.json, expected_pcrs_provenance):
the go-tpm-tools logs carry values read from the machine's TPM (presumed:
they are hard-coded next to the log upstream, and the upstream test replays
against them); physical_linux_tpm12_sha1 values were read from the TPM in the
same dump; the tpm2-tools fixtures carry a newer tpm2_eventlog's replay; the
HIRS logs carry HIRS's expectation file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CORPUS
from tests.verifier.eventlog.conftest import load_pcrs
from verifier.eventlog import EventLog, EventType

LOGS = sorted(p.name for p in (CORPUS / "eventlogs").glob("*.bin"))
WITH_EXPECTED = [n for n in LOGS if (CORPUS / "eventlogs" / f"{n}.expected_pcrs.json").exists()]

# Expected PCRs that the firmware log cannot reproduce, with the reason.
NOT_FROM_FIRMWARE_LOG = {
    # PCR 10 is IMA's (the kernel extends it after boot); the dump recorded the
    # TPM's PCRs, the firmware log never touches PCR 10 (corpus INDEX: not_in_log_other).
    ("physical_linux_tpm12_sha1.bin", "sha1", 10),
}


def _reset_value(value: bytes) -> bool:
    # PC Client reset values: all zero (PCR 0-16, 23) or all ones (PCR 17-22 before a DRTM)
    return value in (bytes(len(value)), b"\xff" * len(value))


def test_corpus_is_complete() -> None:
    assert len(LOGS) == 19
    assert len(WITH_EXPECTED) == 15


@pytest.mark.parametrize("name", LOGS)
def test_parses_and_round_trips(name: str, load_log) -> None:  # type: ignore[no-untyped-def]
    log = load_log(name)
    # the records cover the file exactly: nothing skipped, nothing invented
    assert b"".join(e.raw for e in log.events) == log.raw == log.to_bytes()
    assert [e.index for e in log.events] == list(range(len(log.events)))
    assert all(
        log.events[i].offset + len(log.events[i].raw) == log.events[i + 1].offset
        for i in range(len(log.events) - 1)
    )
    assert log.quirks == ()  # no corpus log needs the padding quirk


@pytest.mark.parametrize("name", WITH_EXPECTED)
def test_replays_to_recorded_pcrs(name: str, load_log, eventlogs: Path) -> None:  # type: ignore[no-untyped-def]
    # 4 logs have no recorded values (INDEX: expected_pcrs_file null); they are
    # still checked against tpm2_eventlog below.
    expected_file = eventlogs / f"{name}.expected_pcrs.json"
    log = load_log(name)
    replayed = log.replay()
    expected = load_pcrs(expected_file)
    compared = 0
    for bank, values in expected.items():
        for index, value in values.items():
            ours = replayed.get(bank, {}).get(index)
            if ours is None:
                # a PCR the log never extends must hold its reset value
                if (name, bank, index) not in NOT_FROM_FIRMWARE_LOG:
                    assert _reset_value(value), f"{bank}:{index} recorded but not in the log"
                continue
            assert ours.hex() == value.hex(), f"{bank} PCR {index}"
            compared += 1
    assert compared >= 8
    # and the log extends no PCR the recording left out (for the banks recorded)
    for bank in expected:
        assert set(replayed[bank]) <= set(expected[bank])
    # verify() accepts exactly these values
    assert log.verify(expected).verified


def _naive_replay(log: EventLog, bank: str) -> dict[int, bytes]:
    """tpm2_eventlog 5.4's replay: EV_NO_ACTION extended, StartupLocality ignored."""
    size = hashlib.new(bank).digest_size
    out: dict[int, bytes] = {}
    for event in log.events[1:] if log.spec_id else log.events:
        prev = out.get(event.pcr, bytes(size))
        out[event.pcr] = hashlib.new(bank, prev + event.digests[bank]).digest()
    return out


# (log, bank, PCR) where tpm2_eventlog 5.4 differs from us, and why it is wrong.
TPM2_EVENTLOG_WRONG = {
    # StartupLocality=3 (PFP §10.4.5.3): PCR 0 starts at 00..03 and the
    # EV_NO_ACTION event itself is never extended (PFP §10.4.1).
    # tpm2_eventlog extends it from 00..00 instead. For the GDC log the
    # recorded TPM value agrees with us (test above).
    ("gdc_host_physical_server.bin", "sha256", 0),
    ("laptop_lenovo_thinkpad_keylime.bin", "sha1", 0),
    ("laptop_lenovo_thinkpad_keylime.bin", "sha256", 0),
}


@pytest.mark.parametrize("name", LOGS)
def test_agrees_with_tpm2_eventlog(name: str, load_log, eventlogs: Path) -> None:  # type: ignore[no-untyped-def]
    log = load_log(name)
    replayed = log.replay()
    theirs = load_pcrs(eventlogs / f"{name}.tpm2_eventlog_pcrs.json")
    if name == "short_no_action_truncated.bin":
        # tpm2_eventlog 5.4 exits 1 ("invalid eventDataSize in specid event"): it
        # takes any leading EV_NO_ACTION for a Spec ID event. The 49 bytes are a
        # well-formed SHA-1 log holding one StartupLocality(3) event (go-attestation
        # accepts it too): PCR 0 = 00..03, nothing extended.
        assert theirs == {}
        assert log.format == "sha1-legacy"
        assert replayed == {"sha1": {0: bytes(19) + b"\x03"}}
        return
    assert set(theirs) <= set(replayed)
    for bank, values in theirs.items():
        assert set(values) == set(replayed[bank]), bank
        for index, value in values.items():
            if (name, bank, index) in TPM2_EVENTLOG_WRONG:
                assert replayed[bank][index] != value
                # prove the reason: the naive replay reproduces their number
                assert _naive_replay(log, bank)[index] == value
                assert log.startup_locality is not None
                assert log.startup_locality.locality == 3
                continue
            assert replayed[bank][index] == value, f"{bank} PCR {index}"


@pytest.mark.skipif(shutil.which("tpm2_eventlog") is None, reason="tpm2-tools not installed")
def test_running_tpm2_eventlog_agrees(eventlogs: Path, load_log) -> None:  # type: ignore[no-untyped-def]
    """Run tpm2_eventlog ourselves on a log where it is right (no EV_NO_ACTION after the header)."""
    name = "vm_fedora37_sdboot_qemu.bin"
    out = subprocess.run(
        ["tpm2_eventlog", str(eventlogs / name)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    pcr_section = out[out.index("\npcrs:") :]
    theirs: dict[str, dict[int, str]] = {}
    bank = ""
    for line in pcr_section.splitlines():
        if m := re.match(r"^  (\w+):$", line):
            bank = m.group(1)
        elif m := re.match(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)$", line):
            theirs.setdefault(bank, {})[int(m.group(1))] = m.group(2).lower()
    ours = {b: {i: v.hex() for i, v in vals.items()} for b, vals in load_log(name).replay().items()}
    assert theirs == ours
    assert json.dumps(theirs)  # sanity: something was parsed
    assert theirs["sha256"]


def test_startup_locality_event_is_parsed_not_extended(load_log) -> None:  # type: ignore[no-untyped-def]
    log = load_log("gdc_host_physical_server.bin")
    event = log.events[1]
    assert event.event_type == EventType.EV_NO_ACTION
    assert event.is_startup_locality
    assert log.startup_locality is not None and log.startup_locality.locality == 3
    assert log.spec_id is not None and log.spec_id.platform_class == 1  # server
