"""H-CRTM logs: PCR 0 starts at 00..04 when its first extend is EV_EFI_HCRTM_EVENT.

The real log is the head of tpm2-tss's FAPI H-CRTM test log (tests/data/eventlog/README.md);
FAPI's own unit test (test/unit/fapi-eventlog.c, check_bios_hcrtm) expects SHA-1 PCR 0
15f4e6ca... for it, "the pcr0 value got from system with HCRTM events".
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.verifier.eventlog import _build
from verifier.eventlog import EventLog, EventType
from vtpm_core.errors import ParseError, VerificationError

pytestmark = pytest.mark.filterwarnings("error")

DATA = Path(__file__).resolve().parents[2] / "data" / "eventlog"
HEAD = DATA / "tpm2tss_fapi_hcrtm_head.bin"
FAPI_SHA1_PCR0 = bytes.fromhex("15f4e6ca457d1af6bc49511a93ba3500ad69acc5")

HCRTM = EventType.EV_EFI_HCRTM_EVENT
VERSION = EventType.EV_S_CRTM_VERSION
LOCALITY_4 = b"StartupLocality\x00\x04"
LOCALITY_3 = b"StartupLocality\x00\x03"
# what the H-CRTM measured: the log carries only the marker "HCRTM" (PFP §10.4.1)
CRTM_CODE = b"the hardware CRTM's measurement"


def _independent_pcr0(log: EventLog, bank: str, start: int) -> bytes:
    """PCR 0 from 00..00 || start over the log's PCR 0 events, EV_NO_ACTION skipped,
    with hashlib and nothing of replay.py."""
    name = {"sm3_256": "sm3"}.get(bank, bank)  # (hashlib's name for it)
    value = bytes(hashlib.new(name).digest_size - 1) + bytes([start])
    for event in log.events:
        if event.pcr == 0 and event.event_type != EventType.EV_NO_ACTION:
            value = hashlib.new(name, value + event.digests[bank]).digest()
    return value


def test_real_hcrtm_log_replays_to_fapis_pcr0() -> None:
    log = EventLog.parse(HEAD.read_bytes())
    assert log.startup_locality is None  # nothing but the H-CRTM event says where PCR 0 starts
    assert log.hcrtm_event == 1 and log.event(1).untrusted_data == b"HCRTM"
    assert log.pcr0_locality == 4
    replayed = log.replay()
    assert replayed["sha1"][0] == FAPI_SHA1_PCR0
    for bank in ("sha1", "sha256", "sm3_256"):
        assert replayed[bank][0] == _independent_pcr0(log, bank, 4), bank
    # and the quote of such a machine verifies
    assert log.verify({"sha1": {0: FAPI_SHA1_PCR0}}).verified == {"sha1": frozenset({0})}


def test_real_hcrtm_log_differs_from_tpm2_eventlog_only_in_pcr0() -> None:
    """tpm2_eventlog 5.4 starts PCR 0 at zero (so misses FAPI's value); every other PCR,
    in every bank, it replays as we do."""
    tool = shutil.which("tpm2_eventlog")
    assert tool is not None, "tpm2-tools is a test dependency (scripts/setup.sh)"
    out = subprocess.run([tool, str(HEAD)], capture_output=True, text=True, check=True).stdout
    theirs: dict[str, dict[int, bytes]] = {}
    bank = ""
    for line in out[out.index("\npcrs:") :].splitlines():
        if m := re.fullmatch(r"  (\w+):", line):
            bank = m.group(1)
        elif m := re.fullmatch(r"\s+(\d+)\s*: 0x([0-9a-fA-F]+)", line):
            theirs.setdefault(bank, {})[int(m.group(1))] = bytes.fromhex(m.group(2))
    log = EventLog.parse(HEAD.read_bytes())
    ours = log.replay()
    assert set(theirs) == set(ours) == {"sha1", "sha256", "sm3_256"}
    for bank, values in ours.items():
        assert {i: v for i, v in values.items() if i} == {
            i: v for i, v in theirs[bank].items() if i
        }
        assert theirs[bank][0] == _independent_pcr0(log, bank, 0) != values[0]


@pytest.mark.parametrize(
    "events",
    [
        pytest.param((), id="hcrtm-alone"),
        pytest.param((_build.no_action(LOCALITY_4),), id="hcrtm-after-startup-locality-4"),
    ],
)
def test_hcrtm_starts_pcr0_at_locality_4_in_every_bank(events: tuple[bytes, ...]) -> None:
    data = _build.log(
        *events,
        _build.event2(0, HCRTM, b"HCRTM", digest_of=CRTM_CODE),
        _build.event2(0, VERSION, b"1.0\x00"),
        _build.event2(1, EventType.EV_SEPARATOR, bytes(4)),
    )
    log = EventLog.parse(data)
    assert log.hcrtm_event == 1 + len(events) and log.pcr0_locality == 4
    replayed = log.replay()
    for bank in ("sha1", "sha256"):
        size = hashlib.new(bank).digest_size
        value = bytes(size - 1) + b"\x04"
        for measured in (CRTM_CODE, b"1.0\x00"):
            value = hashlib.new(bank, value + hashlib.new(bank, measured).digest()).digest()
        assert replayed[bank][0] == value
        assert (
            replayed[bank][1]
            == hashlib.new(bank, bytes(size) + hashlib.new(bank, bytes(4)).digest()).digest()
        )  # the other PCRs start at zero as before
    assert log.verify({"sha256": dict(replayed["sha256"])}).verified["sha256"] == {0, 1}


def test_hcrtm_log_quoted_from_zero_is_refused() -> None:
    """A PCR 0 that started at zero is not what an H-CRTM log claims: the replay refuses it."""
    log = EventLog.parse(_build.log(_build.event2(0, HCRTM, b"HCRTM", digest_of=CRTM_CODE)))
    digest = hashlib.sha256(CRTM_CODE).digest()
    from_zero = hashlib.sha256(bytes(32) + digest).digest()
    with pytest.raises(VerificationError, match=r"^eventlog.replay: PCR 0 sha256: log replays"):
        log.verify({"sha256": {0: from_zero}})


def test_sha1_legacy_hcrtm_log() -> None:
    data = _build.legacy_event(0, HCRTM, b"HCRTM", digest_of=CRTM_CODE) + _build.legacy_event(
        0, VERSION, b"1.0\x00"
    )
    log = EventLog.parse(data)
    assert log.format == "sha1-legacy" and log.hcrtm_event == 0
    assert log.replay()["sha1"][0] == _independent_pcr0(log, "sha1", 4)


def test_hcrtm_event_after_another_pcr0_extend_is_an_ordinary_extend() -> None:
    """Only PCR 0's first extend can be the H-CRTM's (it happens before TPM2_Startup); a
    later EV_EFI_HCRTM_EVENT is replayed like any event, from zero."""
    log = EventLog.parse(
        _build.log(
            _build.event2(0, VERSION, b"1.0\x00"),
            _build.event2(0, HCRTM, b"HCRTM", digest_of=CRTM_CODE),
        )
    )
    assert log.hcrtm_event is None and log.pcr0_locality is None
    assert log.replay()["sha256"][0] == _independent_pcr0(log, "sha256", 0)


@pytest.mark.parametrize(
    ("locality", "value"),
    [pytest.param(LOCALITY_3, 3, id="fail/hcrtm/locality-3"),
     pytest.param(b"StartupLocality\x00\x00", 0, id="fail/hcrtm/locality-0")],
)  # fmt: skip
def test_startup_locality_contradicting_hcrtm_is_refused(locality: bytes, value: int) -> None:
    data = _build.log(
        _build.no_action(locality), _build.event2(0, HCRTM, b"HCRTM", digest_of=CRTM_CODE)
    )
    with pytest.raises(
        ParseError,
        match=(
            r"^TCG_PCR_EVENT2\.event at byte \d+: EV_EFI_HCRTM_EVENT starts PCR 0 at "
            rf"locality 4, but the StartupLocality event says {value}$"
        ),
    ):
        EventLog.parse(data)


def test_replay_events_applies_the_same_rule() -> None:
    """The public replay_events() over Event objects starts PCR 0 where replay_log does."""
    from verifier.eventlog import replay_events

    log = EventLog.parse(HEAD.read_bytes())
    assert replay_events(log.events, log.algorithms, log.startup_locality) == log.replay()


@pytest.mark.parametrize("banks", [("sha256",), ("sha1", "sha256")], ids=["one-bank", "two"])
@pytest.mark.parametrize(
    ("event_type", "data", "warned"),
    [
        pytest.param(HCRTM, b"HCRTM", False, id="hcrtm"),
        pytest.param(HCRTM, b"HCRTM\x00", False, id="hcrtm-nul"),
        pytest.param(HCRTM, b"H-CRTM measured", True, id="hcrtm-other"),
        pytest.param(EventType.EV_OMIT_BOOT_DEVICE_EVENTS, b"BOOT ATTEMPTS OMITTED", False,
                     id="omit"),
        pytest.param(EventType.EV_OMIT_BOOT_DEVICE_EVENTS, b"boot attempts omitted", True,
                     id="omit-other"),
    ],
)  # fmt: skip
def test_fixed_event_data_is_checked(
    banks: tuple[str, ...], event_type: int, data: bytes, warned: bool
) -> None:
    """PFP §10.4.1 fixes these types' data (FAPI accepts it with or without a NUL and
    refuses the rest; tcglog-parser reports the rest): anything else is a warning."""
    pcr = 0 if event_type == HCRTM else 4
    log = EventLog.parse(_build.log(_build.event2(pcr, event_type, data, banks=banks), banks=banks))
    warnings = log.verify(log.replay()).warnings
    expected = "HCRTM" if event_type == HCRTM else "BOOT ATTEMPTS OMITTED"
    name = "EV_EFI_HCRTM_EVENT" if event_type == HCRTM else "EV_OMIT_BOOT_DEVICE_EVENTS"
    assert warnings == (
        (f"event 1 ({name}, PCR {pcr}): data is {data!r}, PFP §10.4.1 defines it as "
         f"{expected!r}",) if warned else ()
    )  # fmt: skip
