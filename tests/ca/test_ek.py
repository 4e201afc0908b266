"""CertifiableEk.load's template path (read_ek_tpm2b) gives what from_key gives for the key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.ek import CertifiableEk
from vtpm_core.errors import ParseError
from vtpm_core.tpm.algorithms import EccCurve
from vtpm_core.tpm.public import EccParameters
from vtpm_core.tpm.templates import EK_TEMPLATES

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_TEMPLATES = [
    t
    for t in EK_TEMPLATES.values()
    if isinstance(t.parameters, EccParameters) and t.parameters.curve == EccCurve.NIST_P256
]


def _tpm2b(prefix: bytes, x: bytes, y: bytes) -> bytes:
    area = prefix + len(x).to_bytes(2, "big") + x + len(y).to_bytes(2, "big") + y
    return len(area).to_bytes(2, "big") + area


def test_there_are_p256_templates() -> None:
    assert {t.id for t in P256_TEMPLATES} >= {"L-2"}


@settings(max_examples=60, deadline=None)
@given(
    scalar=st.integers(min_value=1, max_value=P256_ORDER - 1),
    index=st.integers(min_value=0),
    strip=st.booleans(),
)
def test_template_path_equals_from_key(scalar: int, index: int, strip: bool) -> None:
    """The template path and from_key agree on every field, for 32-byte
    coordinates and for coordinates sent without their leading zero bytes."""
    template = P256_TEMPLATES[index % len(P256_TEMPLATES)]
    key = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    numbers = key.public_numbers()
    x, y = numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")
    if strip:
        x, y = x.lstrip(b"\x00") or b"\x00", y.lstrip(b"\x00") or b"\x00"
    data = _tpm2b(template.wire_prefix, x, y)
    ek = CertifiableEk.load(data, allow_bare_key=False)
    reference = CertifiableEk.from_key(key, template=template.id, name=ek.name, raw=data)
    assert ek.spki_der == reference.spki_der
    assert (ek.spki_sha256, ek.key_type, ek.template) == (
        reference.spki_sha256,
        reference.key_type,
        reference.template,
    )
    assert ek.public_key.public_numbers() == numbers


def test_leading_zero_coordinate_takes_the_general_path() -> None:
    """A coordinate with a leading zero byte, sent stripped, still gives the 32-byte SPKI."""
    scalar = 1
    while True:
        key = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
        if key.public_numbers().x < 1 << 248:
            break
        scalar += 1
    numbers = key.public_numbers()
    data = _tpm2b(
        P256_TEMPLATES[0].wire_prefix,
        numbers.x.to_bytes(31, "big"),
        numbers.y.to_bytes(32, "big"),
    )
    ek = CertifiableEk.load(data, allow_bare_key=False)
    assert ek.spki_der == key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_point_off_the_curve_is_still_refused() -> None:
    numbers = ec.derive_private_key(7, ec.SECP256R1()).public_key().public_numbers()
    y = (numbers.y ^ 1).to_bytes(32, "big")
    data = _tpm2b(P256_TEMPLATES[0].wire_prefix, numbers.x.to_bytes(32, "big"), y)
    with pytest.raises(ParseError, match="not a point on the curve"):
        CertifiableEk.load(data, allow_bare_key=False)
