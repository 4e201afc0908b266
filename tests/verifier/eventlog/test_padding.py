"""Logs read from the firmware's log area: the records, then fill up to the area's end.

Quirk ``log-trailing-padding``: a tail of nothing but 0xFF (any length) or 0x00 (16
bytes or more) after the last record is the end of the log, reported; anything else
after the records (fill followed by other bytes, a record with a PCR index out of range,
too little zero fill to tell from a cut record) is still a ParseError.
"""

from __future__ import annotations

import re
import struct

import pytest

from tests.conftest import CORPUS
from tests.verifier.eventlog import _build
from tests.verifier.eventlog.conftest import load_pcrs
from verifier.eventlog import EventLog, EventType
from vtpm_core.errors import ParseError, VerificationError

pytestmark = pytest.mark.filterwarnings("error")

EVENTLOGS = CORPUS / "eventlogs"
AREA = 64 * 1024  # a usual firmware log area (ACPI TPM2/TCPA LAML)
LOGS = [
    pytest.param("intel_nuc_legacy_sha1_format.bin", id="sha1-legacy-intel-nuc"),
    pytest.param("gce_debian10_legacy_sha1_format.bin", id="sha1-legacy-gce-debian10"),
    pytest.param("hirs_tpmlog_legacy_sha1.bin", id="sha1-legacy-hirs"),
    pytest.param("vm_fedora37_sdboot_qemu.bin", id="crypto-agile-fedora37"),
    pytest.param("gdc_host_physical_server.bin", id="crypto-agile-gdc"),
]
FILLS = [
    pytest.param(0xFF, 1, id="ff-1"),
    pytest.param(0xFF, 4, id="ff-4"),  # reads as pcrIndex 4294967295 without the quirk
    pytest.param(0xFF, 15, id="ff-15"),
    pytest.param(0xFF, None, id="ff-to-64k"),
    pytest.param(0x00, 16, id="00-16"),
    pytest.param(0x00, None, id="00-to-64k"),
]


def _pad(data: bytes, fill: int, count: int | None) -> bytes:
    return data + bytes([fill]) * (AREA - len(data) if count is None else count)


@pytest.mark.parametrize("name", LOGS)
@pytest.mark.parametrize(("fill", "count"), FILLS)
def test_real_log_padded_to_its_area_reads_as_the_log(name: str, fill: int, count: int) -> None:
    exact = (EVENTLOGS / name).read_bytes()
    padded = _pad(exact, fill, count)
    log, plain = EventLog.parse(padded), EventLog.parse(exact)
    assert log.to_bytes() == padded
    assert log.events == plain.events and log.format == plain.format
    assert [(q.quirk_id, q.event_index, q.detail) for q in log.quirks] == [
        (
            "log-trailing-padding",
            None,
            f"{len(padded) - len(exact)} bytes of 0x{fill:02x} after the last event "
            f"at byte {len(exact)} ignored",
        )
    ]
    assert log.replay() == plain.replay()
    replayed = log.verify(load_pcrs(EVENTLOGS / f"{name}.expected_pcrs.json"))
    assert f"quirk log-trailing-padding applied to log: {log.quirks[0].detail}" in (
        replayed.warnings
    )


@pytest.mark.parametrize(
    ("tail", "pattern"),
    [
        pytest.param(
            b"\xff" * 4 + _build.legacy_event(0, EventType.EV_POST_CODE, b"x")[4:],
            r"^TCG_PCR_EVENT\.pcrIndex at byte {end}: PCR 4294967295 is not a PC Client "
            r"PCR \(0\.\.23\)$",
            id="fail/padding/record-with-pcr-ffffffff",
        ),
        pytest.param(
            _build.legacy_event(24, EventType.EV_POST_CODE, b"x"),
            r"^TCG_PCR_EVENT\.pcrIndex at byte {end}: PCR 24 is not a PC Client PCR",
            id="fail/padding/record-with-pcr-24",
        ),
        pytest.param(
            b"\xff" * 64 + b"\x01",
            r"^TCG_PCR_EVENT\.pcrIndex at byte {end}: PCR 4294967295 is not",
            id="fail/padding/ff-fill-then-a-byte",
        ),
        pytest.param(
            b"\xff" * 64 + _build.legacy_event(4, EventType.EV_SEPARATOR, bytes(4)),
            r"^TCG_PCR_EVENT\.pcrIndex at byte {end}: PCR 4294967295 is not",
            id="fail/padding/ff-fill-then-a-record",
        ),
        pytest.param(
            b"\x00" * 15,
            r"^TCG_PCR_EVENT\.digest at byte \d+: truncated: need 20 bytes, only 7 left$",
            id="fail/padding/too-little-zero-fill",
        ),
    ],
)
def test_sha1_legacy_tail_that_is_not_only_fill_is_refused(tail: bytes, pattern: str) -> None:
    exact = (EVENTLOGS / "intel_nuc_legacy_sha1_format.bin").read_bytes()
    with pytest.raises(ParseError, match=pattern.format(end=len(exact))):
        EventLog.parse(exact + tail)


def _agile_event(pcr: int) -> bytes:
    return _build.event2(pcr, EventType.EV_SEPARATOR, bytes(4), banks=("sha256",))


@pytest.mark.parametrize(
    ("tail", "pattern"),
    [
        pytest.param(
            b"\xff" * 4 + _agile_event(0)[4:],
            r"^TCG_PCR_EVENT2\.pcrIndex at byte {end}: PCR 4294967295 is not a PC Client "
            r"PCR \(0\.\.23\)$",
            id="fail/padding/record-with-pcr-ffffffff",
        ),
        pytest.param(
            _agile_event(30),
            r"^TCG_PCR_EVENT2\.pcrIndex at byte {end}: PCR 30 is not a PC Client PCR",
            id="fail/padding/record-with-pcr-30",
        ),
        pytest.param(
            b"\xff" * 100 + b"\x00",
            r"^TCG_PCR_EVENT2\.pcrIndex at byte {end}: PCR 4294967295 is not",
            id="fail/padding/ff-fill-then-a-byte",
        ),
        pytest.param(
            b"\x00" * 64 + b"\xff" * 64,
            r"^TCG_PCR_EVENT2\.digests at byte \d+: event lacks the sha256 digest",
            id="fail/padding/zero-fill-then-ff-fill",
        ),
        pytest.param(
            b"\x00" * 8,
            r"^TCG_PCR_EVENT2\.digests\.count at byte \d+: truncated",
            id="fail/padding/too-little-zero-fill",
        ),
    ],
)
def test_crypto_agile_tail_that_is_not_only_fill_is_refused(tail: bytes, pattern: str) -> None:
    exact = (EVENTLOGS / "vm_fedora37_sdboot_qemu.bin").read_bytes()
    with pytest.raises(ParseError, match=pattern.format(end=len(exact))):
        EventLog.parse(exact + tail)


def test_fill_inside_the_log_is_not_padding() -> None:
    """Fill between records is parsed (and refused), never skipped: only a tail that is
    fill up to the end of the data ends the log."""
    exact = (EVENTLOGS / "vm_fedora37_sdboot_qemu.bin").read_bytes()
    cut = EventLog.parse(exact).event(5).offset
    with pytest.raises(ParseError, match=rf"^TCG_PCR_EVENT2\.pcrIndex at byte {cut}: PCR 4294"):
        EventLog.parse(exact[:cut] + b"\xff" * 32 + exact[cut:])


def test_ff_fill_right_after_an_ff_ending_record() -> None:
    """The last record's own 0xFF bytes (an error separator's data) are not fill: the
    padding starts at the record boundary after them."""
    error_separator = _build.event2(4, EventType.EV_SEPARATOR, b"\xff" * 4)
    exact = _build.log(error_separator)
    log = EventLog.parse(exact + b"\xff" * 3)
    assert log.events[-1].untrusted_data == b"\xff" * 4
    assert re.fullmatch(rf"3 bytes of 0xff after the last event at byte {len(exact)} ignored",
                        log.quirks[0].detail)  # fmt: skip
    assert struct.unpack_from("<I", exact, log.events[-1].offset)[0] == 4


def test_sha1_legacy_zero_then_ff_fill_frames_as_events_the_quote_refuses() -> None:
    """In the SHA-1 format 32 zero bytes are a well-formed TCG_PCR_EVENT (PCR 0,
    EV_PREBOOT_CERT, zero digest): zero fill followed by 0xFF fill parses as such events,
    which are extended, so the real machine's PCR 0 no longer verifies."""
    name = "intel_nuc_legacy_sha1_format.bin"
    exact = (EVENTLOGS / name).read_bytes()
    log = EventLog.parse(exact + bytes(64) + b"\xff" * 64)
    assert [e.type_name for e in log.events[-2:]] == ["EV_PREBOOT_CERT"] * 2
    with pytest.raises(VerificationError, match=r"^eventlog.replay: PCR 0 sha1: log replays"):
        log.verify(load_pcrs(EVENTLOGS / f"{name}.expected_pcrs.json"))
