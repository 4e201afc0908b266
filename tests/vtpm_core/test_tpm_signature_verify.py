"""``Signature.verify`` refuses hashes it does not support, each with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtpm_core.errors import VerificationError
from vtpm_core.tpm import Public, Signature, TpmAlg

DATA = Path(__file__).resolve().parent.parent / "data" / "tpm"


@pytest.mark.parametrize(
    ("hash_alg", "message"),
    [
        pytest.param(TpmAlg.SHA3_256, r"unsupported hash SHA3_256$", id="fail/hash/sha3"),
        pytest.param(
            TpmAlg.SM3_256,
            r"unsupported hash: hash algorithm sm3_256 is not supported by cryptography$",
            id="fail/hash/sm3",
        ),
        pytest.param(
            TpmAlg.NULL,
            r"unsupported hash: NULL \(0x0010\) is not a hash algorithm$",
            id="fail/hash/null",
        ),
    ],
)
def test_unsupported_hash(hash_alg: TpmAlg, message: str) -> None:
    ak = Public.load((DATA / "swtpm_ak_rsa_rsapss.tpm2b_public").read_bytes())
    sig = Signature(TpmAlg.RSAPSS, hash_alg, b"\0" * 256, None, None, b"")
    with pytest.raises(VerificationError, match=message) as raised:
        sig.verify(ak, b"message", check="quote.signature")
    assert raised.value.check == "quote.signature"


@pytest.mark.parametrize("kind", ["rsa_rsapss", "ecc_ecdsa"])
def test_sample_quote_signature_verifies(kind: str) -> None:
    ak = Public.load((DATA / f"swtpm_ak_{kind}.tpm2b_public").read_bytes())
    sig = Signature.parse((DATA / f"swtpm_quote_{kind}.tpmt_signature").read_bytes())
    attest = (DATA / f"swtpm_quote_{kind}.tpms_attest").read_bytes()
    sig.verify(ak, attest)
    with pytest.raises(VerificationError, match="does not verify"):
        sig.verify(ak, attest[:-1] + bytes([attest[-1] ^ 1]))
