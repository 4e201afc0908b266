"""IMA file signatures, format version 2, and the keys trusted to make them.

The ``sig`` field of the ``ima-sig`` template (and of ``ima-modsig`` when the
file carries an xattr signature) is the file's ``security.ima`` extended
attribute. With an asymmetric signature it is ``struct signature_v2_hdr``
(Linux ``security/integrity/integrity.h``), all integers big-endian::

    u8     type        EVM_IMA_XATTR_DIGSIG = 0x03
    u8     version     2
    u8     hash_algo   enum hash_algo (include/uapi/linux/hash_info.h)
    __be32 keyid       low 4 bytes of the signing key's identifier
    __be16 sig_size    length of sig
    u8     sig[]       RSA PKCS#1 v1.5 or DER ECDSA-Sig-Value over the file digest

The kernel (``security/integrity/digsig_asymmetric.c``, ``asymmetric_verify``)
refuses a header whose ``sig_size`` is not the rest of the field, looks the
key up as ``id:<keyid>`` in the ``.ima`` keyring, and verifies ``sig`` over
the file digest itself (not a hash of it): PKCS#1 v1.5 with the DigestInfo of
``hash_algo``, or ECDSA (X9.62) over that digest. This module does the same
with pyca/cryptography.

Key identifiers: a key from an X.509 certificate is known by the last four
bytes of its Subject Key Identifier (the kernel's asymmetric key id);
``evmctl`` without a certificate uses the last four bytes of SHA-1 over the
subjectPublicKey BIT STRING (RFC 5280 §4.2.1.2 method 1, which is also what
most certificates put in the SKID). A signature is checked only against the
trusted keys whose id equals its keyid exactly.

Not handled, and reported as ``unsupported`` (never as valid): signature
format version 3 (``IMA_VERITY_DIGSIG`` / sigv3 over ``struct ima_file_id``),
appended PKCS#7 module signatures (``ima-modsig``'s ``modsig`` field), HMACs
and EVM portable signatures, hash algorithms cryptography cannot verify.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from vtpm_core.errors import ConfigError, ParseError

__all__ = [
    "EVM_IMA_XATTR_DIGSIG",
    "HASH_ALGO_NAMES",
    "ImaSignatureV2",
    "SignatureCheck",
    "SignatureState",
    "TrustedKey",
    "TrustedKeys",
    "keyid_of_public_key",
    "verify_ima_signature",
]

EVM_IMA_XATTR_DIGSIG = 0x03
DIGSIG_VERSION_2 = 2
_HDR = struct.Struct(">BBBIH")
_STRUCT = "signature_v2_hdr"

# enum hash_algo (include/uapi/linux/hash_info.h) -> the name IMA prints in d-ng
# (crypto/hash_info.c hash_algo_name[]; "sm3" was "sm3-256" before Linux 5.15).
HASH_ALGO_NAMES: Mapping[int, str] = MappingProxyType(
    {
        0: "md4",
        1: "md5",
        2: "sha1",
        3: "rmd160",
        4: "sha256",
        5: "sha384",
        6: "sha512",
        7: "sha224",
        8: "rmd128",
        9: "rmd256",
        10: "rmd320",
        11: "wp256",
        12: "wp384",
        13: "wp512",
        14: "tgr128",
        15: "tgr160",
        16: "tgr192",
        17: "sm3",
        18: "streebog256",
        19: "streebog512",
        20: "sha3-256",
        21: "sha3-384",
        22: "sha3-512",
    }
)

# Algorithms a signature may use here. MD4/MD5 and the rest are refused even
# though a kernel may accept some of them: a signature over a broken digest
# proves nothing about the file.
_VERIFIABLE: Mapping[str, hashes.HashAlgorithm] = MappingProxyType(
    {
        "sha1": hashes.SHA1(),  # noqa: S303 - IMA's historical default; the kernel accepts it
        "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
        "sha3-256": hashes.SHA3_256(),
        "sha3-384": hashes.SHA3_384(),
        "sha3-512": hashes.SHA3_512(),
    }
)
_ALIASES = {"sm3-256": "sm3"}

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class SignatureState(enum.Enum):
    """What checking one entry's signature found. Only ``VALID`` lets an entry pass."""

    VALID = "valid"
    ABSENT = "absent"
    INVALID = "invalid"  # a trusted key with that id exists, the signature does not verify
    UNKNOWN_KEY = "unknown-key"
    MALFORMED = "malformed"
    UNSUPPORTED = "unsupported"
    ALGORITHM_MISMATCH = "algorithm-mismatch"


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """The outcome for one signature: its state, the key id seen, and why."""

    state: SignatureState
    keyid: bytes | None = None
    message: str = ""

    @property
    def valid(self) -> bool:
        return self.state is SignatureState.VALID

    def describe(self) -> str:
        kid = f" keyid {self.keyid.hex()}" if self.keyid is not None else ""
        text = f"signature {self.state.value}{kid}"
        return f"{text}: {self.message}" if self.message else text


@dataclass(frozen=True, slots=True)
class ImaSignatureV2:
    """A parsed ``struct signature_v2_hdr`` with its payload; ``raw`` is the field as given."""

    type: int
    version: int
    hash_algo: int
    keyid: bytes
    sig: bytes
    raw: bytes

    @property
    def hash_name(self) -> str | None:
        """IMA's name for ``hash_algo`` ("sha256"), or None for an id Linux does not define."""
        return HASH_ALGO_NAMES.get(self.hash_algo)

    @classmethod
    def parse(cls, data: bytes) -> ImaSignatureV2:
        """Parse the header and check ``sig_size`` against the field's length.

        Raises ParseError naming the field and byte offset. Does not check
        the type or version beyond reading them (see :func:`verify_ima_signature`).
        """
        if len(data) < _HDR.size:
            raise ParseError(
                _STRUCT, "header", len(data), f"{len(data)} bytes, need at least {_HDR.size}"
            )
        typ, version, hash_algo, keyid, sig_size = _HDR.unpack_from(data)
        rest = len(data) - _HDR.size
        if sig_size != rest:
            raise ParseError(
                _STRUCT, "sig_size", 7, f"says {sig_size} bytes, {rest} bytes follow the header"
            )
        if sig_size == 0:
            raise ParseError(_STRUCT, "sig", _HDR.size, "empty signature")
        return cls(typ, version, hash_algo, keyid.to_bytes(4, "big"), data[_HDR.size :], data)

    def to_bytes(self) -> bytes:
        return (
            _HDR.pack(
                self.type, self.version, self.hash_algo, int.from_bytes(self.keyid), len(self.sig)
            )
            + self.sig
        )


def keyid_of_public_key(key: PublicKey) -> bytes:
    """The last 4 bytes of SHA-1 over the subjectPublicKey BIT STRING contents.

    That is ``evmctl``'s ``calc_keyid_v2`` and RFC 5280 §4.2.1.2 method 1:
    for RSA the DER RSAPublicKey (PKCS#1), for EC the uncompressed point.
    """
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    else:
        bits = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return hashlib.sha1(bits).digest()[-4:]  # noqa: S324 - the id is defined with SHA-1


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A public key trusted to sign files, with the 4-byte id signatures name it by.

    ``spki`` is the DER SubjectPublicKeyInfo (what policies store); ``name``
    is a label for reports (for instance the certificate subject).
    """

    keyid: bytes
    spki: bytes
    name: str | None = None
    key: PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.keyid) != 4:
            raise ConfigError(f"IMA key id must be 4 bytes, got {len(self.keyid)}")
        object.__setattr__(self, "key", _load_spki(self.spki))

    @classmethod
    def from_public_key(
        cls, key: PublicKey, *, keyid: bytes | None = None, name: str | None = None
    ) -> TrustedKey:
        spki = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(keyid if keyid is not None else keyid_of_public_key(key), spki, name)

    @classmethod
    def load(cls, data: bytes, *, name: str | None = None) -> TrustedKey:
        """A key from an X.509 certificate or a public key, PEM or DER.

        For a certificate with a Subject Key Identifier the id is its last 4
        bytes (what the kernel matches ``id:<keyid>`` against); otherwise, and
        for a bare public key, the SHA-1 id of :func:`keyid_of_public_key`.
        Raises ConfigError when the bytes are neither, or the key is not RSA or EC.
        """
        cert = _try_cert(data)
        if cert is not None:
            key = cert.public_key()
            if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                raise ConfigError(f"certificate key is {type(key).__name__}, not RSA or EC")
            try:
                skid = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
                keyid: bytes | None = (
                    skid.value.digest[-4:] if len(skid.value.digest) >= 4 else None
                )
            except x509.ExtensionNotFound:
                keyid = None
            label = name if name is not None else cert.subject.rfc4514_string() or None
            return cls.from_public_key(key, keyid=keyid, name=label)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                loaded = serialization.load_pem_public_key(data)
            else:
                loaded = serialization.load_der_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError("not an X.509 certificate or a public key (PEM or DER)") from None
        if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ConfigError(f"key is {type(loaded).__name__}, not RSA or EC")
        return cls.from_public_key(loaded, name=name)

    def to_json(self) -> dict[str, str]:
        out = {"keyid": self.keyid.hex(), "public_key": base64.b64encode(self.spki).decode()}
        if self.name is not None:
            out["name"] = self.name
        return out


def _try_cert(data: bytes) -> x509.Certificate | None:
    try:
        if data.lstrip().startswith(b"-----BEGIN CERTIFICATE"):
            return x509.load_pem_x509_certificate(data)
        if data.lstrip().startswith(b"-----BEGIN"):
            return None
        return x509.load_der_x509_certificate(data)
    except ValueError:
        return None


def _load_spki(spki: bytes) -> PublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("public key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"key is {type(key).__name__}, not RSA or EC")
    return key


@dataclass(frozen=True, slots=True)
class TrustedKeys:
    """The trusted signing keys, indexed by key id (several keys may share an id)."""

    keys: tuple[TrustedKey, ...] = ()
    _by_id: Mapping[bytes, tuple[TrustedKey, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[bytes, list[TrustedKey]] = {}
        for key in self.keys:
            index.setdefault(key.keyid, []).append(key)
        object.__setattr__(
            self, "_by_id", MappingProxyType({k: tuple(v) for k, v in index.items()})
        )

    @classmethod
    def of(cls, keys: Iterable[TrustedKey]) -> TrustedKeys:
        return cls(tuple(keys))

    def __len__(self) -> int:
        return len(self.keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def with_id(self, keyid: bytes) -> tuple[TrustedKey, ...]:
        return self._by_id.get(keyid, ())


def _canonical_algo(name: str) -> str:
    return _ALIASES.get(name, name)


def verify_ima_signature(
    signature: bytes | None, digest_algo: str, digest: bytes, keys: TrustedKeys
) -> SignatureCheck:
    """Check an ``ima-sig`` signature field over the entry's file digest.

    Steps (as the kernel's ``integrity_digsig_verify`` / ``asymmetric_verify``):
    1. an empty field is ``absent``; a header that does not parse is ``malformed``;
    2. type must be EVM_IMA_XATTR_DIGSIG and version 2 (else ``unsupported``);
    3. ``hash_algo`` must be the algorithm of the entry's digest (else
       ``algorithm-mismatch``: a signature over another hash says nothing about
       this digest) and one we verify (else ``unsupported``);
    4. the trusted keys with exactly this keyid (none: ``unknown-key``);
    5. RSA PKCS#1 v1.5 / ECDSA over the digest with any of them: ``valid``,
       or ``invalid``.

    Never raises for bad signature bytes: every outcome is a state, and only
    ``valid`` passes. It does not say the digest is the file's: the caller
    must have checked the entry's template hash first.
    """
    if not signature:
        return SignatureCheck(SignatureState.ABSENT)
    try:
        sig = ImaSignatureV2.parse(signature)
    except ParseError as exc:
        return SignatureCheck(SignatureState.MALFORMED, message=str(exc))
    if sig.type != EVM_IMA_XATTR_DIGSIG:
        return SignatureCheck(
            SignatureState.UNSUPPORTED,
            sig.keyid,
            f"xattr type 0x{sig.type:02x} (only 0x03, a digital signature, is verified)",
        )
    if sig.version != DIGSIG_VERSION_2:
        return SignatureCheck(
            SignatureState.UNSUPPORTED, sig.keyid, f"format version {sig.version} (only 2)"
        )
    sig_algo = sig.hash_name
    if sig_algo is None:
        return SignatureCheck(
            SignatureState.UNSUPPORTED, sig.keyid, f"hash_algo {sig.hash_algo} is not defined"
        )
    entry_algo = _canonical_algo(digest_algo)
    if sig_algo != entry_algo:
        return SignatureCheck(
            SignatureState.ALGORITHM_MISMATCH,
            sig.keyid,
            f"signed with {sig_algo}, the entry's digest is {entry_algo}",
        )
    algorithm = _VERIFIABLE.get(sig_algo)
    if algorithm is None:
        return SignatureCheck(
            SignatureState.UNSUPPORTED, sig.keyid, f"hash {sig_algo} is not verified here"
        )
    if len(digest) != algorithm.digest_size:
        return SignatureCheck(
            SignatureState.MALFORMED,
            sig.keyid,
            f"{sig_algo} digest is {len(digest)} bytes, expected {algorithm.digest_size}",
        )
    candidates = keys.with_id(sig.keyid)
    if not candidates:
        return SignatureCheck(SignatureState.UNKNOWN_KEY, sig.keyid, "no trusted key has this id")
    for trusted in candidates:
        if _verify_one(trusted.key, sig.sig, digest, algorithm):
            return SignatureCheck(SignatureState.VALID, sig.keyid, trusted.name or "")
    return SignatureCheck(
        SignatureState.INVALID, sig.keyid, "does not verify with the trusted key of this id"
    )


def _verify_one(key: PublicKey, sig: bytes, digest: bytes, algorithm: hashes.HashAlgorithm) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, digest, padding.PKCS1v15(), Prehashed(algorithm))
        else:
            key.verify(sig, digest, ec.ECDSA(Prehashed(algorithm)))
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True
