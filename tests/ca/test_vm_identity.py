"""The VM identity extension (vtpm_core.vm_identity): hand-written DER encoder cross-checked
with asn1crypto, parse errors only, and that OpenSSL and Go-style 31-bit OID readers cope."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid

import pytest
from asn1crypto import core
from hypothesis import given
from hypothesis import strategies as st

from vtpm_core.errors import ParseError
from vtpm_core.vm_identity import VM_IDENTITY_OID, VM_IDENTITY_OID_X667, VmIdentity

T = dt.datetime(2026, 11, 26, 22, 0, 5, tzinfo=dt.UTC)


def test_round_trip() -> None:
    vm = uuid.UUID("6f1c2d4e-8a9b-4c3d-9e0f-112233445566")
    value = VmIdentity.build(vm, "web-01 ü", "vtpm-7", T.replace(microsecond=123))
    parsed = VmIdentity.parse(value.to_bytes())
    assert parsed == value
    assert (parsed.vm_id, parsed.vm_name, parsed.created_at) == (vm, "web-01 ü", T)
    seq = core.Sequence.load(value.raw)
    assert [type(core.Asn1Value.load(seq[i].dump())).__name__ for i in range(4)] == [
        "UTF8String",
        "UTF8String",
        "UTF8String",
        "GeneralizedTime",
    ]


def test_oid_arcs_fit_31_bits() -> None:
    """Go's cryptobyte and pkilint's decoder reject arcs >= 2^31; the 2.25 form has one."""
    assert all(int(arc) < 2**31 for arc in VM_IDENTITY_OID.split("."))
    assert any(int(arc) >= 2**31 for arc in VM_IDENTITY_OID_X667.split("."))


@pytest.mark.parametrize(
    ("case", "data", "match"),
    [
        ("fail/vmid/empty", b"", "VmIdentity.der at byte 0"),
        ("fail/vmid/truncated", VmIdentity.build(uuid.uuid4(), "a", "b", T).raw[:-3], "VmIdentity"),
        (
            "fail/vmid/trailing",
            VmIdentity.build(uuid.uuid4(), "a", "b", T).raw + b"\x00",
            "VmIdentity",
        ),
        (
            "fail/vmid/not-uuid",
            b"0\x1a\x0c\x03abc\x0c\x00\x0c\x00\x18\x0f20261126220005Z",
            "VmIdentity.vmId",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("fail/") else "",
)
def test_parse_errors(case: str, data: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        VmIdentity.parse(data)


@given(st.binary(max_size=200))
def test_only_parse_errors_escape(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        VmIdentity.parse(data)


@given(st.uuids(), st.text(max_size=300), st.text(max_size=50))
def test_encoder_agrees_with_asn1crypto(vm: uuid.UUID, name: str, instance: str) -> None:
    value = VmIdentity.build(vm, name, instance, T)
    assert VmIdentity.parse(value.raw) == value
