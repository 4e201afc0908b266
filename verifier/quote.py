"""Verify a TPM2_Quote: who signed it, that it is fresh, and which PCR values it proves.

TPM 2.0 Library Part 2 §10.12.8 TPMS_ATTEST (magic, type, qualifiedSigner,
extraData, clockInfo, firmwareVersion, attested), §10.12.1 TPMS_QUOTE_INFO
(pcrSelect, pcrDigest); Part 3 §18.4 TPM2_Quote (extraData is the caller's
qualifyingData; pcrDigest is the hash, with the signing scheme's hash, of the
selected PCR values concatenated in selection order).

The checks, in order; each failure is a VerificationError naming its check:

1. ``ak.attributes`` — the AK is fixedTPM, fixedParent, sensitiveDataOrigin,
   restricted, sign and not decrypt. A non-restricted signing key signs any
   bytes, including a forged TPMS_ATTEST (tpm2_checkquote 5.4 accepts such a
   forgery); a restricted key only signs structures the TPM made itself
   (Part 1 §25.4 "Restricted signing key"). Credential activation does not
   replace this check: it only proves the AK sits beside the EK.
2. ``quote.signature`` — over exactly the bytes received, never a
   re-encoding.
3. ``quote.magic`` — TPM_GENERATED_VALUE 0xFF544347: the TPM made it.
4. ``quote.type`` — TPM_ST_ATTEST_QUOTE 0x8018 (not a certify or time
   attestation signed by the same AK).
5. ``quote.nonce`` — extraData equals the verifier's nonce (constant time).
6. ``quote.pcr_select`` — the quote's own pcrSelect equals the selection of
   the PCR values supplied: comparing digests only would accept a PCR value
   shown under another index.
7. ``quote.pcr_digest`` — the digest of the supplied values, with the
   signature's hash, equals pcrDigest (constant time).

Not checked here: that the nonce is unused and unexpired (the caller's
nonce store), that clockInfo moved forward since the last quote, that the
AK belongs to a registered EK, or any policy on the PCR values.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vtpm_core.errors import ConfigError, VerificationError
from vtpm_core.tpm import (
    ST_ATTEST_QUOTE,
    TPM_GENERATED_VALUE,
    Attest,
    ClockInfo,
    ObjectAttributes,
    PcrSelection,
    PcrValues,
    Public,
    Signature,
)

__all__ = [
    "AK_REQUIRED_ATTRIBUTES",
    "QUOTE_CHECKS",
    "TPM_GENERATED_VALUE",
    "TPM_ST_ATTEST_QUOTE",
    # the vtpm_core.tpm types verify_quote takes, re-exported for callers
    "Attest",
    "ClockInfo",
    "PcrSelection",
    "PcrValues",
    "Public",
    "Signature",
    "VerifiedQuote",
    "check_ak_attributes",
    "verify_quote",
]

TPM_ST_ATTEST_QUOTE = ST_ATTEST_QUOTE
AK_REQUIRED_ATTRIBUTES = (
    ObjectAttributes.FIXED_TPM
    | ObjectAttributes.FIXED_PARENT
    | ObjectAttributes.SENSITIVE_DATA_ORIGIN
    | ObjectAttributes.RESTRICTED
    | ObjectAttributes.SIGN_ENCRYPT
)
QUOTE_CHECKS = (
    "ak.attributes",
    "quote.signature",
    "quote.magic",
    "quote.type",
    "quote.nonce",
    "quote.pcr_select",
    "quote.pcr_digest",
)
_NAMES = {
    ObjectAttributes.FIXED_TPM: "fixedTPM",
    ObjectAttributes.FIXED_PARENT: "fixedParent",
    ObjectAttributes.SENSITIVE_DATA_ORIGIN: "sensitiveDataOrigin",
    ObjectAttributes.RESTRICTED: "restricted",
    ObjectAttributes.SIGN_ENCRYPT: "sign",
}
# the same masks as plain ints (IntFlag arithmetic builds a flag object per operation);
# the flags are distinct bits, so the sum is their union
_REQUIRED = sum(int(flag) for flag in _NAMES)
_DECRYPT = int(ObjectAttributes.DECRYPT)

AkKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class VerifiedQuote:
    """A quote that passed checks 1-7: these PCR values were in the AK's TPM at ``clock_info``."""

    clock_info: ClockInfo
    firmware_version: int
    qualified_signer: bytes
    pcr_selection: PcrSelection
    pcrs: PcrValues
    attest: Attest
    ak_attributes_checked: bool


def check_ak_attributes(ak: Public) -> None:
    """Step 1: raise VerificationError("ak.attributes") unless ``ak`` is a proper AK."""
    attributes = int(ak.attributes)
    if attributes & _REQUIRED == _REQUIRED and not attributes & _DECRYPT:
        return  # the common case; the checks below say what is wrong
    missing = [name for flag, name in _NAMES.items() if not attributes & flag]
    if missing:
        raise VerificationError(
            "ak.attributes",
            f"AK lacks {', '.join(missing)} (attributes 0x{attributes:08x}):"
            " a non-restricted key can sign forged quotes",
        )
    if attributes & _DECRYPT:
        raise VerificationError(
            "ak.attributes", f"AK is also a decryption key (attributes 0x{attributes:08x})"
        )


def verify_quote(
    ak: Public | AkKey,
    attest_bytes: bytes,
    signature: Signature | bytes,
    pcrs: PcrValues,
    nonce: bytes,
    *,
    require_ak_attributes: bool = True,
) -> VerifiedQuote:
    """Run checks 1-7 above; return what the quote proves.

    ``ak`` is the AK's TPM public area; a bare public key (a cryptography key,
    or a ``Public`` loaded from PEM, ``from_pem=True``) is accepted only with
    ``require_ak_attributes=False``, for callers that
    established the AK's attributes elsewhere (at registration). Raises
    ParseError for malformed input, VerificationError for a failed check,
    ConfigError for an empty expected nonce.
    """
    if not nonce:
        raise ConfigError("an empty nonce proves no freshness; pass the nonce the verifier issued")
    # step 1
    if require_ak_attributes:
        if not isinstance(ak, Public) or ak.from_pem:
            raise VerificationError(
                "ak.attributes",
                "only a public key was given: the AK's TPM attributes are unknown"
                " (give its TPM2B_PUBLIC, or state that they were checked at registration)",
            )
        check_ak_attributes(ak)
    # step 2: over exactly the bytes received
    sig = signature if isinstance(signature, Signature) else Signature.parse(signature)
    sig.verify(ak, attest_bytes, check="quote.signature")
    # steps 3-4 on the raw bytes, before anything else is read from them
    magic = int.from_bytes(attest_bytes[:4], "big")
    if magic != TPM_GENERATED_VALUE:
        raise VerificationError(
            "quote.magic",
            f"magic 0x{magic:08x}, expected 0x{TPM_GENERATED_VALUE:08x} (not TPM-generated)",
        )
    kind = int.from_bytes(attest_bytes[4:6], "big")
    if kind != TPM_ST_ATTEST_QUOTE:
        raise VerificationError(
            "quote.type",
            f"type 0x{kind:04x}, expected 0x{TPM_ST_ATTEST_QUOTE:04x} (TPM_ST_ATTEST_QUOTE)",
        )
    attest = Attest.parse(attest_bytes)
    quote_info = attest.quote
    if quote_info is None:  # cannot happen after step 4; fail closed all the same
        raise VerificationError("quote.type", "attested is not a TPMS_QUOTE_INFO")
    # step 5
    if not hmac.compare_digest(attest.extra_data, nonce):
        detail = (
            f"got {len(attest.extra_data)} bytes, expected {len(nonce)}"
            if len(attest.extra_data) != len(nonce)
            else f"same length ({len(nonce)} bytes), different value"
        )
        raise VerificationError("quote.nonce", f"nonce mismatch ({detail})")
    # step 6
    quoted = quote_info.pcr_select
    if quoted.as_sets() != pcrs.as_sets():
        raise VerificationError(
            "quote.pcr_select",
            f"the quote selects {quoted}, the PCR values supplied are {pcrs.selection}",
        )
    # step 7
    expected = pcrs.digest(quoted, sig.hash_alg)
    if not hmac.compare_digest(expected, quote_info.pcr_digest):
        raise VerificationError(
            "quote.pcr_digest",
            f"{sig.hash_name} digest of the supplied PCR values {expected.hex()[:16]}…"
            f" differs from the quoted {quote_info.pcr_digest.hex()[:16]}…",
        )
    return VerifiedQuote(
        clock_info=attest.clock_info,
        firmware_version=attest.firmware_version,
        qualified_signer=attest.qualified_signer,
        pcr_selection=quoted,
        pcrs=pcrs,
        attest=attest,
        ak_attributes_checked=require_ak_attributes,
    )
