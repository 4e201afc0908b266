"""Only ParseError escapes the quote-side readers (TPMS_ATTEST, TPMT_SIGNATURE, PCR files)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vtpm_core.errors import ParseError
from vtpm_core.tpm import Attest, PcrValues, Signature

BASE = Path(__file__).resolve().parents[3] / "shared/corpus/quotes/swtpm_keylime_checkquote"
ATTEST = (BASE / "quote.tpms_attest.bin").read_bytes()
SIGNATURE = (BASE / "quote.tpmt_signature.bin").read_bytes()
PCRS = (BASE / "pcrs.tpm2tools_pcrs.bin").read_bytes()


def test_round_trip_of_real_structures() -> None:
    attest = Attest.parse(ATTEST)
    assert attest.raw == ATTEST and attest.magic == 0xFF544347 and attest.type == 0x8018
    sig = Signature.parse(SIGNATURE)
    assert sig.rsa_signature is not None
    assert (sig.scheme, sig.hash_name, len(sig.rsa_signature)) == ("rsassa", "sha256", 256)
    assert str(PcrValues.load(PCRS).selection) == "sha256:16"


def test_truncation_at_every_offset() -> None:
    for data, parse in ((ATTEST, Attest.parse), (SIGNATURE, Signature.parse)):
        for cut in range(len(data)):
            with contextlib.suppress(ParseError):
                parse(data[:cut])
                raise AssertionError(f"{parse.__qualname__} accepted {cut} of {len(data)} bytes")
        with contextlib.suppress(ParseError):
            parse(data + b"\x00")
            raise AssertionError("trailing byte accepted")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    for parse in (Attest.parse, Signature.parse, PcrValues.load):
        with contextlib.suppress(ParseError):
            parse(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(ATTEST) - 1), st.integers(0, 255))
def test_mutated_attest(position: int, value: int) -> None:
    data = bytearray(ATTEST)
    data[position] = value
    with contextlib.suppress(ParseError):
        Attest.parse(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(PCRS) - 1), st.integers(0, 255))
def test_mutated_pcr_file(position: int, value: int) -> None:
    data = bytearray(PCRS)
    data[position] = value
    with contextlib.suppress(ParseError):
        PcrValues.load(bytes(data))
