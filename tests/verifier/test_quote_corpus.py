"""The corpus quote a swtpm made in keylime's CI (corpus/quotes/swtpm_keylime_checkquote).

Its AK is only a PEM SubjectPublicKeyInfo: the TPM attributes of the key are
unknown, so verify_quote fails closed (ak.attributes) unless the caller says
they were established elsewhere (require_ak_attributes=False, e.g. checked
at registration from the AK's TPM2B_PUBLIC). The keylime test's tamperings
(byte 5 of the quote, the nonce's first character, byte 5 of the PCR blob)
must each fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from verifier.quote import verify_quote
from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import PcrValues, Signature

DIR = "quotes/swtpm_keylime_checkquote"


def _files(corpus: Path) -> dict[str, bytes]:
    base = corpus / DIR
    return {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}


def _key(files: dict[str, bytes]) -> object:
    return load_pem_public_key(files["ak_pub.pem"])


def test_keylime_quote_verifies_when_ak_attributes_are_established(corpus: Path) -> None:
    f = _files(corpus)
    meta = json.loads(f["quote.json"])["quote"]["parsed"]
    quote = verify_quote(
        _key(f),  # type: ignore[arg-type]
        f["quote.tpms_attest.bin"],
        f["quote.tpmt_signature.bin"],
        PcrValues.load(f["pcrs.tpm2tools_pcrs.bin"]),
        f["nonce.txt"].strip(),
        require_ak_attributes=False,
    )
    assert f"{quote.firmware_version:#018x}" == meta["firmwareVersion"]
    assert quote.qualified_signer.hex() == meta["qualifiedSigner"]
    assert quote.clock_info.clock == meta["clockInfo"]["clock"]
    assert quote.clock_info.reset_count == meta["clockInfo"]["resetCount"]
    assert str(quote.pcr_selection) == "sha256:16"
    # the JSON form of the same PCR values gives the same result
    json_pcrs = PcrValues.load(f["pcrs.json"])
    assert json_pcrs == quote.pcrs


def test_keylime_quote_with_a_bare_pem_fails_closed(corpus: Path) -> None:
    f = _files(corpus)
    with pytest.raises(VerificationError, match=r"^ak\.attributes: only a public key was given"):
        verify_quote(
            _key(f),  # type: ignore[arg-type]
            f["quote.tpms_attest.bin"],
            f["quote.tpmt_signature.bin"],
            PcrValues.load(f["pcrs.tpm2tools_pcrs.bin"]),
            f["nonce.txt"].strip(),
        )


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    ("what", "error", "match"),
    [
        pytest.param(
            "quote", VerificationError, r"^quote\.signature: ", id="fail/keylime/quote-byte-5"
        ),
        pytest.param(
            "nonce", VerificationError, r"^quote\.nonce: nonce mismatch", id="fail/keylime/nonce"
        ),
        pytest.param(
            "pcrs", ParseError, r"pcrSelections\[0\]\.hash", id="fail/keylime/pcr-blob-byte-5"
        ),
    ],
)
def test_keylime_tamperings(corpus: Path, what: str, error: type[Exception], match: str) -> None:
    f = _files(corpus)
    attest = f["quote.tpms_attest.bin"]
    nonce = f["nonce.txt"].strip()
    pcrs_blob = f["pcrs.tpm2tools_pcrs.bin"]
    if what == "quote":
        attest = _flip(attest, 5)
    elif what == "nonce":
        nonce = b"a" + nonce[1:]
    with pytest.raises(error, match=match):
        if what == "pcrs":
            pcrs_blob = _flip(pcrs_blob, 5)
        verify_quote(
            _key(f),  # type: ignore[arg-type]
            attest,
            Signature.parse(f["quote.tpmt_signature.bin"]),
            PcrValues.load(pcrs_blob),
            nonce,
            require_ak_attributes=False,
        )
