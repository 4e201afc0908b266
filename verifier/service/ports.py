"""What the service needs from the appraisal library (issue 5), as one narrow interface.

:class:`Appraiser` is implemented by :mod:`verifier.service.appraiser` on top
of ``verifier.ekcert``, ``verifier.credential``, ``verifier.quote``,
``verifier.eventlog``, ``verifier.policy`` and ``verifier.ear``. The service
modules only see these values, so the HTTP plumbing does not depend on the
library's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from verifier.service.messages import EvidenceRequest, RegistrationRequest

__all__ = [
    "Appraisal",
    "Appraiser",
    "CheckedRegistration",
    "ClockInfo",
    "CredentialChallenge",
    "ImaState",
]


@dataclass(frozen=True, slots=True)
class CheckedRegistration:
    """A registration whose EK chain, EK/cert key match and AK attributes passed."""

    ek_public: bytes  # TPM2B_PUBLIC
    ek_fingerprint: str  # SHA-256 hex of the EK's TPMT_PUBLIC (its identity across VMs)
    ek_certificate: bytes | None
    identity: dict[str, Any]  # what the EK certificate says (subject, issuer, serial, VM id)
    vm_id: str | None  # from the EK certificate's VM identity extension, if any
    ak_public: bytes  # TPM2B_PUBLIC
    ak_name: bytes  # TPM name (alg id + digest)


@dataclass(frozen=True, slots=True)
class CredentialChallenge:
    """TPM2_MakeCredential output: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET."""

    credential_blob: bytes
    encrypted_secret: bytes


@dataclass(frozen=True, slots=True)
class ClockInfo:
    """TPMS_CLOCK_INFO from a quote whose signature verified."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, slots=True)
class ImaState:
    """An attester's incremental IMA state (issue 14, table ``ima_state``): the boot it
    belongs to (the quote's resetCount and restartCount), how many entries of that
    boot's list are verified, the runtime policy they passed under (SHA-256 hex) and
    ``progress``, the opaque bytes the appraiser extends from (PCR 10 per bank)."""

    reset_count: int
    restart_count: int
    entry_count: int
    policy_digest: str
    progress: bytes


@dataclass(frozen=True, slots=True)
class Appraisal:
    """One appraisal: EAR status, every failing rule, and the verified clock (if any)."""

    status: str  # affirming | warning | contraindicated
    failures: tuple[dict[str, Any], ...] = ()
    warnings: tuple[dict[str, Any], ...] = ()
    trust_vector: dict[str, int] = field(default_factory=dict)
    clock: ClockInfo | None = None
    quote_verified: bool = False
    policy_id: str | None = None  # verifier.policy id: policy:<name>@sha256:<hex>
    # the runtime (IMA) part (issue 14): the report's ``ima`` section (None: no runtime
    # policy) and the state to store if this evidence is accepted (None: keep the old)
    ima: dict[str, Any] | None = None
    ima_state: ImaState | None = None


class Appraiser(Protocol):
    def check_registration(
        self, request: RegistrationRequest, *, allow_bare_ek: bool
    ) -> CheckedRegistration:
        """Validate EK chain / EK match / AK attributes; raise VerificationError or ParseError."""
        ...

    def make_credential(
        self, ek_public: bytes, ak_name: bytes, secret: bytes
    ) -> CredentialChallenge: ...

    def object_name(self, public: bytes) -> bytes:
        """The TPM name of a TPM2B_PUBLIC (ParseError if malformed)."""
        ...

    def check_policy(self, body: str) -> dict[str, tuple[int, ...]]:
        """Parse a ``verifier.policy`` document (raise ParseError/ConfigError); return the
        PCR selection a challenge under it asks for."""
        ...

    def policy_id(self, body: str) -> str:
        """The policy's id (``policy:<name>@sha256:<hex>``, verifier.policy.Policy.id)."""
        ...

    def runtime_policy_digest(self, body: str) -> str | None:
        """SHA-256 hex of the policy's runtime (IMA) part; None when it has none."""
        ...

    def appraise(
        self,
        *,
        ak_public: bytes,
        nonce: bytes,
        evidence: EvidenceRequest,
        selection: dict[str, tuple[int, ...]],
        policy_body: str | None,
        now: datetime | None = None,
        ima_state: ImaState | None = None,
        appraise_runtime: bool = False,
    ) -> Appraisal:
        """Verify and appraise; malformed evidence raises ParseError, failed checks are returned.
        ``now``: the appraisal time the policy's ``valid_until`` values are held against.
        ``appraise_runtime``: appraise the IMA delta from ``ima_state`` (the stored state;
        None: nothing verified yet); False (re-appraisal): the runtime part is reported
        as not appraised. A delta that does not start where the state stands raises
        ConflictError (nothing is recorded)."""
        ...

    def sign_result(
        self,
        appraisal: Appraisal,
        *,
        status: str,
        nonce: bytes,
        attester_id: str,
        flags: list[dict[str, Any]],
        reappraisal: dict[str, Any] | None = None,
    ) -> str:
        """The EAR JWT: ``status`` (lineage flags included), every failure and flag;
        ``reappraisal``: set when stored evidence was appraised again (issue 20)."""
        ...

    def ear_as(self, token: str, profile: str | None = None) -> str:
        """A stored EAR in ``profile`` (a ``verifier.ear`` tag; None: the configured one),
        re-signed only after it verified with the signing key (StateError otherwise)."""
        ...

    def jwks(self) -> dict[str, Any]: ...
