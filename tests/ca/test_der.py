"""ca/der.py's OBJECT IDENTIFIER and INTEGER codecs give asn1crypto's bytes (the CA
encodes with them so that an issuance does not import asn1crypto)."""

from __future__ import annotations

import pytest
from asn1crypto import core
from hypothesis import given
from hypothesis import strategies as st

from ca.der import decode_oid, encode_integer, encode_oid
from vtpm_core.vm_identity import VM_IDENTITY_OID, VM_IDENTITY_OID_X667

_ARC = st.integers(min_value=0, max_value=1 << 130)


@given(
    first=st.integers(min_value=0, max_value=2),
    second=st.integers(min_value=0, max_value=1 << 70),
    rest=st.lists(_ARC, max_size=12),
)
def test_oids_encode_and_decode_as_asn1crypto_does(
    first: int, second: int, rest: list[int]
) -> None:
    if first < 2:
        second %= 40
    dotted = ".".join(map(str, (first, second, *rest)))
    der = bytes(core.ObjectIdentifier(dotted).dump())
    assert encode_oid(dotted) == der
    assert decode_oid(der) == dotted


@pytest.mark.parametrize(
    "dotted",
    ["1.2.840.113549.1.1.1", "2.5.29.14", "2.23.133.2.16", VM_IDENTITY_OID, VM_IDENTITY_OID_X667],
)
def test_the_oids_the_ca_uses(dotted: str) -> None:
    assert encode_oid(dotted) == bytes(core.ObjectIdentifier(dotted).dump())


@pytest.mark.parametrize("bad", ["1", "3.1", "1.40", "1.-2", ""])
def test_a_malformed_oid_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not an OID"):
        encode_oid(bad)


@pytest.mark.parametrize(
    "der", [b"\x02\x01\x00", b"\x06\x00", b"\x06\x01\x81", b"\x06\x01\x2a\x00"]
)
def test_a_non_oid_is_refused(der: bytes) -> None:
    with pytest.raises(ValueError, match="not a DER OBJECT IDENTIFIER"):
        decode_oid(der)


@given(st.integers(min_value=-(1 << 200), max_value=1 << 200))
def test_integers_encode_as_asn1crypto_does(value: int) -> None:
    assert encode_integer(value) == core.Integer(value).dump()
