"""The service's interim TPMS_ATTEST / TPMT_SIGNATURE readers: real quotes round-trip,
truncation and trailing bytes fail with offsets, and only ParseError escapes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verifier.attester import TpmAttester
from verifier.service._wire import QuoteAttest, QuoteSignature
from vtpm_core.errors import ParseError
from vtpm_core.swtpm import SwtpmProcess


@pytest.fixture(scope="module")
def quote(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    with (
        SwtpmProcess(tmp_path_factory.mktemp("wire") / "state") as tpm,
        TpmAttester.open(tpm.endpoint.tcti) as att,
    ):
        q = att.quote(b"\x42" * 32, {"sha256": [0, 1, 7]})
    return q.attest, q.signature


@pytest.mark.swtpm
def test_real_quote_parses(quote: tuple[bytes, bytes]) -> None:
    attest = QuoteAttest.parse(quote[0])
    assert attest.magic == 0xFF544347 and attest.type == 0x8018
    assert attest.extra_data == b"\x42" * 32
    assert attest.pcr_select == ((0x000B, bytes([0b10000011, 0, 0])),)
    assert len(attest.pcr_digest) == 32
    sig = QuoteSignature.parse(quote[1])
    assert sig.sig_alg == 0x0014 and sig.hash_alg == 0x000B and len(sig.signature) == 256


@pytest.mark.swtpm
@pytest.mark.parametrize(
    ("which", "cut", "pattern"),
    [
        pytest.param(
            0,
            -1,
            r"TPMS_ATTEST\.attested\.quote\.pcrDigest at byte \d+: needs",
            id="fail/attest/truncated",
        ),
        pytest.param(0, 1, r"TPMS_ATTEST\.end at byte \d+: 1 trailing", id="fail/attest/trailing"),
        pytest.param(
            1,
            -3,
            r"TPMT_SIGNATURE\.signature\.sig at byte 6: needs 256 bytes, 253 left",
            id="fail/signature/truncated",
        ),
        pytest.param(
            1, 2, r"TPMT_SIGNATURE\.end at byte \d+: 2 trailing", id="fail/signature/trailing"
        ),
    ],
)
def test_bad_lengths(quote: tuple[bytes, bytes], which: int, cut: int, pattern: str) -> None:
    data = quote[which]
    data = data[:cut] if cut < 0 else data + b"\x00" * cut
    parser = QuoteAttest.parse if which == 0 else QuoteSignature.parse
    with pytest.raises(ParseError, match=pattern):
        parser(data)


@given(st.binary(max_size=400))
def test_only_parse_errors_escape(data: bytes) -> None:
    for parser in (QuoteAttest.parse, QuoteSignature.parse):
        with contextlib.suppress(ParseError):
            parser(data)


def test_hostile_bank_count() -> None:
    data = bytes.fromhex("ff5443478018") + b"\x00\x00" * 2 + b"\x00" * 25 + b"\xff\xff\xff\xff"
    with pytest.raises(ParseError, match="at most 16"):
        QuoteAttest.parse(data)
