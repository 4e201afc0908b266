"""Framing (issue 5, round 2): the appraisal path walks the lengths of variables,
images, firmware blobs, tags and GPT events instead of decoding them, and decodes
them when a rule reads them. That is safe only if a frame is found exactly when
the decoder succeeds (else a decode problem would go unreported, or a good event
be reported), and if the frame names the bytes the decoder calls VariableData.

Each test compares a framing function with its decoder on every corpus event of
its types, on every truncation of them, on bytes flipped in their headers, with
small device-path node limits, and on random data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.verifier.eventlog import _build
from verifier.eventlog import DevicePath, EfiVariable, Event, EventLog, EventType, Limits
from verifier.eventlog.decode import _FRAMES, LazyDecode, decode_event
from verifier.eventlog.devicepath import device_path_ok
from verifier.eventlog.efivars import variable_name
from vtpm_core.errors import ParseError

T = EventType


def _framed_events(eventlogs: Path) -> list[tuple[Event, int]]:
    out = []
    for path in sorted(eventlogs.glob("*.bin")):
        try:
            log = EventLog.parse(path.read_bytes())
        except ParseError:
            continue
        uintn = log.spec_id.uintn_size if log.spec_id is not None else 2
        out.extend((e, uintn) for e in log.events if e.event_type in _FRAMES)
    return out


def _with_data(event: Event, data: bytes) -> Event:
    return Event(event.index, event.offset, event.pcr, event.event_type, {}, data, data)


def _mutations(data: bytes) -> Iterator[bytes]:
    """Every truncation (all of them for short data, else the first and last 200), a
    byte appended, and every byte of the first 64 and the last 8 set to 0x00, 0x01,
    0x7F and 0xFF (lengths, counts and device path headers live there)."""
    n = len(data)
    cuts = range(n) if n <= 400 else [*range(200), *range(n - 200, n)]
    for cut in cuts:
        yield data[:cut]
    yield data + b"\x00"
    for i in [*range(min(n, 64)), *range(max(64, n - 8), n)]:
        for b in (0x00, 0x01, 0x7F, 0xFF):
            if data[i] != b:
                yield data[:i] + bytes([b]) + data[i + 1 :]


def _agree(event: Event, uintn: int, max_nodes: int) -> None:
    """The frame exists exactly when decode_event returns; a variable's frame is its
    VariableData and its trailing bytes; a lazy decode gives decode_event's value."""
    limits = Limits(max_device_path_nodes=max_nodes)
    frame = _FRAMES[event.event_type](event.untrusted_data, uintn, max_nodes)
    try:
        decoded = decode_event(event, uintn_size=uintn, limits=limits)
    except ParseError:
        assert frame is None, f"type {event.event_type:#x}: framed, but does not decode"
        return
    assert frame is not None, f"type {event.event_type:#x}: decodes, but not framed"
    data = event.untrusted_data
    if isinstance(decoded, EfiVariable):
        start, end = frame
        assert data[start:end] == decoded.data
        assert data[end:] == decoded.trailing
        assert variable_name(data) == decoded.name
    lazy = LazyDecode(event.data_offset, uintn, limits)
    assert lazy.decode(event.event_type, data) == decoded


def test_framing_agrees_with_the_decoders_on_the_corpus(eventlogs: Path) -> None:
    events = _framed_events(eventlogs)
    assert {e.event_type for e, _ in events} >= {
        T.EV_EFI_VARIABLE_DRIVER_CONFIG,
        T.EV_EFI_VARIABLE_BOOT,
        T.EV_EFI_VARIABLE_AUTHORITY,
        T.EV_EFI_BOOT_SERVICES_APPLICATION,
        T.EV_EFI_PLATFORM_FIRMWARE_BLOB,
        T.EV_EFI_GPT_EVENT,
    }
    for event, uintn in events:
        for max_nodes in (256, 1, 2, 3):
            _agree(event, uintn, max_nodes)


def test_framing_agrees_with_the_decoders_on_mutated_corpus_events(eventlogs: Path) -> None:
    seen: set[tuple[int, bytes]] = set()
    for event, uintn in _framed_events(eventlogs):
        key = (event.event_type, event.untrusted_data[:64])
        if key in seen:
            continue  # (the same variable or image in another log)
        seen.add(key)
        for data in _mutations(event.untrusted_data):
            mutated = _with_data(event, data)
            _agree(mutated, uintn, 256)
            _agree(mutated, uintn, 2)


def _variable(name: str, value: bytes, trailing: bytes = b"") -> bytes:
    encoded = name.encode("utf-16-le")
    return b"\x61" * 16 + struct.pack("<QQ", len(name), len(value)) + encoded + value + trailing


def _load_option(path: bytes, description: str = "Fedora") -> bytes:
    desc = description.encode("utf-16-le") + b"\x00\x00"
    return struct.pack("<IH", 1, len(path)) + desc + path + b"optional"


_FILE_NODE = struct.pack("<BBH", 4, 4, 4 + 8) + "\\A\x00".encode("utf-16-le") + b"\x00\x00"
_END_NODE = struct.pack("<BBH", 0x7F, 0xFF, 4)
_SIGNATURE_LIST = b"\x26\x16\xc4\xc1" * 4 + struct.pack("<III", 28 + 48 * 2, 0, 48) + b"\x07" * 96


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        (T.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable("SecureBoot", b"\x01")),
        (T.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable("SecureBoot", b"\x01\x00")),
        (T.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable("db", _SIGNATURE_LIST * 2)),
        (T.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable("dbx", _SIGNATURE_LIST + b"\x00")),
        (T.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable("PK", b"")),
        (T.EV_EFI_VARIABLE_BOOT, _variable("BootOrder", b"\x01\x00\x02")),
        (T.EV_EFI_VARIABLE_BOOT, _variable("BootOrder", b"\x01\x00")),
        (T.EV_EFI_VARIABLE_BOOT, _variable("Boot0001", _load_option(_FILE_NODE + _END_NODE))),
        (T.EV_EFI_VARIABLE_BOOT, _variable("Boot000G", _load_option(b"\x00"))),
        (T.EV_EFI_VARIABLE_BOOT, _variable("Driver0A0b", _load_option(_FILE_NODE * 3))),
        (T.EV_EFI_VARIABLE_BOOT2, _variable("SysPrep0000", b"\x00" * 7)),
        (T.EV_EFI_VARIABLE_AUTHORITY, _variable("db", b"\x30\x82", b"\x00")),
        (T.EV_EFI_BOOT_SERVICES_DRIVER, struct.pack("<QQQQ", 1, 2, 3, 0)),
        (T.EV_EFI_BOOT_SERVICES_DRIVER, struct.pack("<QQQQ", 1, 2, 3, 16) + _FILE_NODE * 2),
        (T.EV_EFI_RUNTIME_SERVICES_DRIVER, struct.pack("<QQQQ", 1, 2, 3, 12) + _FILE_NODE),
        (T.EV_EFI_PLATFORM_FIRMWARE_BLOB2, b"\x03abc" + struct.pack("<QQ", 1, 2)),
        (T.EV_EFI_PLATFORM_FIRMWARE_BLOB2, b"\x03abc" + struct.pack("<QQ", 1, 2) + b"\x00"),
        (T.EV_EVENT_TAG, struct.pack("<II", 0x8F3B22EC, 3) + b"abc"),
        (T.EV_EVENT_TAG, struct.pack("<II", 0x8F3B22EC, 3) + b"abcd"),
    ],
)
def test_framing_agrees_with_the_decoders_on_built_data(event_type: int, data: bytes) -> None:
    base = Event(1, 100, 7, event_type, {}, data, data)
    for uintn in (2, 1):
        for max_nodes in (256, 1, 2, 3):
            _agree(base, uintn, max_nodes)
        for mutated in _mutations(data):
            _agree(_with_data(base, mutated), uintn, 256)


@settings(max_examples=300)
@given(
    st.sampled_from(sorted(_FRAMES)),
    st.sampled_from(["SecureBoot", "db", "BootOrder", "Boot0001", "Other", "KEK"]),
    st.binary(max_size=120),
)
def test_framing_agrees_with_the_decoders_on_random_data(
    event_type: int, name: str, body: bytes
) -> None:
    for data in (body, _variable(name, body), _variable(name, body[:-3], body[-3:])):
        _agree(Event(1, 100, 7, event_type, {}, data, data), 2, 4)


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=4))
def test_device_path_ok_is_whether_it_parses(data: bytes, max_nodes: int) -> None:
    try:
        DevicePath.parse(data, max_nodes=max_nodes)
    except ParseError:
        assert not device_path_ok(data, max_nodes)
    else:
        assert device_path_ok(data, max_nodes)


def test_a_framed_event_that_would_not_decode_reports_why_and_the_rest_decode_on_read() -> None:
    """Through verify(): a variable whose signature list is cut short, a BootOrder of
    odd length and an image whose device path has too many nodes each report their
    decode problem first; the good ones decode when read, to what decode_event says."""
    many_nodes = _FILE_NODE * 300 + _END_NODE
    raw = _build.log(
        _build.event2(7, T.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable("db", _SIGNATURE_LIST[:-1])),
        _build.event2(
            1,
            T.EV_EFI_VARIABLE_BOOT,
            _variable("BootOrder", b"\x01\x00\x02"),
            digest_of=b"\x01\x00\x02",  # PFP: VariableData only
        ),
        _build.event2(
            4,
            T.EV_EFI_BOOT_SERVICES_APPLICATION,
            struct.pack("<QQQQ", 1, 2, 3, len(many_nodes)) + many_nodes,
        ),
        _build.event2(7, T.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable("db", _SIGNATURE_LIST)),
        _build.event2(
            4,
            T.EV_EFI_BOOT_SERVICES_APPLICATION,
            struct.pack("<QQQQ", 1, 2, 3, 12) + _FILE_NODE,
        ),
    )
    log = EventLog.parse(raw)
    replayed = log.verify(log.replay())
    bad_db, bad_order, bad_image, good_db, good_image = replayed.events[1:]
    for e, where in (
        (bad_db, "EFI_SIGNATURE_LIST.SignatureListSize"),
        (bad_order, "UEFI_VARIABLE_DATA.VariableData"),
        (bad_image, "EFI_DEVICE_PATH_PROTOCOL.Type"),
    ):
        assert e.untrusted_decoded is None
        assert e.problems[0].startswith(f"event data does not decode: {where} at byte ")
        assert e.problems[0] in replayed.warnings
    assert bad_db.data_verified is True  # (its digest is of the whole data)
    assert bad_order.data_verified is False  # VariableData cannot be found: nothing proven
    for e, event in ((good_db, log.events[4]), (good_image, log.events[5])):
        assert e.problems == ()
        assert e.untrusted_decoded == decode_event(event) is not None
