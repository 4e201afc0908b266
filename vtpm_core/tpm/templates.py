"""TCG default EK templates and the check "is this public area an EK from template X".

TCG EK Credential Profile for TPM Family 2.0, Level 0, version 2.5/2.6:
B.3.3 (L-1 RSA 2048), B.3.4 (L-2 ECC NIST P256), B.4.4.1-B.4.4.7 (H-1 RSA 2048,
H-2 P256, H-3 P384, H-4 P521, H-5 SM2 P256, H-6 RSA 3072, H-7 RSA 4096);
2.2.1.4 NV indices. PolicyA = TPM2_PolicySecret(TPM_RH_ENDORSEMENT); PolicyB =
PolicyOR(PolicyA, PolicyC), one digest per name algorithm (B.6). Values were
checked against go-tpm, go-tpm-tools and wolfTPM.

H-5 (SM2 with SM3-256) is not offered: neither libtpms nor Python's hashlib
implement SM3 here, so such an EK could be neither created nor named.

A template's ``unique`` is not part of the match: it is whatever the TPM put
there (the public key). Everything else must be byte-for-byte the template's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from vtpm_core.errors import VerificationError
from vtpm_core.tpm import _marshal
from vtpm_core.tpm.algorithms import EccCurve, TpmAlg
from vtpm_core.tpm.public import (
    EccParameters,
    EccPoint,
    ObjectAttributes,
    Public,
    RsaParameters,
    SymmetricDefinition,
)

__all__ = [
    "EK_ATTRIBUTES_HIGH",
    "EK_ATTRIBUTES_LOW",
    "EK_TEMPLATES",
    "POLICY_A_SHA256",
    "EkTemplate",
    "match_ek_template",
    "read_ek_tpm2b",
    "require_ek_template",
]

_A = ObjectAttributes
# B.3.3: fixedTPM, fixedParent, sensitiveDataOrigin, adminWithPolicy, restricted, decrypt
EK_ATTRIBUTES_LOW = (
    _A.FIXED_TPM | _A.FIXED_PARENT | _A.SENSITIVE_DATA_ORIGIN | _A.ADMIN_WITH_POLICY
    | _A.RESTRICTED | _A.DECRYPT
)  # fmt: skip  # 0x000300B2
# B.4.4: the high range also sets userWithAuth
EK_ATTRIBUTES_HIGH = EK_ATTRIBUTES_LOW | _A.USER_WITH_AUTH  # 0x000300F2

POLICY_A_SHA256 = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
POLICY_B_SHA256 = bytes.fromhex("ca3d0a99a2b93906f7a3342414efcfb3a385d44cd1fd459089d19b5071c0b7a0")
POLICY_B_SHA384 = bytes.fromhex(
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419ca"
    "cb47ba09699646150f9fc000f3f80e12"
)
POLICY_B_SHA512 = bytes.fromhex(
    "b8221ca69e8550a4914de3faa6a18c072cc01208073a928d5d66d59ef79e49a4"
    "29c41a6b269571d57edb25fbdb1838425608b413cd616a5f6db5b6071af99bea"
)


@dataclass(frozen=True, slots=True)
class EkTemplate:
    """One TCG EK template and the NV indices that go with it (profile 2.2.1.4)."""

    id: str  # "L-1", "L-2", "H-1" ... "H-7"
    key_type: TpmAlg  # RSA or ECC
    name_alg: TpmAlg
    attributes: ObjectAttributes
    auth_policy: bytes
    symmetric: SymmetricDefinition
    key_bits: int  # RSA modulus bits; 0 for ECC
    curve: EccCurve  # NONE for RSA
    unique_size: int  # zero bytes of unique in the template (modulus, or each of x and y)
    cert_nv_index: int
    nonce_nv_index: int | None  # low range only
    template_nv_index: int
    # TPMT_PUBLIC wire bytes of everything before ``unique`` (Part 2, 12.2.4); equal to
    # libtss2-mu's marshalling of the template (tests/vtpm_core/test_tpm_templates.py)
    wire_prefix: bytes = dataclasses.field(init=False, repr=False, compare=False)
    # the parameters a TPMT_PUBLIC made from this template parses to
    parameters: RsaParameters | EccParameters = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        prefix = (
            self.key_type.to_bytes(2, "big")
            + self.name_alg.to_bytes(2, "big")
            + int(self.attributes).to_bytes(4, "big")
            + len(self.auth_policy).to_bytes(2, "big")
            + self.auth_policy
            + self.symmetric.to_bytes()
            + TpmAlg.NULL.to_bytes(2, "big")  # scheme
        )
        if self.key_type == TpmAlg.RSA:
            prefix += self.key_bits.to_bytes(2, "big") + bytes(4)  # keyBits, exponent 0
        else:
            prefix += self.curve.to_bytes(2, "big") + TpmAlg.NULL.to_bytes(2, "big")  # kdf
        object.__setattr__(self, "wire_prefix", prefix)
        parameters: RsaParameters | EccParameters
        if self.key_type == TpmAlg.RSA:
            parameters = RsaParameters(self.symmetric, TpmAlg.NULL, TpmAlg.NULL, self.key_bits, 0)
        else:
            parameters = EccParameters(
                self.symmetric, TpmAlg.NULL, TpmAlg.NULL, self.curve, TpmAlg.NULL, TpmAlg.NULL
            )
        object.__setattr__(self, "parameters", parameters)

    @property
    def description(self) -> str:
        if self.key_type == TpmAlg.RSA:
            return f"{self.id} RSA {self.key_bits}"
        return f"{self.id} ECC {self.curve.name}"

    def public_template(self) -> bytes:
        """TPM2B_PUBLIC wire bytes: the inPublic of TPM2_CreatePrimary(TPM_RH_ENDORSEMENT)."""
        area = _marshal.marshal_public(
            key_type=self.key_type,
            name_alg=self.name_alg,
            attributes=int(self.attributes),
            auth_policy=self.auth_policy,
            sym_alg=self.symmetric.algorithm,
            sym_bits=self.symmetric.key_bits,
            sym_mode=self.symmetric.mode,
            key_bits=self.key_bits,
            exponent=0,
            curve=self.curve,
            unique_size=self.unique_size,
        )
        return len(area).to_bytes(2, "big") + area

    def wire_template(self) -> bytes:
        """``public_template()``'s bytes from ``wire_prefix`` and the zero unique, without
        tpm2-pytss: what `vtpm create` sends (importing tpm2-pytss costs that process
        ~25 ms). tests/vtpm_core/test_tpm_templates.py checks both give the same bytes."""
        unique = self.unique_size.to_bytes(2, "big") + bytes(self.unique_size)
        area = self.wire_prefix + (unique if self.key_type == TpmAlg.RSA else unique * 2)
        return len(area).to_bytes(2, "big") + area

    def template_public(self) -> Public:
        """``public_template()`` parsed (unique is the template's zero filling)."""
        return Public.parse_tpm2b(self.public_template())

    def mismatch(self, public: Public) -> str | None:
        """The first field where ``public`` differs from this template, or None."""
        if public.from_pem:
            return "public area (a PEM key carries no TPM attributes)"
        checks: list[tuple[str, object, object]] = [
            ("type", public.type, self.key_type),
            ("nameAlg", public.name_alg, self.name_alg),
            ("objectAttributes", public.attributes, self.attributes),
            ("authPolicy", public.auth_policy, self.auth_policy),
        ]
        p = public.parameters
        if isinstance(p, RsaParameters):
            checks += [
                ("symmetric", p.symmetric, self.symmetric),
                ("scheme", p.scheme, TpmAlg.NULL),
                ("keyBits", p.key_bits, self.key_bits),
                ("exponent", p.exponent, 0),
            ]
        elif isinstance(p, EccParameters):
            checks += [
                ("symmetric", p.symmetric, self.symmetric),
                ("scheme", p.scheme, TpmAlg.NULL),
                ("curveID", p.curve, self.curve),
                ("kdf", p.kdf, TpmAlg.NULL),
            ]
        for field, got, want in checks:
            if got != want:
                return f"{field} {_show(got)} (template {self.id} has {_show(want)})"
        return None


def _show(value: object) -> str:
    if isinstance(value, bytes):
        return value.hex() or "(empty)"
    if isinstance(value, ObjectAttributes):
        return f"0x{int(value):08x}"
    if isinstance(value, SymmetricDefinition):
        if value.algorithm == TpmAlg.NULL:
            return "NULL"
        return f"{value.algorithm.name}-{value.key_bits}-{value.mode.name}"
    if isinstance(value, TpmAlg | EccCurve):
        return value.name
    return str(value)


_AES128_CFB = SymmetricDefinition(TpmAlg.AES, 128, TpmAlg.CFB)
_AES256_CFB = SymmetricDefinition(TpmAlg.AES, 256, TpmAlg.CFB)
_NV = 0x01C00000


def _rsa(id_: str, bits: int, name_alg: TpmAlg, policy: bytes, sym: SymmetricDefinition,
         low: bool, cert: int) -> EkTemplate:  # fmt: skip
    return EkTemplate(
        id_, TpmAlg.RSA, name_alg, EK_ATTRIBUTES_LOW if low else EK_ATTRIBUTES_HIGH, policy, sym,
        bits, EccCurve.NONE, bits // 8 if low else 0,
        cert, cert + 1 if low else None, cert + 2 if low else cert + 1,
    )  # fmt: skip


def _ecc(id_: str, curve: EccCurve, size: int, name_alg: TpmAlg, policy: bytes,
         sym: SymmetricDefinition, low: bool, cert: int) -> EkTemplate:  # fmt: skip
    return EkTemplate(
        id_, TpmAlg.ECC, name_alg, EK_ATTRIBUTES_LOW if low else EK_ATTRIBUTES_HIGH, policy, sym,
        0, curve, size if low else 0,
        cert, cert + 1 if low else None, cert + 2 if low else cert + 1,
    )  # fmt: skip


EK_TEMPLATES: Mapping[str, EkTemplate] = MappingProxyType(
    {
        t.id: t
        for t in (
            _rsa("L-1", 2048, TpmAlg.SHA256, POLICY_A_SHA256, _AES128_CFB, True, _NV + 0x02),
            _ecc(
                "L-2",
                EccCurve.NIST_P256,
                32,
                TpmAlg.SHA256,
                POLICY_A_SHA256,
                _AES128_CFB,
                True,
                _NV + 0x0A,
            ),
            _rsa("H-1", 2048, TpmAlg.SHA256, POLICY_B_SHA256, _AES128_CFB, False, _NV + 0x12),
            _ecc(
                "H-2",
                EccCurve.NIST_P256,
                0,
                TpmAlg.SHA256,
                POLICY_B_SHA256,
                _AES128_CFB,
                False,
                _NV + 0x14,
            ),
            _ecc(
                "H-3",
                EccCurve.NIST_P384,
                0,
                TpmAlg.SHA384,
                POLICY_B_SHA384,
                _AES256_CFB,
                False,
                _NV + 0x16,
            ),
            _ecc(
                "H-4",
                EccCurve.NIST_P521,
                0,
                TpmAlg.SHA512,
                POLICY_B_SHA512,
                _AES256_CFB,
                False,
                _NV + 0x18,
            ),
            _rsa("H-6", 3072, TpmAlg.SHA384, POLICY_B_SHA384, _AES256_CFB, False, _NV + 0x1C),
            _rsa("H-7", 4096, TpmAlg.SHA384, POLICY_B_SHA384, _AES256_CFB, False, _NV + 0x1E),
        )
    }
)


_MAX_UNIQUE = {TpmAlg.RSA: 512, TpmAlg.ECC: 128}  # as Public's parser bounds them


def read_ek_tpm2b(data: bytes) -> tuple[Public, EkTemplate] | None:
    """A TPM2B_PUBLIC that is byte-for-byte an EK template up to ``unique``, read fast.

    Returns the ``Public`` that ``Public.parse_tpm2b(data)`` would give and its
    template, when ``data`` is a TPM2B whose TPMT_PUBLIC starts with one
    template's ``wire_prefix`` and continues with exactly the template's
    ``unique`` layout (one TPM2B for RSA, two for ECC, within the parser's
    bounds) and nothing after; None for anything else (the caller then runs the
    full parser, which gives the errors). The fields are the template's: the
    prefix bytes encode exactly them (tests compare with ``parse_tpm2b`` on
    real and mutated EKs). No libtss2-mu read: see docs/tpm-structures.md.
    """
    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        return None
    area = data[2:]
    for template in EK_TEMPLATES.values():
        prefix = template.wire_prefix
        if not area.startswith(prefix):
            continue
        pos = len(prefix)
        fields = []
        for _ in range(1 if template.key_type == TpmAlg.RSA else 2):
            if pos + 2 > len(area):
                return None
            size = int.from_bytes(area[pos : pos + 2], "big")
            if size > _MAX_UNIQUE[template.key_type] or pos + 2 + size > len(area):
                return None
            fields.append(area[pos + 2 : pos + 2 + size])
            pos += 2 + size
        if pos != len(area):
            return None
        unique: bytes | EccPoint = fields[0] if len(fields) == 1 else EccPoint(*fields)
        public = Public(
            template.key_type,
            template.name_alg,
            template.attributes,
            template.auth_policy,
            template.parameters,
            unique,
            area,
        )
        return public, template
    return None


def match_ek_template(public: Public) -> EkTemplate | None:
    """The template ``public`` was made from, or None.

    Guarantees: type, nameAlg, objectAttributes, authPolicy, symmetric,
    scheme, key size / curve, exponent and (ECC) KDF equal the template's.
    Not checked: the unique field (the key the TPM derived) and whether the
    key came from an endorsement hierarchy at all (only a certificate says so).

    Two checks must both hold: ``public.raw`` starts with the template's
    ``wire_prefix`` (the exact bytes before ``unique``, as libtss2-mu marshals the
    template), and every field above equals the template's (``mismatch``).
    """
    if public.from_pem:
        return None
    raw = public.raw
    for template in EK_TEMPLATES.values():
        if raw.startswith(template.wire_prefix) and template.mismatch(public) is None:
            return template
    return None


def require_ek_template(public: Public) -> EkTemplate:
    """Like ``match_ek_template``, but raise VerificationError("ek.template") naming the
    first mismatching field against the closest template of the same key type."""
    template = match_ek_template(public)
    if template is not None:
        return template
    candidates = [t for t in EK_TEMPLATES.values() if t.key_type == public.type] or list(
        EK_TEMPLATES.values()
    )

    def closeness(t: EkTemplate) -> int:
        # prefer the template of the same size/curve, then the same range
        same_size = (
            isinstance(public.parameters, RsaParameters)
            and public.parameters.key_bits == t.key_bits
        ) or (isinstance(public.parameters, EccParameters) and public.parameters.curve == t.curve)
        same_policy = public.auth_policy == t.auth_policy
        return -(2 * same_size + same_policy)

    best = sorted(candidates, key=closeness)[0]
    raise VerificationError("ek.template", f"not a TCG EK: {best.mismatch(public)}")
