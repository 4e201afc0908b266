"""Attestation results as signed JWTs in the IETF EAR shape.

Specs: draft-ietf-rats-ear (EAT Attestation Results, JSON serialisation:
``eat_profile`` "tag:github.com,2023:veraison/ear", ``iat``,
``ear.verifier-id`` {developer, build}, ``submods`` {name: {``ear.status``,
``ear.trustworthiness-vector``, ``ear.appraisal-policy-id``}}, ``eat_nonce``);
draft-ietf-rats-ar4si §2.3 (the trustworthiness claims and their integer
codes) and §3.2 (tiers: 0-1 none, 2-31 affirming, 32-95 warning, 96-127
contraindicated; the submod's status is its worst claim's tier).

Signed with ES256 (RFC 7518 §3.4) by the verifier's P-256 key; the key is
published as a JWKS (RFC 7517) so a relying party verifies results offline.

Extension claim (allowed by EAR §3, private names): ``vtpm.failures`` in the
submod lists each failed rule as {rule, claim, message}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import operator
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vtpm_core.errors import ConfigError, ParseError, VerificationError

__all__ = [
    "AR4SI_CLAIMS",
    "EAR_PROFILE",
    "Ar4si",
    "EarResult",
    "EarSigner",
    "EarSubmod",
    "Status",
    "TrustVector",
    "status_of",
    "verify_result",
]

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
DEFAULT_SUBMOD = "vtpm-boot"
DEVELOPER = "https://github.com/vtpm-trust"
BUILD = "vtpm-trust 0.1.0"

# draft-ietf-rats-ar4si §2.3, the claim names in the order the draft lists them
AR4SI_CLAIMS = (
    "instance-identity",
    "configuration",
    "executables",
    "file-system",
    "hardware",
    "runtime-opaque",
    "storage-opaque",
    "sourced-data",
)


class Ar4si:
    """The AR4SI codes we emit (draft-ietf-rats-ar4si §2.3; names as in veraison/ear)."""

    NO_CLAIM = 0
    UNEXPECTED_EVIDENCE = 1
    CRYPTO_VALIDATION_FAILED = 99
    # instance-identity
    TRUSTWORTHY_INSTANCE = 2
    UNTRUSTWORTHY_INSTANCE = 96
    UNRECOGNIZED_INSTANCE = 97
    # configuration
    APPROVED_CONFIG = 2
    UNSAFE_CONFIG = 32
    UNSUPPORTABLE_CONFIG = 96
    # executables
    APPROVED_RUNTIME = 2
    APPROVED_BOOT = 3
    UNSAFE_RUNTIME = 32
    UNRECOGNIZED_RUNTIME = 33
    CONTRAINDICATED_RUNTIME = 96
    # hardware
    GENUINE_HARDWARE = 2
    UNSAFE_HARDWARE = 32
    CONTRAINDICATED_HARDWARE = 96
    UNRECOGNIZED_HARDWARE = 97


class Status:
    """``ear.status`` values (draft-ietf-rats-ear §3.1)."""

    NONE = "none"
    AFFIRMING = "affirming"
    WARNING = "warning"
    CONTRAINDICATED = "contraindicated"


_STATUS_RANK = {Status.NONE: 0, Status.AFFIRMING: 1, Status.WARNING: 2, Status.CONTRAINDICATED: 3}
_FIELDS = tuple(name.replace("-", "_") for name in AR4SI_CLAIMS)  # TrustVector's, in order
_codes = operator.attrgetter(*_FIELDS)


def _tier(code: int) -> str:
    """AR4SI §3.2 tiers (negative codes are implementation-specific, same tiers by magnitude).
    The tier only rises with the magnitude."""
    c = abs(code)
    if c <= 1:
        return Status.NONE
    if c <= 31:
        return Status.AFFIRMING
    if c <= 95:
        return Status.WARNING
    return Status.CONTRAINDICATED


@dataclass(frozen=True, slots=True)
class TrustVector:
    """An AR4SI trustworthiness vector: claim name -> code (0 = no claim made)."""

    instance_identity: int = 0
    configuration: int = 0
    executables: int = 0
    file_system: int = 0
    hardware: int = 0
    runtime_opaque: int = 0
    storage_opaque: int = 0
    sourced_data: int = 0

    def to_json(self) -> dict[str, int]:
        """Only the claims made (non-zero), under their AR4SI names."""
        return {name: code for name, code in zip(AR4SI_CLAIMS, _codes(self), strict=True) if code}

    @classmethod
    def from_json(cls, obj: Any) -> TrustVector:
        if not isinstance(obj, dict):
            raise ParseError("EAR", "ear.trustworthiness-vector", 0, "is not an object")
        kwargs: dict[str, int] = {}
        for key, value in obj.items():
            if key not in AR4SI_CLAIMS:
                raise ParseError("EAR", f"ear.trustworthiness-vector.{key}", 0, "unknown claim")
            if isinstance(value, bool) or not isinstance(value, int) or not -128 <= value <= 127:
                raise ParseError(
                    "EAR", f"ear.trustworthiness-vector.{key}", 0, f"{value!r} is not an int8"
                )
            kwargs[key.replace("-", "_")] = value
        return cls(**kwargs)

    @property
    def status(self) -> str:
        """The worst tier over the claims made; "none" when no claim is made."""
        return status_of(self)


def status_of(vector: TrustVector) -> str:
    """The worst tier over the claims: the tier of the largest magnitude (see _tier)."""
    codes: tuple[int, ...] = _codes(vector)
    return _tier(max(map(abs, codes)))


class Appraised(Protocol):
    """What :meth:`EarSigner.sign` reads from an appraisal result."""

    @property
    def status(self) -> str: ...

    @property
    def trust_vector(self) -> TrustVector: ...

    @property
    def failure_summaries(self) -> tuple[dict[str, str], ...]: ...


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str, field_name: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ParseError("EAR", field_name, 0, "is not base64url") from None


class EarSigner:
    """Signs attestation results with the verifier's P-256 key (ES256).

    ``clock`` returns seconds since the epoch (injectable for tests);
    ``kid`` defaults to the RFC 7638 JWK thumbprint of the public key.
    """

    __slots__ = ("_build", "_clock", "_developer", "_key", "_kid", "_pem")

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        kid: str | None = None,
        developer: str = DEVELOPER,
        build: str = BUILD,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigError("the EAR signing key must be an ECDSA P-256 key (ES256)")
        self._key = key
        self._developer = developer
        self._build = build
        self._clock = clock
        self._kid = kid or _thumbprint(self.public_jwk_unkeyed())
        self._pem: bytes | None = None

    @classmethod
    def generate(cls, **kwargs: Any) -> EarSigner:
        return cls(ec.generate_private_key(ec.SECP256R1()), **kwargs)

    @classmethod
    def load(cls, pem: bytes, password: bytes | None = None, **kwargs: Any) -> EarSigner:
        try:
            key = serialization.load_pem_private_key(pem, password)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the EAR signing key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("the EAR signing key must be an ECDSA P-256 key (ES256)")
        return cls(key, **kwargs)

    def private_pem(self, password: bytes | None = None) -> bytes:
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )

    @property
    def kid(self) -> str:
        return self._kid

    def public_jwk_unkeyed(self) -> dict[str, str]:
        numbers = self._key.public_key().public_numbers()
        return {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public key as a JWKS ({"keys": [jwk]}) to publish for relying parties."""
        jwk = self.public_jwk_unkeyed()
        jwk.update({"kid": self._kid, "use": "sig", "alg": "ES256"})
        return {"keys": [jwk]}

    def claims(
        self,
        result: Appraised,
        nonce: bytes,
        attester_id: str,
        policy_id: str,
        *,
        submod: str = DEFAULT_SUBMOD,
    ) -> dict[str, Any]:
        if not 8 <= len(nonce) <= 64:
            # EAT (RFC 9711 §4.1) bounds a nonce to 8..64 bytes
            raise ConfigError(f"EAT nonce must be 8..64 bytes, got {len(nonce)}")
        body: dict[str, Any] = {
            "ear.status": result.status,
            "ear.trustworthiness-vector": result.trust_vector.to_json(),
            "ear.appraisal-policy-id": policy_id,
        }
        failures = list(result.failure_summaries)
        if failures:
            body["vtpm.failures"] = failures
        return {
            "eat_profile": EAR_PROFILE,
            "iat": int(self._clock()),
            "ear.verifier-id": {"developer": self._developer, "build": self._build},
            "eat_nonce": _b64url(nonce),
            "sub": attester_id,
            "submods": {submod: body},
        }

    def sign(
        self,
        result: Appraised,
        nonce: bytes,
        attester_id: str,
        policy_id: str,
        *,
        submod: str = DEFAULT_SUBMOD,
    ) -> str:
        """An ES256 JWT carrying ``result`` as an EAR, bound to ``nonce``."""
        claims = self.claims(result, nonce, attester_id, policy_id, submod=submod)
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})


def _thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    canonical = json.dumps(dict(sorted(jwk.items())), separators=(",", ":")).encode()
    return _b64url(hashlib.sha256(canonical).digest())


@dataclass(frozen=True, slots=True)
class EarSubmod:
    status: str
    trust_vector: TrustVector
    policy_id: str | None
    failures: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class EarResult:
    """A verified EAR: signature checked against the JWKS, shape checked."""

    profile: str
    issued_at: int
    developer: str
    build: str
    nonce: bytes
    attester_id: str | None
    submods: Mapping[str, EarSubmod]
    kid: str
    claims: Mapping[str, Any] = field(repr=False)

    @property
    def status(self) -> str:
        """The worst status over all submods."""
        worst = Status.NONE
        for sub in self.submods.values():
            if _STATUS_RANK[sub.status] > _STATUS_RANK[worst]:
                worst = sub.status
        return worst


def _jwks_keys(jwks: Mapping[str, Any] | bytes | str) -> dict[str, ec.EllipticCurvePublicKey]:
    if isinstance(jwks, bytes | str):
        try:
            jwks = json.loads(jwks)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParseError("JWKS", "document", 0, f"not JSON: {exc}") from None
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise ParseError("JWKS", "keys", 0, "expected an object with a 'keys' list")
    out: dict[str, ec.EllipticCurvePublicKey] = {}
    for i, jwk in enumerate(jwks["keys"]):
        if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            continue  # RFC 7517 §5: ignore keys we cannot use
        try:
            x = int.from_bytes(_unb64url(jwk["x"], f"keys[{i}].x"), "big")
            y = int.from_bytes(_unb64url(jwk["y"], f"keys[{i}].y"), "big")
            key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except (KeyError, ValueError, TypeError) as exc:
            raise ParseError("JWKS", f"keys[{i}]", 0, f"not a P-256 key: {exc}") from None
        kid = jwk.get("kid") or _thumbprint({k: jwk[k] for k in ("crv", "kty", "x", "y")})
        out[str(kid)] = key
    if not out:
        raise ParseError("JWKS", "keys", 0, "no ES256 (EC P-256) key in the JWKS")
    return out


def _submod(name: str, obj: Any) -> EarSubmod:
    where = f"submods.{name}"
    if not isinstance(obj, dict):
        raise ParseError("EAR", where, 0, "is not an object")
    status = obj.get("ear.status")
    if status not in _STATUS_RANK:
        raise ParseError("EAR", f"{where}.ear.status", 0, f"{status!r} is not an EAR status")
    vector = TrustVector.from_json(obj.get("ear.trustworthiness-vector", {}))
    if _STATUS_RANK[vector.status] > _STATUS_RANK[status]:
        # the status may be worse than the vector, never better (ear §3.1)
        raise VerificationError(
            "ear.status",
            f"{where}: status {status!r} is better than its trust vector ({vector.status!r})",
        )
    policy = obj.get("ear.appraisal-policy-id")
    if policy is not None and not isinstance(policy, str):
        raise ParseError("EAR", f"{where}.ear.appraisal-policy-id", 0, "is not a string")
    failures = obj.get("vtpm.failures", [])
    if not isinstance(failures, list) or not all(isinstance(f, dict) for f in failures):
        raise ParseError("EAR", f"{where}.vtpm.failures", 0, "is not a list of objects")
    return EarSubmod(status, vector, policy, tuple(MappingProxyType(f) for f in failures))


def verify_result(
    token: str | bytes,
    jwks: Mapping[str, Any] | bytes | str,
    *,
    expected_nonce: bytes | None = None,
    max_age: float | None = None,
    now: Callable[[], float] = time.time,
) -> EarResult:
    """Verify an EAR JWT offline with the verifier's JWKS.

    Guarantees: ES256 signature by a key in ``jwks`` (the header's ``kid``,
    or any key if absent); ``eat_profile`` is the EAR profile; the shape of
    every submod; a status never better than its own trust vector; the nonce
    equals ``expected_nonce`` when given; ``iat`` not in the future and, with
    ``max_age``, not older. Not checked: that the relying party trusts this
    verifier or this policy id.
    """
    if isinstance(token, bytes):
        token = token.decode("ascii", errors="replace")
    token = token.strip()
    keys = _jwks_keys(jwks)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise ParseError("EAR", "header", 0, f"not a JWT: {exc}") from None
    if header.get("alg") != "ES256":
        raise VerificationError("ear.algorithm", f"alg {header.get('alg')!r}, expected ES256")
    kid = header.get("kid")
    candidates = [keys[kid]] if kid in keys else ([] if kid else list(keys.values()))
    if not candidates:
        raise VerificationError("ear.signature", f"no key with kid {kid!r} in the JWKS")
    claims: dict[str, Any] | None = None
    for key in candidates:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["ES256"],
                options={"require": ["iat"], "verify_iat": False},
            )
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise ParseError("EAR", "token", 0, str(exc)) from None
    if claims is None:
        raise VerificationError("ear.signature", "signature does not verify with the JWKS")
    if claims.get("eat_profile") != EAR_PROFILE:
        raise VerificationError(
            "ear.profile", f"eat_profile {claims.get('eat_profile')!r}, expected {EAR_PROFILE!r}"
        )
    iat = claims["iat"]
    if isinstance(iat, bool) or not isinstance(iat, int):
        raise ParseError("EAR", "iat", 0, "is not an integer")
    t = now()
    if iat > t + 60:
        raise VerificationError("ear.iat", f"issued {iat - int(t)} s in the future")
    if max_age is not None and t - iat > max_age:
        raise VerificationError("ear.iat", f"issued {int(t - iat)} s ago, limit {max_age:g} s")
    vid = claims.get("ear.verifier-id")
    if (
        not isinstance(vid, dict)
        or not isinstance(vid.get("developer"), str)
        or not isinstance(vid.get("build"), str)
    ):
        raise ParseError("EAR", "ear.verifier-id", 0, "expected {developer, build} strings")
    raw_nonce = claims.get("eat_nonce")
    if not isinstance(raw_nonce, str):
        raise ParseError("EAR", "eat_nonce", 0, "missing or not a string")
    nonce = _unb64url(raw_nonce, "eat_nonce")
    if expected_nonce is not None and not hmac.compare_digest(nonce, expected_nonce):
        raise VerificationError(
            "ear.nonce",
            f"nonce mismatch (got {len(nonce)} bytes, expected {len(expected_nonce)})",
        )
    submods = claims.get("submods")
    if not isinstance(submods, dict) or not submods:
        raise ParseError("EAR", "submods", 0, "expected a non-empty object")
    subject = claims.get("sub")
    return EarResult(
        profile=EAR_PROFILE,
        issued_at=iat,
        developer=vid["developer"],
        build=vid["build"],
        nonce=nonce,
        attester_id=subject if isinstance(subject, str) else None,
        submods=MappingProxyType({str(n): _submod(str(n), s) for n, s in submods.items()}),
        kid=str(kid) if kid else "",
        claims=MappingProxyType(claims),
    )
