"""MakeCredential in software: challenge an attester to prove its AK sits beside its EK.

TPM 2.0 Library Part 1 §24 "Credential Protection" (with §11.4.9.2 KDFa,
§11.4.10.3 KDFe); Part 3 §12.6 TPM2_MakeCredential, §12.5
TPM2_ActivateCredential. The verifier:

1. draws a seed and protects it to the EK: RSA-OAEP with label "IDENTITY\\0"
   and the EK's nameAlg (§B.10.3), or ECDH with an ephemeral key and KDFe
   (§C.6.4) for an ECC EK;
2. derives symKey = KDFa(nameAlg, seed, "STORAGE", akName) and encrypts the
   TPM2B_DIGEST credential with the EK's symmetric definition (AES-CFB,
   zero IV);
3. computes outerHMAC = HMAC(KDFa(nameAlg, seed, "INTEGRITY"),
   encIdentity || akName).

Only a TPM holding the EK's private key AND an object named ``ak_name`` can
recover the secret with TPM2_ActivateCredential. This proves co-residence,
not that the AK is restricted: check the AK's attributes separately
(TPM-NOTES "Quotes and keys").

The arithmetic is tpm2-pytss's ``utils.make_credential`` (checked here for
RSA and ECC EKs against swtpm's TPM2_ActivateCredential and
tpm2_activatecredential); this module is its one adapter: pytss objects do
not leave it. Randomness (seed, OAEP padding, the ECDH ephemeral key) comes
from the OS CSPRNG inside pytss/OpenSSL and cannot be injected; the caller
chooses the ``secret``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import Public

__all__ = ["TOOLS_MAGIC", "Credential", "make_credential"]

TOOLS_MAGIC = 0xBADCC0DE
_TOOLS_VERSION = 1
_DIGEST_SIZES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64, 0x0012: 32}
# TPMA_OBJECT bits (Part 2 §8.3)
_RESTRICTED = 0x00010000
_DECRYPT = 0x00020000
_SIGN = 0x00040000


@dataclass(frozen=True, slots=True)
class Credential:
    """The two outputs of MakeCredential, as TPM2B contents (without size prefix)."""

    credential_blob: bytes  # TPM2B_ID_OBJECT.credential: TPM2B outerHMAC || encIdentity
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET.secret: OAEP ciphertext or TPMS_ECC_POINT

    @property
    def blob(self) -> bytes:
        return self.credential_blob

    def to_tpm2_tools(self) -> bytes:
        """The file ``tpm2_makecredential -o`` writes and ``tpm2_activatecredential -i`` reads."""
        return (
            struct.pack(">II", TOOLS_MAGIC, _TOOLS_VERSION)
            + struct.pack(">H", len(self.credential_blob))
            + self.credential_blob
            + struct.pack(">H", len(self.encrypted_secret))
            + self.encrypted_secret
        )

    @classmethod
    def from_tpm2_tools(cls, data: bytes) -> Credential:
        """Parse a ``tpm2_makecredential`` output file."""
        if len(data) < 10:
            raise ParseError(
                "tpm2_tools_credential", "header", 0, f"{len(data)} bytes is too short"
            )
        magic, version = struct.unpack_from(">II", data, 0)
        if magic != TOOLS_MAGIC:
            raise ParseError(
                "tpm2_tools_credential", "magic", 0, f"0x{magic:08X}, expected 0xBADCC0DE"
            )
        if version != _TOOLS_VERSION:
            raise ParseError("tpm2_tools_credential", "version", 4, f"{version}, expected 1")
        offset = 8
        parts = []
        for field in ("credentialBlob", "secret"):
            if offset + 2 > len(data):
                raise ParseError("tpm2_tools_credential", field, offset, "truncated size")
            (size,) = struct.unpack_from(">H", data, offset)
            if offset + 2 + size > len(data):
                raise ParseError(
                    "tpm2_tools_credential",
                    field,
                    offset,
                    f"declares {size} bytes, {len(data) - offset - 2} left",
                )
            parts.append(data[offset + 2 : offset + 2 + size])
            offset += 2 + size
        if offset != len(data):
            raise ParseError(
                "tpm2_tools_credential", "end", offset, f"{len(data) - offset} trailing bytes"
            )
        return cls(parts[0], parts[1])


def _tpmt_public(ek: Public | bytes) -> bytes:
    if isinstance(ek, bytes):
        return ek
    if ek.from_pem:
        raise VerificationError(
            "credential.ek",
            "a PEM key is not enough: MakeCredential needs the EK's TPM public area",
        )
    return ek.raw


def check_name(ak_name: bytes) -> None:
    """A TPM2B_NAME's contents for an object: nameAlg (2 bytes) || digest (Part 1 §16)."""
    if len(ak_name) < 2:
        raise ParseError("TPM2B_NAME", "nameAlg", 0, f"{len(ak_name)} bytes is too short")
    (alg,) = struct.unpack_from(">H", ak_name, 0)
    size = _DIGEST_SIZES.get(alg)
    if size is None:
        raise ParseError("TPM2B_NAME", "nameAlg", 0, f"unsupported name algorithm 0x{alg:04x}")
    if len(ak_name) != 2 + size:
        raise ParseError("TPM2B_NAME", "digest", 2, f"{len(ak_name) - 2} bytes, expected {size}")


def make_credential(ek: Public | bytes, ak_name: bytes, secret: bytes) -> Credential:
    """Protect ``secret`` to ``ek`` for the object named ``ak_name`` (steps 1-3 above).

    ``ek`` is the EK public area (a ``vtpm_core.tpm.Public``, or TPMT_PUBLIC /
    TPM2B_PUBLIC bytes). Raises ParseError for a malformed EK
    or name, VerificationError("credential.ek") if the EK is not a restricted
    decryption key (Part 3 §12.6: TPM_RC_TYPE/ATTRIBUTES), and
    VerificationError("credential.secret") for a secret larger than the EK
    nameAlg's digest (TPM_RC_SIZE).
    """
    from tpm2_pytss import TPM2B_PUBLIC, TPMT_PUBLIC
    from tpm2_pytss.utils import make_credential as pytss_make_credential

    check_name(ak_name)
    raw = _tpmt_public(ek)
    public = None
    for structure, loader in (("TPMT_PUBLIC", TPMT_PUBLIC), ("TPM2B_PUBLIC", TPM2B_PUBLIC)):
        try:
            obj, used = loader.unmarshal(raw)
        except Exception:  # noqa: S112 - pytss raises TSS2_Exception or bare errors
            continue
        if used == len(raw):
            public = obj if structure == "TPMT_PUBLIC" else obj.publicArea
            break
    if public is None:
        raise ParseError("TPMT_PUBLIC", "publicArea", 0, "not a TPMT_PUBLIC or TPM2B_PUBLIC")
    attributes = int(public.objectAttributes)
    if not (attributes & _RESTRICTED and attributes & _DECRYPT) or attributes & _SIGN:
        raise VerificationError(
            "credential.ek",
            f"EK must be a restricted decryption key (attributes 0x{attributes:08x})",
        )
    name_alg = int(public.nameAlg)
    digest_size = _DIGEST_SIZES.get(name_alg)
    if digest_size is None:
        raise VerificationError("credential.ek", f"unsupported EK nameAlg 0x{name_alg:04x}")
    if not 0 < len(secret) <= digest_size:
        raise VerificationError(
            "credential.secret", f"secret is {len(secret)} bytes, must be 1..{digest_size}"
        )
    try:
        id_object, encrypted = pytss_make_credential(public, secret, ak_name)
    except ValueError as exc:
        raise VerificationError("credential.ek", f"cannot protect to this EK: {exc}") from None
    return Credential(bytes(id_object.credential), bytes(encrypted.secret))
