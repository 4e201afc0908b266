"""Hostile input: truncation, over-limit sizes, malformed framing, random bytes.

Only ParseError (and VerificationError from verify) may come out; never
IndexError, struct.error, a hang or a silent pass.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CORPUS, REPO
from tests.verifier.eventlog import _build
from verifier.eventlog import EVENT_TYPES, EventLog, EventType, Limits
from vtpm_core.errors import ConfigError, ParseError, VerificationError

SMALL = (CORPUS / "eventlogs" / "vm_fedora37_sdboot_qemu.bin").read_bytes()
LEGACY = (CORPUS / "eventlogs" / "intel_nuc_legacy_sha1_format.bin").read_bytes()


def _exercise(data: bytes, limits: Limits | None = None) -> None:
    """Parse, replay, verify against itself, touch every decoded event."""
    try:
        log = EventLog.parse(data, limits or Limits())
    except ParseError:
        return
    try:
        replayed = log.verify(log.replay())
    except VerificationError:
        return
    for event in replayed.events:
        _ = (event.decoded, event.data_verified, event.warnings)


@pytest.mark.parametrize("sample", [SMALL, LEGACY], ids=["crypto-agile", "sha1-legacy"])
def test_truncation_at_every_offset(sample: bytes) -> None:
    full = EventLog.parse(sample)
    boundaries = {e.offset for e in full.events} | {len(sample)}
    for cut in range(1, len(sample)):
        data = sample[:cut]
        if cut in boundaries:
            # a cut between records is a shorter, well-formed log
            assert len(EventLog.parse(data).events) == sum(1 for b in boundaries if b <= cut) - 1
            continue
        with pytest.raises(ParseError, match=r"truncated|runs past|exceeds") as info:
            EventLog.parse(data)
        start = max(b for b in boundaries if b <= cut)
        assert start <= info.value.offset <= cut, (cut, info.value)


def test_truncated_large_log_names_offset() -> None:
    data = (CORPUS / "eventlogs" / "gce_rhel8_uefi_secureboot.bin").read_bytes()
    with pytest.raises(
        ParseError,
        match=(
            r"^TCG_PCR_EVENT2\.digests\[1\]\.digest at byte 6593: "
            r"truncated: need 32 bytes, only 7 left$"
        ),
    ):
        EventLog.parse(data[:6600])


def _agile_with_event(event: bytes) -> bytes:
    return _build.log(event)


BIG = struct.pack("<III", 0, EventType.EV_IPL, 2) + struct.pack("<H", 4) + bytes(20)


@pytest.mark.parametrize(
    ("data", "limits", "pattern"),
    [
        pytest.param(
            SMALL,
            Limits(max_log_bytes=1000),
            r"^TCG_PCR_EVENT\.log at byte 1000: log is 2611 bytes, limit is 1000$",
            id="fail/limit/log-bytes",
        ),
        pytest.param(
            SMALL,
            Limits(max_events=5),
            r"^TCG_PCR_EVENT2\.pcrIndex at byte \d+: more than 5 events$",
            id="fail/limit/events",
        ),
        pytest.param(
            SMALL,
            Limits(max_event_data=20),
            r"^TCG_PCR_EVENT\.eventDataSize at byte 28: 33 bytes exceeds the limit of 20$",
            id="fail/limit/spec-id-data",
        ),
        pytest.param(
            SMALL,
            Limits(max_event_data=100),
            r"^TCG_PCR_EVENT2\.eventSize at byte \d+: \d+ bytes exceeds the limit of 100$",
            id="fail/limit/event-data",
        ),
        pytest.param(SMALL, Limits(max_digests_per_event=1), None, id="ok/limit/one-bank-log"),
        pytest.param(
            _build.log(_build.event2(0, 8, b"x")),
            Limits(max_digests_per_event=1),
            r"^TCG_EfiSpecIDEvent\.numberOfAlgorithms at byte 56: 2 algorithms \(must be 1..1\)$",
            id="fail/limit/digests",
        ),
    ],
)
def test_limits(data: bytes, limits: Limits, pattern: str | None) -> None:
    if pattern is None:
        assert EventLog.parse(data, limits).banks == ("sha256",)
        return
    with pytest.raises(ParseError, match=pattern):
        EventLog.parse(data, limits)


def test_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="max_events must be a positive integer"):
        Limits(max_events=0)


def _event_raw(
    pcr: int, etype: int, digests: list[tuple[int, bytes]], data: bytes, count: int | None = None
) -> bytes:
    out = struct.pack("<III", pcr, etype, len(digests) if count is None else count)
    for alg, d in digests:
        out += struct.pack("<H", alg) + d
    return out + struct.pack("<I", len(data)) + data


S1 = (4, bytes(20))
S256 = (0xB, bytes(32))
HEADER = _build.spec_id_header()
SEP = hashlib.sha1(bytes(4)).digest()


def _spec_id(
    algs: bytes, count: int = 1, uintn: int = 2, sig: bytes = b"Spec ID Event03\x00"
) -> bytes:
    body = sig + struct.pack("<IBBBBI", 0, 0, 2, 0, uintn, count) + algs + b"\x00"
    return struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        pytest.param(
            b"", r"^TCG_PCR_EVENT\.pcrIndex at byte 0: empty log$", id="fail/framing/empty"
        ),
        pytest.param(
            b"\x00" * 10,
            r"^TCG_PCR_EVENT\.digest at byte 8: truncated: need 20 bytes, only 2 left$",
            id="fail/framing/short-header",
        ),
        pytest.param(
            HEADER + _event_raw(24, 4, [S1, S256], bytes(4)),
            r"pcrIndex at byte 69: PCR 24 is not a PC Client PCR",
            id="fail/framing/pcr-24",
        ),
        pytest.param(
            HEADER + _event_raw(0, 4, [S1, (0xC, bytes(48))], bytes(4)),
            r"digests\[1\]\.hashAlg at byte 103: algorithm 0x000c is not listed",
            id="fail/framing/unlisted-alg",
        ),
        pytest.param(
            HEADER + _event_raw(0, 4, [S1, S1], bytes(4)),
            r"sha1 digest repeated",
            id="fail/framing/repeated-alg",
        ),
        pytest.param(
            HEADER + _event_raw(0, 4, [S1], bytes(4)),
            r"lacks the sha256 digest",
            id="fail/framing/missing-bank",
        ),
        pytest.param(
            HEADER + _event_raw(0, 4, [], bytes(4), count=0xFFFFFFFF),
            r"digests\.count at byte 77: 4294967295 digests exceeds",
            id="fail/framing/huge-count",
        ),
        pytest.param(
            _build.spec_id_header(("sha1",))
            + struct.pack("<IIIH", 0, 4, 1, 4)
            + bytes(20)
            + b"\xff\xff\xff\xff",
            r"eventSize at byte \d+: 4294967295 bytes exceeds",
            id="fail/framing/huge-size",
        ),
        pytest.param(
            _spec_id(struct.pack("<HH", 0xB, 20)),
            r"TCG_EfiSpecIDEvent\.digestSizes\[0\]\.digestSize at byte 60: "
            r"sha256 digests are 32 bytes, Spec ID says 20",
            id="fail/specid/wrong-size",
        ),
        pytest.param(
            _spec_id(struct.pack("<HH", 4, 20) * 2, count=2),
            r"sha1 listed twice",
            id="fail/specid/duplicate",
        ),
        pytest.param(
            _spec_id(struct.pack("<HH", 4, 20), uintn=3),
            r"uintnSize at byte \d+: must be 1 \(32-bit\) or 2 \(64-bit\), got 3",
            id="fail/specid/uintn",
        ),
        pytest.param(
            _spec_id(struct.pack("<HH", 4, 20), count=0),
            r"numberOfAlgorithms at byte 56: 0 algorithms",
            id="fail/specid/no-banks",
        ),
        pytest.param(
            _spec_id(struct.pack("<HH", 4, 20), count=3),
            r"truncated",
            id="fail/specid/count-past-end",
        ),
        pytest.param(
            _build.log(
                _build.event2(0, 3, b"StartupLocality\x00\x03"),
                _build.event2(0, 3, b"StartupLocality\x00\x03"),
            ),
            r"second StartupLocality event",
            id="fail/locality/twice",
        ),
        pytest.param(
            _build.log(_build.event2(0, 8, b"v"), _build.event2(0, 3, b"StartupLocality\x00\x03")),
            r"StartupLocality event after PCR 0 was already extended",
            id="fail/locality/late",
        ),
        pytest.param(
            _build.log(_build.event2(0, 3, b"StartupLocality\x00\x02")),
            r"StartupLocality at byte \d+: locality 2 is not 0, 3 or 4",
            id="fail/locality/value",
        ),
        pytest.param(
            _build.log(_build.event2(0, 3, b"StartupLocality\x00\x03\x00")),
            r"1 unexpected trailing bytes",
            id="fail/locality/long",
        ),
        pytest.param(
            _build.log(_build.event2(0, 3, b"x")).replace(
                b"\x00\x00\x00\x00\x03\x00\x00\x00", b"\x01\x00\x00\x00\x03\x00\x00\x00", 1
            ),
            r"Spec ID event must be EV_NO_ACTION in PCR 0",
            id="fail/specid/pcr1",
        ),
    ],
)
def test_malformed_framing(data: bytes, pattern: str) -> None:
    with pytest.raises(ParseError, match=pattern):
        EventLog.parse(data)


def test_trailing_padding_is_a_reported_quirk() -> None:
    log = EventLog.parse(SMALL + b"\xff" * 64)
    assert [q.quirk_id for q in log.quirks] == ["log-trailing-padding"]
    assert log.replay() == EventLog.parse(SMALL).replay()
    replayed = log.verify(log.replay())
    assert any("log-trailing-padding" in w and "64 bytes of 0xff" in w for w in replayed.warnings)


def test_malformed_event_data_is_reported_not_fatal() -> None:
    """A variable event whose UEFI_VARIABLE_DATA lies about its lengths still replays;
    its data does not decode, which is reported and leaves decoded None."""
    bad_var = bytes(16) + struct.pack("<QQ", 2**62, 0)
    log = EventLog.parse(
        _build.log(_build.event2(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, bad_var))
    )
    event = log.verify(log.replay()).events[1]
    assert event.decoded is None and event.data_verified is True
    assert any("UEFI_VARIABLE_DATA.UnicodeNameLength at byte" in w for w in event.warnings)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_parse_error(data: bytes) -> None:
    _exercise(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_real_logs_only_parse_error(data: st.DataObject) -> None:
    sample = bytearray(data.draw(st.sampled_from([SMALL, LEGACY])))
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(sample) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if op == "flip":
            sample[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            sample[at] = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif op == "insert":
            sample[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif len(sample) > 1:
            del sample[at]
    _exercise(bytes(sample))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 23),
            st.sampled_from([*sorted(EVENT_TYPES), 0x7FFFFFFF]),
            st.binary(max_size=200),
        ),
        max_size=6,
    )
)
def test_random_event_data_in_valid_frames(events: list[tuple[int, int, bytes]]) -> None:
    """Well-framed logs whose event data is random: every decoder meets garbage."""
    _exercise(_build.log(*(_build.event2(pcr, etype, data) for pcr, etype, data in events)))


def test_fuzz_target_runs_on_corpus_and_mutations() -> None:
    sys.path.insert(0, str(REPO / "fuzz"))
    try:
        import fuzz_eventlog
    finally:
        sys.path.remove(str(REPO / "fuzz"))
    for path in sorted((CORPUS / "eventlogs").glob("*.bin")):
        data = path.read_bytes()
        fuzz_eventlog.TestOneInput(data)
        fuzz_eventlog.TestOneInput(data[: len(data) // 2])
        fuzz_eventlog.TestOneInput(bytes(b ^ 0x55 for b in data[:200]))


@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX userland")
def test_atheris_fuzzes_for_a_few_seconds(tmp_path: Path) -> None:
    # libFuzzer writes new inputs into the FIRST corpus directory: give it a
    # scratch copy, never the shared corpus.
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for path in (CORPUS / "eventlogs").glob("*.bin"):
        shutil.copy(path, seeds / path.name)
    result = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "fuzz_eventlog.py"), str(seeds),
         "-max_total_time=3", "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Done" in result.stderr
