"""The one adapter to tpm2-pytss marshalling; no tpm2-pytss object leaves it.

Our parsers frame every field themselves (so errors carry field and offset);
``check`` then has tpm2-tss's libtss2-mu unmarshal the same bytes and requires
it to consume exactly the bytes we consumed and to marshal them back
unchanged. ``marshal_public`` builds TPMT_PUBLIC wire bytes (EK templates)
with tpm2-tss's marshaller.
"""

from __future__ import annotations

from typing import Any

from vtpm_core.errors import ParseError

__all__ = ["check", "marshal_public"]


def _types() -> dict[str, Any]:
    from tpm2_pytss import types

    return {
        "TPMT_PUBLIC": types.TPMT_PUBLIC,
        "TPMS_ATTEST": types.TPMS_ATTEST,
        "TPMT_SIGNATURE": types.TPMT_SIGNATURE,
        "TPML_PCR_SELECTION": types.TPML_PCR_SELECTION,
    }


def check(structure: str, data: bytes) -> None:
    """Raise ParseError unless tpm2-tss reads ``data`` as exactly one ``structure``."""
    cls = _types()[structure]
    try:
        value, used = cls.unmarshal(bytes(data))
        again = bytes(value.marshal())
    except Exception as exc:  # TSS2_Exception, cffi errors: never let them escape
        raise ParseError(structure, "tpm2-tss", 0, f"libtss2-mu rejects it: {exc}") from None
    if used != len(data):
        raise ParseError(
            structure, "tpm2-tss", used, f"libtss2-mu read {used} of {len(data)} bytes"
        )
    if again != bytes(data):
        raise ParseError(structure, "tpm2-tss", 0, "libtss2-mu does not re-encode it identically")


def marshal_public(
    *,
    key_type: int,
    name_alg: int,
    attributes: int,
    auth_policy: bytes,
    sym_alg: int,
    sym_bits: int,
    sym_mode: int,
    key_bits: int = 0,
    exponent: int = 0,
    curve: int = 0,
    unique_size: int = 0,
) -> bytes:
    """TPMT_PUBLIC wire bytes of an RSA (``key_bits``) or ECC (``curve``) storage/EK key.

    Scheme (and for ECC the KDF) are TPM_ALG_NULL; unique is ``unique_size``
    zero bytes (the modulus for RSA, each of x and y for ECC).
    """
    from tpm2_pytss import constants as c
    from tpm2_pytss import types as t

    pub = t.TPMT_PUBLIC()
    pub.type = key_type
    pub.nameAlg = name_alg
    pub.objectAttributes = attributes
    pub.authPolicy = t.TPM2B_DIGEST(auth_policy)
    if key_type == c.TPM2_ALG.RSA:
        d = pub.parameters.rsaDetail
        d.scheme.scheme = c.TPM2_ALG.NULL
        d.keyBits = key_bits
        d.exponent = exponent
        pub.unique.rsa = t.TPM2B_PUBLIC_KEY_RSA(b"\0" * unique_size)
    else:
        d = pub.parameters.eccDetail
        d.scheme.scheme = c.TPM2_ALG.NULL
        d.curveID = curve
        d.kdf.scheme = c.TPM2_ALG.NULL
        pub.unique.ecc.x = t.TPM2B_ECC_PARAMETER(b"\0" * unique_size)
        pub.unique.ecc.y = t.TPM2B_ECC_PARAMETER(b"\0" * unique_size)
    d.symmetric.algorithm = sym_alg
    d.symmetric.keyBits.aes = sym_bits
    d.symmetric.mode.aes = sym_mode
    return bytes(pub.marshal())
