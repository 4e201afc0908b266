"""Only ParseError/VerificationError may escape the certificate and CRL parsers (Hypothesis)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verifier.ekcert import CertificateRevocationList, check_ek_profile, parse_certificate
from vtpm_core.errors import ParseError, VerificationError

SEED = (
    Path(__file__).resolve().parents[3] / "shared/corpus/ekcerts/stmicro/stm_ek_ecc_p256.der"
).read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_certificate(data)
    with contextlib.suppress(ParseError):
        CertificateRevocationList.parse(data)


def test_every_value_of_a_tag_byte_in_the_tpm_specification_attribute() -> None:
    # Hypothesis found byte 484 = 7 (a UTF8String's tag turned ObjectDescriptor):
    # asn1crypto then raised AttributeError out of check_ek_profile. Every value
    # of that byte, not just the one found, must give a result or a checked error.
    for value in range(256):
        _mutated_cert_is_handled(484, value)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(SEED) - 1), st.integers(0, 255))
def test_single_byte_mutations_of_a_real_cert(position: int, value: int) -> None:
    _mutated_cert_is_handled(position, value)


def _mutated_cert_is_handled(position: int, value: int) -> None:
    data = bytearray(SEED)
    data[position] = value
    try:
        cert = parse_certificate(bytes(data))
    except ParseError:
        return
    with contextlib.suppress(VerificationError):
        check_ek_profile(cert, exempt_eku_and_san=False)
