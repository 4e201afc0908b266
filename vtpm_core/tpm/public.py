"""TPMT_PUBLIC / TPM2B_PUBLIC of RSA and ECC keys.

TPM 2.0 Library Part 2 (rev 1.59): 8.3 TPMA_OBJECT, 11.1.7 TPMT_SYM_DEF_OBJECT,
11.2.4.2 TPMT_RSA_SCHEME, 11.2.5.6 TPMT_ECC_SCHEME, 11.2.3.3 TPMT_KDF_SCHEME,
12.2.3.5 TPMS_RSA_PARMS, 12.2.3.6 TPMS_ECC_PARMS, 12.2.4 TPMT_PUBLIC,
12.2.5 TPM2B_PUBLIC. Part 1, 16: an object's Name is nameAlg || H(TPMT_PUBLIC).

``Public.parse`` frames every field itself (so errors name the field and byte
offset) and then, unless the caller passes ``cross_check=False``, has tpm2-pytss
unmarshal the same bytes as a second reader (``_marshal.check``); both must
agree on the length and the re-encoding. The parsed value keeps the exact bytes
in ``raw``; ``name()`` hashes those bytes, never a re-encoding. Who may turn the
cross-check off, and why: docs/tpm-structures.md, "The tpm2-tss cross-check".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import _marshal
from vtpm_core.tpm._reader import Reader
from vtpm_core.tpm.algorithms import (
    HASH_ALGS,
    EccCurve,
    TpmAlg,
    cryptography_curve,
    hash_name,
    hashlib_new,
)

__all__ = [
    "EccParameters",
    "EccPoint",
    "ObjectAttributes",
    "Public",
    "RsaParameters",
    "SymmetricDefinition",
]

_MAX_DIGEST = 64  # sizeof(TPMU_HA)
_PEM_END = b"-----END PUBLIC KEY-----"
_MAX_RSA_KEY_BYTES = 512
_MAX_ECC_KEY_BYTES = 128
_BLOCK_CIPHERS = (TpmAlg.AES, TpmAlg.SM4, TpmAlg.CAMELLIA)
# schemes whose details are TPMS_SCHEME_HASH (one hashAlg); RSAES has no details,
# ECDAA has hashAlg + count (Part 2, 11.2.1)
_HASH_SCHEMES = frozenset(
    {
        TpmAlg.RSASSA,
        TpmAlg.RSAPSS,
        TpmAlg.OAEP,
        TpmAlg.ECDSA,
        TpmAlg.ECDH,
        TpmAlg.ECSCHNORR,
        TpmAlg.SM2,
        TpmAlg.ECMQV,
    }
)
_RSA_SCHEMES = frozenset({TpmAlg.NULL, TpmAlg.RSASSA, TpmAlg.RSAPSS, TpmAlg.RSAES, TpmAlg.OAEP})
_ECC_SCHEMES = frozenset(
    {
        TpmAlg.NULL,
        TpmAlg.ECDSA,
        TpmAlg.ECDH,
        TpmAlg.ECDAA,
        TpmAlg.SM2,
        TpmAlg.ECSCHNORR,
        TpmAlg.ECMQV,
    }
)
_KDF_SCHEMES = frozenset(
    {TpmAlg.NULL, TpmAlg.MGF1, TpmAlg.KDF1_SP800_56A, TpmAlg.KDF2, TpmAlg.KDF1_SP800_108}
)


class ObjectAttributes(enum.IntFlag):
    """TPMA_OBJECT (Part 2, 8.3)."""

    FIXED_TPM = 0x00000002
    ST_CLEAR = 0x00000004
    FIXED_PARENT = 0x00000010
    SENSITIVE_DATA_ORIGIN = 0x00000020
    USER_WITH_AUTH = 0x00000040
    ADMIN_WITH_POLICY = 0x00000080
    FIRMWARE_LIMITED = 0x00000100
    NO_DA = 0x00000400
    ENCRYPTED_DUPLICATION = 0x00000800
    RESTRICTED = 0x00010000
    DECRYPT = 0x00020000
    SIGN_ENCRYPT = 0x00040000
    X509_SIGN = 0x00080000


@dataclass(frozen=True, slots=True)
class SymmetricDefinition:
    """TPMT_SYM_DEF_OBJECT: ``algorithm`` NULL means none (key_bits 0, mode NULL)."""

    algorithm: TpmAlg
    key_bits: int = 0
    mode: TpmAlg = TpmAlg.NULL

    def to_bytes(self) -> bytes:
        out = self.algorithm.to_bytes(2, "big")
        if self.algorithm != TpmAlg.NULL:
            out += self.key_bits.to_bytes(2, "big") + self.mode.to_bytes(2, "big")
        return out


NULL_SYMMETRIC = SymmetricDefinition(TpmAlg.NULL)


@dataclass(frozen=True, slots=True)
class RsaParameters:
    """TPMS_RSA_PARMS. ``exponent`` 0 means the default 65537 (Part 2, 12.2.3.5)."""

    symmetric: SymmetricDefinition
    scheme: TpmAlg
    scheme_hash: TpmAlg  # NULL when the scheme has no hash (NULL, RSAES)
    key_bits: int
    exponent: int

    @property
    def effective_exponent(self) -> int:
        return self.exponent or 65537


@dataclass(frozen=True, slots=True)
class EccParameters:
    """TPMS_ECC_PARMS (Part 2, 12.2.3.6)."""

    symmetric: SymmetricDefinition
    scheme: TpmAlg
    scheme_hash: TpmAlg  # NULL when the scheme is NULL
    curve: EccCurve
    kdf: TpmAlg
    kdf_hash: TpmAlg  # NULL when the KDF is NULL
    scheme_count: int = 0  # ECDAA only


@dataclass(frozen=True, slots=True)
class EccPoint:
    """TPMS_ECC_POINT: the coordinates exactly as the TPM encoded them."""

    x: bytes
    y: bytes


def _symmetric(r: Reader, field: str) -> SymmetricDefinition:
    alg = r.enum(TpmAlg, f"{field}.algorithm")
    if alg == TpmAlg.NULL:
        return NULL_SYMMETRIC
    if alg not in _BLOCK_CIPHERS:
        raise r.fail(
            f"{field}.algorithm", f"{alg.name} is not a symmetric object cipher", r.pos - 2
        )
    bits = r.u16(f"{field}.keyBits")
    mode = r.enum(TpmAlg, f"{field}.mode")
    if mode not in (TpmAlg.CTR, TpmAlg.OFB, TpmAlg.CBC, TpmAlg.CFB, TpmAlg.ECB, TpmAlg.NULL):
        raise r.fail(f"{field}.mode", f"{mode.name} is not a block cipher mode", r.pos - 2)
    return SymmetricDefinition(alg, bits, mode)


def _scheme(r: Reader, field: str, allowed: frozenset[TpmAlg]) -> tuple[TpmAlg, TpmAlg, int]:
    scheme = r.enum(TpmAlg, f"{field}.scheme")
    if scheme not in allowed:
        raise r.fail(f"{field}.scheme", f"{scheme.name} not allowed here", r.pos - 2)
    if (
        scheme in _HASH_SCHEMES
        or scheme == TpmAlg.ECDAA
        or (scheme in _KDF_SCHEMES and scheme != TpmAlg.NULL)
    ):
        h = r.enum(TpmAlg, f"{field}.details.hashAlg")
        count = r.u16(f"{field}.details.count") if scheme == TpmAlg.ECDAA else 0
        return scheme, h, count
    return scheme, TpmAlg.NULL, 0


@dataclass(frozen=True, slots=True)
class Public:
    """A TPMT_PUBLIC of an RSA or ECC key (or a bare PEM key, see ``from_pem``).

    ``raw`` is the exact TPMT_PUBLIC as received. A value made from a PEM key
    (``Public.load`` of a PEM SubjectPublicKeyInfo) has ``from_pem=True``, no
    attributes (0), nameAlg NULL, an empty ``raw`` and no TPM name: anything
    that checks attributes fails closed on it, and ``name()`` raises.
    """

    type: TpmAlg
    name_alg: TpmAlg
    attributes: ObjectAttributes
    auth_policy: bytes
    parameters: RsaParameters | EccParameters
    unique: bytes | EccPoint  # RSA modulus, or the ECC point
    raw: bytes
    from_pem: bool = False
    # public_key()'s answer, made on first use: it depends only on the fields above,
    # and building it (for ECC, checking the point is on the curve) costs more than
    # verifying a quote's RSA signature. Not part of equality, repr or __init__.
    _key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __getstate__(self) -> list[object]:
        """Pickle state: the fields, without the cached key (not picklable; rebuilt on use)."""
        return [None if f.name == "_key" else getattr(self, f.name) for f in fields(self)]

    # -- parsing ---------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes, *, cross_check: bool = True) -> Public:
        """A TPMT_PUBLIC that must fill ``data`` exactly.

        ``cross_check``: also have libtss2-mu read it (``_marshal.check``).
        """
        r = Reader(data, "TPMT_PUBLIC")
        public = cls._read(r)
        r.end()
        if cross_check:
            _marshal.check("TPMT_PUBLIC", public.raw)
        return public

    @classmethod
    def parse_tpm2b(cls, data: bytes, *, cross_check: bool = True) -> Public:
        """A TPM2B_PUBLIC (u16 size || TPMT_PUBLIC) that must fill ``data`` exactly."""
        r = Reader(data, "TPM2B_PUBLIC")
        size = r.u16("size")
        if size != r.remaining():
            raise ParseError(
                "TPM2B_PUBLIC", "size", 0, f"says {size} bytes, {r.remaining()} follow"
            )
        inner = Reader(r.take(size, "publicArea"), "TPMT_PUBLIC", base=2)
        public = cls._read(inner)
        inner.end()
        if cross_check:
            _marshal.check("TPMT_PUBLIC", public.raw)
        return public

    @classmethod
    def load(cls, data: bytes, *, cross_check: bool = True) -> Public:
        """TPM2B_PUBLIC (``tpm2_createek -u``, ``tpm2_createak -u``, ``tpm2_readpublic -o``),
        a bare TPMT_PUBLIC, or a PEM public key (``-f pem``; gives ``from_pem=True``).

        ``cross_check`` as for :meth:`parse` (a PEM key is read by cryptography alone).
        """
        if data.lstrip()[:10] == b"-----BEGIN":
            return cls.load_pem(data)
        if len(data) >= 2 and int.from_bytes(data[:2], "big") == len(data) - 2:
            try:
                return cls.parse_tpm2b(data, cross_check=cross_check)
            except ParseError as error:
                # a bare TPMT_PUBLIC can start with its own length by chance (ECC: 0x0023)
                try:
                    return cls.parse(data, cross_check=cross_check)
                except ParseError:
                    raise error from None
        return cls.parse(data, cross_check=cross_check)

    @classmethod
    def load_pem(cls, data: bytes) -> Public:
        """A PEM SubjectPublicKeyInfo (RSA or ECC) as a ``from_pem`` Public."""
        end = data.find(_PEM_END)
        if end >= 0 and data[end + len(_PEM_END) :].strip():
            extra = len(data[end + len(_PEM_END) :].strip())
            raise ParseError("PEM", "end", end + len(_PEM_END), f"{extra} bytes after the key")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ParseError(
                "PEM", "SubjectPublicKeyInfo", 0, f"not a PEM public key: {exc}"
            ) from None
        return cls.from_public_key(key)

    @classmethod
    def from_public_key(cls, key: object) -> Public:
        """A ``from_pem`` Public holding a ``cryptography`` RSA or ECC public key."""
        if isinstance(key, rsa.RSAPublicKey):
            numbers = key.public_numbers()
            n_bytes = numbers.n.to_bytes((key.key_size + 7) // 8, "big")
            params: RsaParameters | EccParameters = RsaParameters(
                NULL_SYMMETRIC,
                TpmAlg.NULL,
                TpmAlg.NULL,
                key.key_size,
                0 if numbers.e == 65537 else numbers.e,
            )
            return cls(
                TpmAlg.RSA, TpmAlg.NULL, ObjectAttributes(0), b"", params, n_bytes, b"", True
            )
        if isinstance(key, ec.EllipticCurvePublicKey):
            curves = {
                "secp256r1": EccCurve.NIST_P256,
                "secp384r1": EccCurve.NIST_P384,
                "secp521r1": EccCurve.NIST_P521,
                "secp224r1": EccCurve.NIST_P224,
                "secp192r1": EccCurve.NIST_P192,
            }
            curve = curves.get(key.curve.name)
            if curve is None:
                raise ParseError("PEM", "curve", 0, f"unsupported curve {key.curve.name}")
            size = (key.curve.key_size + 7) // 8
            pn = key.public_numbers()
            params = EccParameters(
                NULL_SYMMETRIC, TpmAlg.NULL, TpmAlg.NULL, curve, TpmAlg.NULL, TpmAlg.NULL
            )
            point = EccPoint(pn.x.to_bytes(size, "big"), pn.y.to_bytes(size, "big"))
            return cls(TpmAlg.ECC, TpmAlg.NULL, ObjectAttributes(0), b"", params, point, b"", True)
        raise ParseError("PEM", "SubjectPublicKeyInfo", 0, "neither an RSA nor an ECC key")

    @classmethod
    def _read(cls, r: Reader) -> Public:
        start = r.pos
        typ = r.enum(TpmAlg, "type")
        if typ not in (TpmAlg.RSA, TpmAlg.ECC):
            raise r.fail("type", f"unsupported key type {typ.name}", r.pos - 2)
        name_alg = r.enum(TpmAlg, "nameAlg")
        if name_alg not in HASH_ALGS and name_alg != TpmAlg.NULL:
            raise r.fail("nameAlg", f"{name_alg.name} is not a hash algorithm", r.pos - 2)
        attributes = ObjectAttributes(r.u32("objectAttributes"))
        auth_policy = r.tpm2b("authPolicy", _MAX_DIGEST)
        params: RsaParameters | EccParameters
        unique: bytes | EccPoint
        if typ == TpmAlg.RSA:
            sym = _symmetric(r, "parameters.rsaDetail.symmetric")
            scheme, s_hash, _ = _scheme(r, "parameters.rsaDetail.scheme", _RSA_SCHEMES)
            bits = r.u16("parameters.rsaDetail.keyBits")
            exponent = r.u32("parameters.rsaDetail.exponent")
            params = RsaParameters(sym, scheme, s_hash, bits, exponent)
            unique = r.tpm2b("unique.rsa", _MAX_RSA_KEY_BYTES)
        else:
            sym = _symmetric(r, "parameters.eccDetail.symmetric")
            scheme, s_hash, count = _scheme(r, "parameters.eccDetail.scheme", _ECC_SCHEMES)
            curve = r.enum(EccCurve, "parameters.eccDetail.curveID")
            kdf, kdf_hash, _ = _scheme(r, "parameters.eccDetail.kdf", _KDF_SCHEMES)
            params = EccParameters(sym, scheme, s_hash, curve, kdf, kdf_hash, count)
            x = r.tpm2b("unique.ecc.x", _MAX_ECC_KEY_BYTES)
            y = r.tpm2b("unique.ecc.y", _MAX_ECC_KEY_BYTES)
            unique = EccPoint(x, y)
        return cls(typ, name_alg, attributes, auth_policy, params, unique, r.data[start : r.pos])

    # -- encoding and derived values ---------------------------------------

    def _require_tpm(self, what: str) -> None:
        if self.from_pem:
            raise VerificationError("public.from_pem", f"a PEM key has no TPM {what}")

    def to_bytes(self) -> bytes:
        """The TPMT_PUBLIC bytes (``raw``)."""
        self._require_tpm("public area")
        return self.raw

    def to_tpm2b(self) -> bytes:
        """TPM2B_PUBLIC: u16 size || TPMT_PUBLIC, as ``tpm2_readpublic -o`` writes it."""
        self._require_tpm("public area")
        return len(self.raw).to_bytes(2, "big") + self.raw

    def name(self) -> bytes:
        """nameAlg || H_nameAlg(raw) (Part 1, 16); VerificationError for a PEM key."""
        self._require_tpm("name")
        try:
            digest = hashlib_new(self.name_alg, self.raw).digest()
        except ValueError as exc:
            raise VerificationError("public.name_alg", str(exc)) from None
        return self.name_alg.to_bytes(2, "big") + digest

    @property
    def name_hash(self) -> str:
        return hash_name(self.name_alg)

    @property
    def is_signing_key(self) -> bool:
        return bool(self.attributes & ObjectAttributes.SIGN_ENCRYPT)

    @property
    def is_decryption_key(self) -> bool:
        return bool(self.attributes & ObjectAttributes.DECRYPT)

    @property
    def is_restricted(self) -> bool:
        return bool(self.attributes & ObjectAttributes.RESTRICTED)

    @property
    def key_bits(self) -> int:
        """RSA modulus size, or the ECC curve size in bits."""
        if isinstance(self.parameters, RsaParameters):
            return self.parameters.key_bits
        return cryptography_curve(self.parameters.curve).key_size

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key as a ``cryptography`` object; ParseError if unique is not a valid key.

        Built once per ``Public`` (a refused key is refused again on every call).
        """
        key = self._key
        if key is None:
            key = self._make_public_key()
            object.__setattr__(self, "_key", key)
        return key

    def _make_public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        structure = "PEM" if self.from_pem else "TPMT_PUBLIC"
        if isinstance(self.parameters, RsaParameters):
            assert isinstance(self.unique, bytes)
            n = int.from_bytes(self.unique, "big")
            if n == 0 or n.bit_length() > 16384:
                raise ParseError(structure, "unique.rsa", 0, "empty or zero modulus")
            try:
                return rsa.RSAPublicNumbers(self.parameters.effective_exponent, n).public_key()
            except ValueError as exc:
                raise ParseError(structure, "unique.rsa", 0, f"not an RSA key: {exc}") from None
        assert isinstance(self.unique, EccPoint)
        try:
            curve = cryptography_curve(self.parameters.curve)
        except ValueError as exc:
            raise ParseError(structure, "parameters.eccDetail.curveID", 0, str(exc)) from None
        x = int.from_bytes(self.unique.x, "big")
        y = int.from_bytes(self.unique.y, "big")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError as exc:
            raise ParseError(
                structure, "unique.ecc", 0, f"not a point on the curve: {exc}"
            ) from None

    def to_pem(self) -> bytes:
        """The key as a PEM SubjectPublicKeyInfo."""
        return self.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def same_key(self, other: Public | rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bool:
        """True when ``other`` holds the same public key (compares SubjectPublicKeyInfo DER)."""
        mine = self.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        key = other.public_key() if isinstance(other, Public) else other
        theirs = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return mine == theirs
