"""Attestation results as signed JWTs in the IETF EAR shape, in two profiles.

Specs: draft-ietf-rats-ear (EAT Attestation Results, JSON serialisation),
offered in the two profiles relying parties read today, chosen per request
(``verifier.service``) or by configuration:

- ``tag:github.com,2023:veraison/ear`` (Veraison's profile, the default until
  the draft is final): ``eat_profile``, ``iat``, ``ear.verifier-id``
  {developer, build}, ``eat_nonce``, ``submods`` {name: {``ear.status``,
  ``ear.trustworthiness-vector``, ``ear.appraisal-policy-id`` (a string)}};
- ``tag:ietf.org,2026:rats/ear#04`` (draft-ietf-rats-ear-04, section 3): the
  same information model with JWT-style claim names: ``ear_verifier_id``,
  ``submods`` {name: {``ear_status``, ``ear_trustworthiness_vector``,
  ``ear_appraisal_policy_ids`` (a list of strings)}}, and an optional overall
  ``ear_status`` for the whole result that must not be more trustworthy than
  the worst submod's.

draft-ietf-rats-ar4si section 2.3 (the trustworthiness claims and their
integer codes; their JSON names are the same in both profiles) and section 3.2
(tiers: 0-1 none, 2-31 affirming, 32-95 warning, 96-127 contraindicated). The
AR4SI rule, kept in both profiles, when signing and when verifying: a status is
never better than the worst claim of its trust vector, and the overall status
never better than the worst submod.

Signed with ES256 (RFC 7518 section 3.4) by the verifier's P-256 key; the key
is published as a JWKS (RFC 7517) so a relying party verifies results offline.

Extension claim (allowed by EAR section 3, private names): each failed rule as
{rule, claim, message} in the submod, ``vtpm.failures`` in the 2023 profile and
``vtpm_failures`` in the -04 one (its naming style).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import operator
import time
from collections.abc import Callable, Collection, Mapping
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
    "EAR_PROFILES",
    "EAR_PROFILE_04",
    "EAR_PROFILE_2023",
    "PROFILE_NAMES",
    "Ar4si",
    "EarResult",
    "EarSigner",
    "EarSubmod",
    "Status",
    "TrustVector",
    "profile_named",
    "status_of",
    "verify_result",
]

EAR_PROFILE_2023 = "tag:github.com,2023:veraison/ear"
EAR_PROFILE_04 = "tag:ietf.org,2026:rats/ear#04"  # draft-ietf-rats-ear-04, section 3
# The default profile: Veraison's, until draft-ietf-rats-ear is final.
EAR_PROFILE = EAR_PROFILE_2023
EAR_PROFILES = (EAR_PROFILE_2023, EAR_PROFILE_04)
# Short names for a request parameter or a configuration value (a tag's "#"
# would need escaping in a URL); the full tags are accepted as well.
PROFILE_NAMES = {"veraison-2023": EAR_PROFILE_2023, "ietf-ear-04": EAR_PROFILE_04}
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


@dataclass(frozen=True, slots=True)
class _Names:
    """One profile's JSON claim names (the information model is the same in both)."""

    verifier_id: str
    status: str
    vector: str
    policy: str
    policy_is_list: bool  # -04: ear_appraisal_policy_ids is an array of strings
    failures: str
    overall_status: bool  # -04 only: an optional top-level ear_status
    reappraisal: str  # our extension: the result re-appraised stored evidence (issue 20)


_NAMES = {
    EAR_PROFILE_2023: _Names(
        "ear.verifier-id",
        "ear.status",
        "ear.trustworthiness-vector",
        "ear.appraisal-policy-id",
        False,
        "vtpm.failures",
        False,
        "vtpm.reappraisal",
    ),
    EAR_PROFILE_04: _Names(
        "ear_verifier_id",
        "ear_status",
        "ear_trustworthiness_vector",
        "ear_appraisal_policy_ids",
        True,
        "vtpm_failures",
        True,
        "vtpm_reappraisal",
    ),
}
# the top-level claims this module writes (besides the profile's verifier id
# and overall status): what a re-expressed result may carry
_TOP_LEVEL = frozenset({"eat_profile", "iat", "eat_nonce", "sub", "submods"})


def profile_named(name: str) -> str | None:
    """The profile tag for a short name (:data:`PROFILE_NAMES`) or a full tag; None if unknown."""
    if name in _NAMES:
        return name
    return PROFILE_NAMES.get(name)


def _worse(a: str, b: str) -> str:
    return a if _STATUS_RANK[a] >= _STATUS_RANK[b] else b


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
    def from_json(cls, obj: Any, where: str = "ear.trustworthiness-vector") -> TrustVector:
        if not isinstance(obj, dict):
            raise ParseError("EAR", where, 0, "is not an object")
        kwargs: dict[str, int] = {}
        for key, value in obj.items():
            if key not in AR4SI_CLAIMS:
                raise ParseError("EAR", f"{where}.{key}", 0, "unknown claim")
            if isinstance(value, bool) or not isinstance(value, int) or not -128 <= value <= 127:
                raise ParseError("EAR", f"{where}.{key}", 0, f"{value!r} is not an int8")
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

    ``profile`` is the EAR profile written when a call names none (one of
    :data:`EAR_PROFILES`); ``clock`` returns seconds since the epoch
    (injectable for tests); ``kid`` defaults to the RFC 7638 JWK thumbprint of
    the public key.
    """

    __slots__ = ("_build", "_clock", "_developer", "_key", "_kid", "_pem", "_profile")

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        kid: str | None = None,
        developer: str = DEVELOPER,
        build: str = BUILD,
        clock: Callable[[], float] = time.time,
        profile: str = EAR_PROFILE,
    ) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigError("the EAR signing key must be an ECDSA P-256 key (ES256)")
        if profile not in _NAMES:
            raise ConfigError(f"unknown EAR profile {profile!r}; known: {', '.join(_NAMES)}")
        self._key = key
        self._developer = developer
        self._build = build
        self._clock = clock
        self._profile = profile
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

    @property
    def profile(self) -> str:
        """The profile written when a call names none."""
        return self._profile

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

    def _profile_of(self, profile: str | None) -> str:
        profile = profile or self._profile
        if profile not in _NAMES:
            raise ConfigError(f"unknown EAR profile {profile!r}; known: {', '.join(_NAMES)}")
        return profile

    def claims(
        self,
        result: Appraised,
        nonce: bytes,
        attester_id: str,
        policy_id: str,
        *,
        submod: str = DEFAULT_SUBMOD,
        profile: str | None = None,
        reappraisal: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The claims set in ``profile`` (default: the signer's).

        The submod's status is the worse of ``result.status`` and its trust
        vector's worst claim (AR4SI section 3.2): never better than a claim.
        ``reappraisal``: this result appraised stored evidence again without a
        new quote (issue 20); carried as ``vtpm.reappraisal`` (``vtpm_reappraisal``
        in -04), which names the original evidence's time: the freshness the
        nonce proves is that one, not ``iat``.
        """
        if not 8 <= len(nonce) <= 64:
            # EAT (RFC 9711 §4.1) bounds a nonce to 8..64 bytes
            raise ConfigError(f"EAT nonce must be 8..64 bytes, got {len(nonce)}")
        if result.status not in _STATUS_RANK:
            raise ConfigError(f"{result.status!r} is not an EAR status")
        vector = result.trust_vector
        sub = EarSubmod(
            _worse(result.status, status_of(vector)),
            vector,
            (policy_id,),
            tuple(result.failure_summaries),
        )
        return _encode(
            self._profile_of(profile),
            iat=int(self._clock()),
            developer=self._developer,
            build=self._build,
            nonce=nonce,
            subject=attester_id,
            submods={submod: sub},
            overall=None,
            reappraisal=reappraisal,
        )

    def sign(
        self,
        result: Appraised,
        nonce: bytes,
        attester_id: str,
        policy_id: str,
        *,
        submod: str = DEFAULT_SUBMOD,
        profile: str | None = None,
        reappraisal: Mapping[str, Any] | None = None,
    ) -> str:
        """An ES256 JWT carrying ``result`` as an EAR in ``profile``, bound to ``nonce``."""
        claims = self.claims(
            result,
            nonce,
            attester_id,
            policy_id,
            submod=submod,
            profile=profile,
            reappraisal=reappraisal,
        )
        return self._encode_jwt(claims)

    def _encode_jwt(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})

    def reprofile(self, token: str, profile: str | None = None) -> str:
        """The same result, signed by this key, in ``profile`` (default: the signer's).

        A token already in ``profile`` comes back unchanged. Otherwise the token
        must verify with this signer's own key (:func:`verify_result`: signature,
        shape, the AR4SI status rules) and carry only what this module writes;
        its content (``iat`` included: the time of the appraisal, not of this
        call) is written again under the other profile's names and signed.
        Raises VerificationError when it does not verify with this key (a
        rotated key, a tampered store) or has a claim the other profile could
        not carry. Does not check the nonce or the age: the caller's.
        """
        target = self._profile_of(profile)
        if _unverified_profile(token) == target:
            return token
        ear = verify_result(token, self.jwks(), now=self._clock)
        names = _NAMES[ear.profile]
        known = (
            _TOP_LEVEL
            | {names.verifier_id, names.reappraisal}
            | ({names.status} if names.overall_status else set())
        )
        extra = sorted(set(ear.claims) - known)
        if extra:
            raise VerificationError(
                "ear.reprofile", f"claim {extra[0]!r} has no counterpart in {target!r}"
            )
        overall = ear.declared_status
        if overall is not None and not _NAMES[target].overall_status:
            worst = _worst_submod(ear.submods.values())
            if _STATUS_RANK[overall] > _STATUS_RANK[worst]:
                raise VerificationError(
                    "ear.reprofile",
                    f"the overall status {overall!r} is worse than every submod's; "
                    f"{target!r} has no overall status to carry it",
                )
            overall = None
        claims = _encode(
            target,
            iat=ear.issued_at,
            developer=ear.developer,
            build=ear.build,
            nonce=ear.nonce,
            subject=ear.attester_id,
            submods=ear.submods,
            overall=overall,
            reappraisal=ear.claims.get(names.reappraisal),
        )
        return self._encode_jwt(claims)


def _thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    canonical = json.dumps(dict(sorted(jwk.items())), separators=(",", ":")).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def _unverified_profile(token: str) -> str | None:
    """The ``eat_profile`` a compact JWS claims, read without any check (None if unreadable).

    Only used to decide that a stored token needs no re-signing."""
    try:
        payload = json.loads(_unb64url(token.split(".")[1], "payload"))
    except (IndexError, ValueError, ParseError):
        return None
    value = payload.get("eat_profile") if isinstance(payload, dict) else None
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class EarSubmod:
    """One submod's appraisal. ``policy_ids``: the 2023 profile carries at most one."""

    status: str
    trust_vector: TrustVector
    policy_ids: tuple[str, ...] = ()
    failures: tuple[Mapping[str, str], ...] = ()

    @property
    def policy_id(self) -> str | None:
        """The (first) appraisal policy id, None when the result names none."""
        return self.policy_ids[0] if self.policy_ids else None


def _worst_submod(submods: Any) -> str:
    worst = Status.NONE
    for sub in submods:
        worst = _worse(sub.status, worst)
    return worst


def _encode(
    profile: str,
    *,
    iat: int,
    developer: str,
    build: str,
    nonce: bytes | None,
    subject: str | None,
    submods: Mapping[str, EarSubmod],
    overall: str | None,
    reappraisal: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The claims set of ``profile``. In -04 the overall ``ear_status`` is ``overall`` or,
    by default, the worst submod's (never better: draft-ietf-rats-ear-04 section 3)."""
    names = _NAMES[profile]
    body: dict[str, Any] = {}
    for name, sub in submods.items():
        entry: dict[str, Any] = {
            names.status: sub.status,
            names.vector: sub.trust_vector.to_json(),
        }
        if sub.policy_ids:
            if names.policy_is_list:
                entry[names.policy] = list(sub.policy_ids)
            elif len(sub.policy_ids) == 1:
                entry[names.policy] = sub.policy_ids[0]
            else:
                raise VerificationError(
                    "ear.reprofile",
                    f"submods.{name}: {profile!r} carries one policy id, not {len(sub.policy_ids)}",
                )
        if sub.failures:
            entry[names.failures] = [dict(f) for f in sub.failures]
        body[name] = entry
    out: dict[str, Any] = {
        "eat_profile": profile,
        "iat": iat,
        names.verifier_id: {"developer": developer, "build": build},
    }
    if nonce is not None:
        out["eat_nonce"] = _b64url(nonce)
    if subject is not None:
        out["sub"] = subject
    if names.overall_status:
        worst = _worst_submod(submods.values())
        out[names.status] = worst if overall is None else _worse(overall, worst)
    out["submods"] = body
    if reappraisal is not None:
        out[names.reappraisal] = dict(reappraisal)
    return out


@dataclass(frozen=True, slots=True)
class EarResult:
    """A verified EAR: signature checked against the JWKS, shape checked.

    ``declared_status``: the -04 profile's overall ``ear_status`` when the
    result carries one (checked not better than the worst submod)."""

    profile: str
    issued_at: int
    developer: str
    build: str
    nonce: bytes | None
    attester_id: str | None
    submods: Mapping[str, EarSubmod]
    kid: str
    claims: Mapping[str, Any] = field(repr=False)
    declared_status: str | None = None

    @property
    def status(self) -> str:
        """The worst status over all submods and the declared overall status."""
        worst = _worst_submod(self.submods.values())
        return worst if self.declared_status is None else _worse(self.declared_status, worst)


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


def _status(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in _STATUS_RANK:
        raise ParseError("EAR", where, 0, f"{value!r} is not an EAR status")
    return value


def _policy_ids(names: _Names, obj: dict[str, Any], where: str) -> tuple[str, ...]:
    value = obj.get(names.policy)
    field_name = f"{where}.{names.policy}"
    if value is None:
        return ()
    if not names.policy_is_list:
        if not isinstance(value, str):
            raise ParseError("EAR", field_name, 0, "is not a string")
        return (value,)
    # draft-ietf-rats-ear-04 section 3: a non-empty array of policy identifiers
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ParseError("EAR", field_name, 0, "is not a non-empty list of strings")
    return tuple(value)


def _submod(names: _Names, name: str, obj: Any) -> EarSubmod:
    where = f"submods.{name}"
    if not isinstance(obj, dict):
        raise ParseError("EAR", where, 0, "is not an object")
    status = _status(obj.get(names.status), f"{where}.{names.status}")
    vector = TrustVector.from_json(obj.get(names.vector, {}), f"{where}.{names.vector}")
    if _STATUS_RANK[vector.status] > _STATUS_RANK[status]:
        # the status may be worse than the vector, never better (ear §3.1)
        raise VerificationError(
            "ear.status",
            f"{where}: status {status!r} is better than its trust vector ({vector.status!r})",
        )
    failures = obj.get(names.failures, [])
    if not isinstance(failures, list) or not all(isinstance(f, dict) for f in failures):
        raise ParseError("EAR", f"{where}.{names.failures}", 0, "is not a list of objects")
    return EarSubmod(
        status,
        vector,
        _policy_ids(names, obj, where),
        tuple(MappingProxyType(f) for f in failures),
    )


def verify_result(
    token: str | bytes,
    jwks: Mapping[str, Any] | bytes | str,
    *,
    expected_nonce: bytes | None = None,
    max_age: float | None = None,
    now: Callable[[], float] = time.time,
    profiles: Collection[str] = EAR_PROFILES,
) -> EarResult:
    """Verify an EAR JWT offline with the verifier's JWKS.

    Guarantees: ES256 signature by a key in ``jwks`` (the header's ``kid``,
    or any key if absent); ``eat_profile`` is one of ``profiles`` (both by
    default) and every claim is read under that profile's names; the shape of
    every submod; a submod's status never better than its own trust vector and
    (-04) the overall status never better than the worst submod; the nonce is
    present and equals ``expected_nonce`` when given; ``iat`` not in the future
    and, with ``max_age``, not older. Not checked: that the relying party
    trusts this verifier or this policy id; claims this module does not know
    (EAR extensions) are kept in ``claims`` unread.
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
    profile = claims.get("eat_profile")
    if profile not in profiles or profile not in _NAMES:
        raise VerificationError(
            "ear.profile",
            f"eat_profile {profile!r}, expected one of {', '.join(map(repr, profiles))}",
        )
    names = _NAMES[profile]
    iat = claims["iat"]
    if isinstance(iat, bool) or not isinstance(iat, int):
        raise ParseError("EAR", "iat", 0, "is not an integer")
    t = now()
    if iat > t + 60:
        raise VerificationError("ear.iat", f"issued {iat - int(t)} s in the future")
    if max_age is not None and t - iat > max_age:
        raise VerificationError("ear.iat", f"issued {int(t - iat)} s ago, limit {max_age:g} s")
    vid = claims.get(names.verifier_id)
    if (
        not isinstance(vid, dict)
        or not isinstance(vid.get("developer"), str)
        or not isinstance(vid.get("build"), str)
    ):
        raise ParseError("EAR", names.verifier_id, 0, "expected {developer, build} strings")
    raw_nonce = claims.get("eat_nonce")
    nonce: bytes | None = None
    if raw_nonce is not None:
        if not isinstance(raw_nonce, str):
            raise ParseError("EAR", "eat_nonce", 0, "is not a string")
        nonce = _unb64url(raw_nonce, "eat_nonce")
    if expected_nonce is not None:
        if nonce is None:
            raise VerificationError(
                "ear.nonce",
                f"the result carries no eat_nonce, expected {len(expected_nonce)} bytes",
            )
        if not hmac.compare_digest(nonce, expected_nonce):
            raise VerificationError(
                "ear.nonce",
                f"nonce mismatch (got {len(nonce)} bytes, expected {len(expected_nonce)})",
            )
    raw_submods = claims.get("submods")
    if not isinstance(raw_submods, dict) or not raw_submods:
        raise ParseError("EAR", "submods", 0, "expected a non-empty object")
    submods = {str(n): _submod(names, str(n), s) for n, s in raw_submods.items()}
    declared: str | None = None
    if names.overall_status and names.status in claims:
        declared = _status(claims[names.status], names.status)
        worst = _worst_submod(submods.values())
        if declared != Status.NONE and _STATUS_RANK[declared] < _STATUS_RANK[worst]:
            # "none" makes no overall claim (so veraison/rust-ear reads it): the
            # submods' statuses stand; any other tier must be at least the worst
            raise VerificationError(
                "ear.status",
                f"overall status {declared!r} is better than the worst submod ({worst!r})",
            )
    subject = claims.get("sub")
    return EarResult(
        profile=profile,
        issued_at=iat,
        developer=vid["developer"],
        build=vid["build"],
        nonce=nonce,
        attester_id=subject if isinstance(subject, str) else None,
        submods=MappingProxyType(submods),
        kid=str(kid) if kid else "",
        claims=MappingProxyType(claims),
        declared_status=declared,
    )
