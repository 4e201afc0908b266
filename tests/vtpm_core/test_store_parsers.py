"""vtpm.json and backup-file parsers: round trip, truncation, and only our errors escape."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtpm_core.backup import MAGIC, Backup
from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.record import EkRecord, KeyRef, Origin, TpmInfo, VtpmRecord

RECORD = VtpmRecord(
    name="vm1",
    vtpm_id=uuid.UUID(int=1),
    vm_id=uuid.UUID(int=2),
    created_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    key=KeyRef("local", "kek-00", b"\x01" * 61),
    tpm=TpmInfo(0x49424D00, "SW   TPM", 0x2019_1023_0016_3636, "2.0", 0, 164),
    eks=(EkRecord("ecc-p256", "L-2", 0x01C0000A, b"\x00\x02ab", b"\x30\x00", 0xABC, b""),),
    origin=Origin("clone-copy", "src", uuid.UUID(int=3), uuid.UUID(int=4)),
    bound_serials=(0xABC,),
)


def _backup_bytes(body: bytes) -> bytes:
    signed = MAGIC + struct.pack(">I", len(body)) + body
    return signed + hashlib.sha256(signed).digest() + b"\0" * 32


def test_record_round_trip() -> None:
    again = VtpmRecord.parse(RECORD.to_json())
    assert again == RECORD and again.to_json() == RECORD.to_json()


def test_backup_round_trip() -> None:
    data = Backup.build(RECORD, {"tpm2-00.permall": b"state"}, b"k" * 32)
    parsed = Backup.parse(data)
    assert parsed.record == RECORD and dict(parsed.state) == {"tpm2-00.permall": b"state"}
    parsed.verify_mac(b"k" * 32)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        pytest.param("format", "vtpm-trust/vtpm/9", "format", id="fail/record/format"),
        pytest.param("name", "../x", "invalid vTPM name", id="fail/record/name"),
        pytest.param("vtpm_id", "nope", "not a UUID", id="fail/record/uuid"),
        pytest.param("created_at", "yesterday", "YYYY-MM-DD", id="fail/record/time"),
        pytest.param("eks", {}, "expected a list", id="fail/record/eks-type"),
        pytest.param("ek_cert_mode", "maybe", "unknown mode", id="fail/record/mode"),
        pytest.param("bound_serials", ["XYZ"], "lower-case hex", id="fail/record/serial"),
    ],
)
def test_record_field_errors(field: str, value: object, match: str) -> None:
    doc = RECORD.to_dict()
    doc[field] = value
    with pytest.raises(ParseError, match=match):
        VtpmRecord.parse(json.dumps(doc).encode())


def test_backup_truncated_everywhere() -> None:
    data = Backup.build(RECORD, {"tpm2-00.permall": b"state"}, b"k" * 32)
    for n in range(len(data)):
        with pytest.raises(ParseError):
            Backup.parse(data[:n])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_record_parser_only_raises_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        VtpmRecord.parse(data)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        max_leaves=12,
    )
)
def test_backup_parser_only_raises_our_errors(doc: object) -> None:
    body = json.dumps({"format": "vtpm-trust/backup/1", "record": doc, "state": doc}).encode()
    for data in (_backup_bytes(body), _backup_bytes(json.dumps(doc).encode())):
        with contextlib.suppress(ParseError, VerificationError):
            Backup.parse(data)
