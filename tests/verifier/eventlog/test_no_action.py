"""EV_NO_ACTION records as other parsers accept them: no digests at all (quirk
``no-action-empty-digest-list``), non-zero digests (a warning); and what stays refused."""

from __future__ import annotations

import hashlib
import struct

import pytest

from tests.verifier.eventlog import _build
from verifier.eventlog import EventLog, EventType
from vtpm_core.errors import ParseError

pytestmark = pytest.mark.filterwarnings("error")

LOCALITY_3 = b"StartupLocality\x00\x03"
SP800_155 = b"SP800-155 Event\x00" + bytes(8)


def _bare(pcr: int, event_type: int, data: bytes) -> bytes:
    """A TCG_PCR_EVENT2 whose TPML_DIGEST_VALUES is empty (count 0)."""
    return struct.pack("<III", pcr, event_type, 0) + struct.pack("<I", len(data)) + data


def test_no_action_without_digests_is_read_and_never_extended() -> None:
    data = _build.log(
        _bare(0, EventType.EV_NO_ACTION, LOCALITY_3),
        _build.event2(0, EventType.EV_S_CRTM_VERSION, b"v"),
        _bare(0, EventType.EV_NO_ACTION, SP800_155),
    )
    log = EventLog.parse(data)
    assert log.to_bytes() == data
    assert log.startup_locality is not None and log.startup_locality.locality == 3
    assert log.events[1].digests == {} and log.events[3].digests == {}
    assert [(q.quirk_id, q.event_index) for q in log.quirks] == [
        ("no-action-empty-digest-list", 1),
        ("no-action-empty-digest-list", 3),
    ]
    for bank in ("sha1", "sha256"):
        size = hashlib.new(bank).digest_size
        start = bytes(size - 1) + b"\x03"
        want = hashlib.new(bank, start + hashlib.new(bank, b"v").digest()).digest()
        assert log.replay()[bank] == {0: want}
    replayed = log.verify(log.replay())
    assert (
        "quirk no-action-empty-digest-list applied to event 1: EV_NO_ACTION record at byte "
        f"{log.events[1].offset} lists no digests (digests.count 0); it is never extended"
    ) in replayed.warnings
    assert replayed.events[3].digests == {}


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        pytest.param(
            _bare(4, EventType.EV_SEPARATOR, bytes(4)),
            r"^TCG_PCR_EVENT2\.digests at byte \d+: event lacks the sha1, sha256 digest",
            id="fail/digests/extending-event-with-none",
        ),
        pytest.param(
            _build.event2(0, EventType.EV_NO_ACTION, SP800_155, banks=("sha256",)),
            r"^TCG_PCR_EVENT2\.digests at byte \d+: event lacks the sha1 digest",
            id="fail/digests/no-action-with-some-banks",
        ),
    ],
)
def test_missing_digests_are_refused_elsewhere(record: bytes, pattern: str) -> None:
    """A record listing some banks, or an extending record listing none, stays refused: it
    would be shown as replayed while no quoted bank proves it."""
    with pytest.raises(ParseError, match=pattern):
        EventLog.parse(_build.log(record))


def test_no_action_with_nonzero_digests_is_a_warning() -> None:
    """FAPI refuses such a log; tcglog-parser reports the digest. EV_NO_ACTION is never
    extended whatever its digests say: a warning, the replay unchanged."""
    data = _build.log(
        _build.event2(0, EventType.EV_NO_ACTION, SP800_155),  # digests H(data), not zeros
        _build.event2(0, EventType.EV_S_CRTM_VERSION, b"v"),
    )
    log = EventLog.parse(data)
    replayed = log.verify(log.replay())
    assert replayed.warnings == (
        "event 1 (EV_NO_ACTION, PCR 0): its digests are not all zero (PFP §10.4.1); "
        "EV_NO_ACTION is never extended, so they prove nothing",
    )
    assert (
        log.replay()["sha256"][0]
        == hashlib.sha256(bytes(32) + hashlib.sha256(b"v").digest()).digest()
    )


def test_zero_no_action_digests_warn_nothing() -> None:
    log = EventLog.parse(
        _build.log(_build.no_action(SP800_155), _build.event2(0, EventType.EV_S_CRTM_VERSION, b"v"))
    )
    assert log.verify(log.replay()).warnings == ()
