"""Variable events whose data goes on after UEFI_VARIABLE_DATA (tcglog-parser's
"trailing bytes"): quirk ``variable-data-trailing-bytes``, on both check paths."""

from __future__ import annotations

import struct

import pytest

from tests.verifier.eventlog import _build
from verifier.eventlog import EfiVariable, EventLog, EventType

pytestmark = pytest.mark.filterwarnings("error")

TRAILING = b"\x00\xaf\x00"


def _variable(name: str, value: bytes, trailing: bytes = b"") -> bytes:
    encoded = name.encode("utf-16-le")
    return b"\x61" * 16 + struct.pack("<QQ", len(name), len(value)) + encoded + value + trailing


@pytest.mark.parametrize("banks", [("sha256",), ("sha1", "sha256")], ids=["one-bank", "two"])
@pytest.mark.parametrize(
    ("event_type", "name", "value", "digest_of", "covers"),
    [
        pytest.param(
            EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
            "SecureBoot",
            b"\x01",
            None,
            "all of the event data",
            id="driver-config-whole",
        ),
        pytest.param(
            EventType.EV_EFI_VARIABLE_BOOT,
            "BootOrder",
            b"\x01\x00\x02\x00",
            b"\x01\x00\x02\x00",
            "VariableData only (the variable's name and GUID are not proven)",
            id="boot-variable-data",
        ),
    ],
)
def test_variable_with_trailing_bytes_is_a_reported_quirk(
    banks: tuple[str, ...],
    event_type: int,
    name: str,
    value: bytes,
    digest_of: bytes | None,
    covers: str,
) -> None:
    data = _variable(name, value, TRAILING)
    log = EventLog.parse(
        _build.log(
            _build.event2(7, event_type, data, banks=banks, digest_of=digest_of), banks=banks
        )
    )
    replayed = log.verify(log.replay())
    event = replayed.events[1]
    assert event.data_verified is True and event.digest_covers == covers
    assert [q.quirk_id for q in event.quirks] == ["variable-data-trailing-bytes"]
    assert isinstance(event.decoded, EfiVariable) and event.decoded.trailing == TRAILING
    assert event.decoded.data == value
    assert replayed.warnings == (
        "quirk variable-data-trailing-bytes applied to 1 event(s): events 1",
    )


@pytest.mark.parametrize("banks", [("sha256",), ("sha1", "sha256")], ids=["one-bank", "two"])
def test_variable_without_trailing_bytes_needs_no_quirk(banks: tuple[str, ...]) -> None:
    data = _variable("SecureBoot", b"\x01")
    log = EventLog.parse(
        _build.log(
            _build.event2(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, data, banks=banks),
            banks=banks,
        )
    )
    replayed = log.verify(log.replay())
    assert replayed.events[1].quirks == () and replayed.warnings == ()
