"""The service's appraiser: EK chain, AK attributes, MakeCredential, then the library's appraisal.

Built on the appraisal library (issue 5): ``verifier.ekcert`` validates EK
certificates (path to the configured roots, TCG EK profile, key match, VM
identity); ``verifier.credential`` makes credentials; ``verifier.quote``
checks AK attributes at registration; ``verifier.appraisal.Appraiser``
appraises evidence (quote, event-log replay, every rule of a
``verifier.policy`` policy, docs/policy-and-results.md); ``verifier.ear``
signs the result as an EAR (draft-ietf-rats-ear) and serves its JWKS.

Evidence steps:
  1-3. ``Appraiser.appraise`` with the activated AK, the challenge nonce, the
       supplied PCR values, the event log and the assigned policy;
  3a.  the verified quote selects exactly what the challenge asked for;
  4.   a policy with a runtime (IMA) part: the IMA delta, replayed onto the
       attester's stored state to the quoted PCR 10 and appraised
       (verifier.service.runtime);
  without a policy: the quote and (if given) the log replay are checked,
  the verdict is at best ``warning``.
Lineage flags (services.py) are added to the result by the caller and
reported in the EAR as ``lineage.<flag>`` failures.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from verifier.appraisal import AppraisalResult, Appraiser, Evidence
from verifier.credential import make_credential
from verifier.ear import Ar4si, EarSigner, TrustVector
from verifier.ekcert import (
    EkValidationOptions,
    TrustStore,
    VmIdentityExtension,
    validate_ek_certificate,
)
from verifier.eventlog import EventLog
from verifier.ima.limits import ImaLimits
from verifier.policy import Policy
from verifier.policy.rules import CONFIGURATION, EXECUTABLES
from verifier.quote import check_ak_attributes, verify_quote
from verifier.service.config import (
    DEFAULT_IMA_MAX_DELTA_BYTES,
    DEFAULT_IMA_MAX_DELTA_ENTRIES,
    ServiceConfig,
)
from verifier.service.messages import EvidenceRequest, RegistrationRequest
from verifier.service.ports import (
    Appraisal,
    CheckedRegistration,
    ClockInfo,
    CredentialChallenge,
    ImaState,
)
from verifier.service.runtime import appraise_runtime as runtime_part
from vtpm_core.errors import ConfigError, ParseError, StateError, VerificationError
from vtpm_core.tpm import Attest, ObjectAttributes, PcrValues, Public, QuoteInfo, Signature

__all__ = ["LibraryAppraiser", "ParsedPublic", "parse_public", "policy_pcrs"]

INSTANCE_IDENTITY = "instance-identity"
# PCRs the event-log rules read (TCG PC Client PFP 1.06, 3.3.4): quoted so the replay covers them
_RULE_PCRS: dict[str, tuple[int, ...]] = {
    "secure_boot": (7,),
    "db": (7,),
    "dbx": (7,),
    "sbat": (7,),
    "firmware": (0,),
    "boot_applications": (4,),
    "kernel_cmdlines": (8, 9, 12),
}


@dataclass(frozen=True, slots=True)
class ParsedPublic:
    """A TPM2B_PUBLIC as received (``raw``) with its parsed area and key."""

    raw: bytes  # TPM2B_PUBLIC
    public: Public
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def area(self) -> bytes:
        return self.public.raw  # TPMT_PUBLIC

    @property
    def attributes(self) -> ObjectAttributes:
        return self.public.attributes

    @property
    def name(self) -> bytes:
        try:
            return self.public.name()
        except VerificationError as exc:
            raise ParseError("TPMT_PUBLIC", "nameAlg", 2, str(exc)) from None


def parse_public(raw: bytes, what: str) -> ParsedPublic:
    """TPM2B_PUBLIC -> key and attributes (Part 2, 12.2.5); ParseError when malformed."""
    try:
        public = Public.parse_tpm2b(raw)
    except ParseError as exc:
        raise ParseError("TPM2B_PUBLIC", what, exc.offset, exc.message) from None
    return ParsedPublic(raw, public, public.public_key())


def policy_pcrs(policy: Policy, banks: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The PCRs a quote must cover for ``policy``: its literal PCRs in their banks, and the
    PCRs its event-log rules read in each of ``banks``."""
    out: dict[str, set[int]] = {}
    doc = policy.to_dict()
    for key, pcrs in _RULE_PCRS.items():
        if doc.get(key) is not None:
            for bank in banks:
                out.setdefault(bank, set()).update(pcrs)
    if policy.firmware is not None and policy.firmware.pcr0 is not None:
        for bank in policy.firmware.pcr0:
            out.setdefault(bank, set()).add(0)
    for bank, values in (policy.pcrs or {}).items():
        out.setdefault(bank, set()).update(values)
    if policy.runtime is not None:
        # PCR 10 binds the IMA list to the TPM; 0-9 check its boot_aggregate entry
        for bank in banks:
            out.setdefault(bank, set()).update(range(11))
    return {bank: tuple(sorted(p)) for bank, p in sorted(out.items())}


def _vm_id(ext: VmIdentityExtension | None) -> str | None:
    """The VM id our CA writes into the EK certificate (decoded by vtpm_core's schema)."""
    if ext is None or ext.decoded is None:
        return None
    return str(ext.decoded.vm_id)  # vtpm_core.vm_identity.VmIdentity


def _vm_identity(ext: VmIdentityExtension | None) -> dict[str, str] | None:
    """The whole VM identity (vtpm_core.vm_identity.VmIdentity) for the attester's record."""
    if ext is None or ext.decoded is None:
        return None
    out: dict[str, str] = {}
    for key in ("vm_id", "vm_name", "vtpm_instance_id", "created_at"):
        value = getattr(ext.decoded, key, None)
        if value is not None and value != "":
            out[key] = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return out


def _selection_text(selection: dict[str, frozenset[int]]) -> str:
    return "+".join(f"{b}:{','.join(map(str, sorted(p)))}" for b, p in sorted(selection.items()))


def _event_text(event: Any) -> str | None:
    if not isinstance(event, dict):
        return None
    return f"event {event.get('index')} ({event.get('type')}, PCR {event.get('pcr')})"


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What :meth:`EarSigner.sign` reads (``verifier.ear.Appraised``): the service's verdict."""

    status: str
    trust_vector: TrustVector
    failure_summaries: tuple[dict[str, str], ...]


def _summary(failure: dict[str, Any]) -> dict[str, str]:
    """A failure for the EAR's ``vtpm.failures``: rule, claim, message, event, expected, actual;
    an IMA entry's also its index, path, template and signature state."""
    out = {"rule": str(failure.get("rule")), "claim": str(failure.get("claim", ""))}
    out["message"] = str(failure.get("message", ""))
    event = _event_text(failure.get("event"))
    if event is not None:
        out["event"] = event
    for key in ("expected", "actual"):
        if failure.get(key) is not None:
            out[key] = str(failure[key])
    entry = failure.get("entry")
    if isinstance(entry, dict):
        for key in ("index", "path", "template", "signature"):
            if entry.get(key) is not None:
                out[f"ima_{key}"] = str(entry[key])
    return out


def _ima_ignored(appraisal: Appraisal, evidence: EvidenceRequest, why: str) -> Appraisal:
    """An IMA delta sent where no runtime policy applies: said, not appraised."""
    if evidence.ima is None:
        return appraisal
    note = {"message": f"IMA list not appraised: {why}"}
    return replace(appraisal, warnings=(*appraisal.warnings, note))


class LibraryAppraiser:
    """The :class:`~verifier.service.ports.Appraiser` the service runs with."""

    def __init__(
        self,
        trust: TrustStore | None,
        ek_options: EkValidationOptions,
        signer: EarSigner,
        verifier_id: str,
        default_selection: dict[str, tuple[int, ...]] | None = None,
        ima_limits: ImaLimits | None = None,
    ) -> None:
        self._trust = trust
        self._ek_options = ek_options
        self._signer = signer
        self._verifier_id = verifier_id
        self._default_selection = default_selection or {"sha256": tuple(range(8))}
        self._ima_limits = ima_limits or ImaLimits(
            max_list_bytes=DEFAULT_IMA_MAX_DELTA_BYTES, max_entries=DEFAULT_IMA_MAX_DELTA_ENTRIES
        )
        # parsed AK publics by their wire bytes, parsed policies by their text:
        # immutable values, bounded, per app instance
        self._ak_cache: OrderedDict[bytes, ParsedPublic] = OrderedDict()
        self._policy_cache: OrderedDict[str, Policy] = OrderedDict()
        self._appraiser = Appraiser()

    @classmethod
    def from_config(cls, config: ServiceConfig) -> LibraryAppraiser:
        if config.signing_key_path is None:
            raise ConfigError("no EAR signing key configured in the verifier home")
        signer = EarSigner.load(
            config.signing_key_path.read_bytes(),
            build=config.verifier_id,
            profile=config.ear_profile,
        )
        trust = (
            TrustStore.load(config.trust_roots, config.intermediates)
            if config.trust_roots
            else None
        )
        options = EkValidationOptions(
            allow_sha1=config.allow_sha1_chains,
            allow_expired_intermediates=config.allow_expired_intermediates,
        )
        limits = ImaLimits(
            max_list_bytes=config.ima_max_delta_bytes, max_entries=config.ima_max_delta_entries
        )
        return cls(trust, options, signer, config.verifier_id, config.default_pcr_selection, limits)

    # -- registration ------------------------------------------------------------------

    def object_name(self, public: bytes) -> bytes:
        return parse_public(public, "ak_public").name

    def check_registration(
        self, request: RegistrationRequest, *, allow_bare_ek: bool
    ) -> CheckedRegistration:
        ak = parse_public(request.ak_public, "ak_public")
        # AK attributes (verifier.quote step 1): a non-restricted or decrypting
        # key could sign a forged TPMS_ATTEST. Checked once, here; quotes are
        # then verified with the stored key.
        check_ak_attributes(Public.load(request.ak_public))
        identity: dict[str, Any] = {}
        cert_der: bytes | None = None
        vm_id: str | None = None
        if request.ek_certificate is not None:
            cert_der = request.ek_certificate
            if request.ek_public is None:
                raise ParseError("RegistrationRequest", "ek_public", 0, "needed with the cert")
            ek = parse_public(request.ek_public, "ek_public")
            if self._trust is None:
                raise VerificationError(
                    "ek.chain", "no trust roots configured in the verifier home"
                )
            # chain to a trusted root, TCG EK profile, and "the cert's key is this EK"
            validated = validate_ek_certificate(
                cert_der, self._trust, ek_public=ek.key, options=self._ek_options
            )
            leaf = validated.certificate
            vm_id = _vm_id(validated.vm_identity)
            identity = {
                "subject": leaf.subject,
                "issuer": leaf.issuer,
                "serial": format(leaf.serial_number, "x"),
                "not_after": leaf.not_after.isoformat(),
                "anchor": validated.anchor.subject,
                "tpm_manufacturer": validated.tpm_manufacturer,
                "tpm_model": validated.tpm_model,
                "tpm_version": validated.tpm_version,
                "vm_identity": _vm_identity(validated.vm_identity),
                "warnings": list(validated.warnings),
                "trust": "ek-certificate",
            }
        else:
            if not allow_bare_ek:
                raise VerificationError(
                    "ek.trust", "an EK without certificate is only accepted from the admin"
                )
            assert request.ek_public is not None
            ek = parse_public(request.ek_public, "ek_public")
            identity = {"trust": "ek-public (admin)"}
        if ek.attributes & ObjectAttributes.SIGN_ENCRYPT or not (
            ek.attributes & ObjectAttributes.DECRYPT
        ):
            raise VerificationError("ek.attributes", "an EK is a restricted decryption key")
        return CheckedRegistration(
            ek_public=ek.raw,
            ek_fingerprint=hashlib.sha256(ek.area).hexdigest(),
            ek_certificate=cert_der,
            identity=identity,
            vm_id=vm_id,
            ak_public=ak.raw,
            ak_name=ak.name,
        )

    def make_credential(
        self, ek_public: bytes, ak_name: bytes, secret: bytes
    ) -> CredentialChallenge:
        """TPM2_MakeCredential in software (verifier.credential), as marshalled TPM2Bs."""
        cred = make_credential(ek_public[2:], ak_name, secret)  # TPMT_PUBLIC of the EK
        return CredentialChallenge(
            len(cred.credential_blob).to_bytes(2, "big") + cred.credential_blob,
            len(cred.encrypted_secret).to_bytes(2, "big") + cred.encrypted_secret,
        )

    # -- policies ----------------------------------------------------------------------

    def load_policy(self, body: str) -> Policy:
        """A ``verifier.policy`` document (YAML or JSON); PolicyParseError names the path."""
        cached = self._policy_cache.get(body)
        if cached is not None:
            return cached
        policy = Policy.load(body)
        self._policy_cache[body] = policy
        while len(self._policy_cache) > 256:
            self._policy_cache.popitem(last=False)
        return policy

    def check_policy(self, body: str) -> dict[str, tuple[int, ...]]:
        """Parse the policy; the PCR selection a challenge under it asks for."""
        policy = self.load_policy(body)
        needed = policy_pcrs(policy, tuple(self._default_selection))
        merged: dict[str, set[int]] = {b: set(p) for b, p in self._default_selection.items()}
        for bank, pcrs in needed.items():
            merged.setdefault(bank, set()).update(pcrs)
        return {bank: tuple(sorted(p)) for bank, p in sorted(merged.items())}

    def policy_id(self, body: str) -> str:
        return self.load_policy(body).id

    def runtime_policy_digest(self, body: str) -> str | None:
        runtime = self.load_policy(body).runtime
        return None if runtime is None else runtime.digest.hex()

    # -- evidence ----------------------------------------------------------------------

    def _ak(self, ak_public: bytes) -> ParsedPublic:
        ak = self._ak_cache.get(ak_public)
        if ak is None:
            ak = parse_public(ak_public, "ak_public")
            self._ak_cache[ak_public] = ak
            while len(self._ak_cache) > 4096:
                self._ak_cache.popitem(last=False)
        return ak

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
        """``now``: the appraisal time (the service's clock) that ``valid_until`` values
        of the policy are held against; the wall clock when None. ``ima_state`` and
        ``appraise_runtime``: step 4 (the Appraiser protocol in ports.py)."""
        ak = self._ak(ak_public)
        # malformed structures are a 400 before anything is consumed or recorded
        attest = Attest.parse(evidence.quote)
        signature = Signature.parse(evidence.signature)
        log = EventLog.parse(evidence.event_log) if evidence.event_log is not None else None
        pcrs = PcrValues(evidence.pcrs)
        if policy_body is None:
            bare = self._without_policy(ak, attest, signature, pcrs, nonce, log, selection)
            return _ima_ignored(bare, evidence, "no policy assigned")
        policy = self.load_policy(policy_body)
        # the AK's attributes were checked at registration (check_registration)
        result = self._appraiser.appraise(
            Evidence(evidence.quote, signature, pcrs, log),
            policy,
            nonce=nonce,
            ak=ak.public,
            require_ak_attributes=False,
            now=now,
        )
        appraisal = self._from_result(result, attest, selection)
        if policy.runtime is None:
            return _ima_ignored(appraisal, evidence, "the policy has no runtime part")
        if not appraise_runtime:
            return replace(
                appraisal,
                warnings=(
                    *appraisal.warnings,
                    {"message": "runtime (IMA) part not appraised: no IMA list with this evidence"},
                ),
                ima={"runtime_policy_id": policy.runtime.id, "appraised": False},
            )
        if appraisal.clock is None:  # the quote did not verify: its PCR 10 proves nothing
            return replace(
                appraisal,
                ima={
                    "runtime_policy_id": policy.runtime.id,
                    "appraised": False,
                    "failure": "the quote did not verify",
                },
            )
        # step 4
        part = runtime_part(
            policy.runtime, attest, evidence, appraisal.clock, ima_state, self._ima_limits
        )
        vector = dict(appraisal.trust_vector)
        current = vector.get(EXECUTABLES, 0)
        if part.failures:
            vector[EXECUTABLES] = max(current, part.executables or Ar4si.CONTRAINDICATED_RUNTIME)
        elif current == Ar4si.APPROVED_BOOT:
            vector[EXECUTABLES] = Ar4si.APPROVED_RUNTIME  # boot and what ran since
        return replace(
            appraisal,
            status="contraindicated" if part.failures else appraisal.status,
            failures=(*appraisal.failures, *part.failures),
            warnings=(*appraisal.warnings, *part.warnings),
            trust_vector=vector,
            ima=part.report,
            ima_state=part.state,
        )

    @staticmethod
    def _selection_failure(
        attest: Attest, selection: dict[str, tuple[int, ...]]
    ) -> dict[str, Any] | None:
        """Step 3a: the quote covers exactly what the challenge asked for."""
        assert isinstance(attest.attested, QuoteInfo)
        wanted = {bank: frozenset(p) for bank, p in selection.items() if p}
        got = attest.attested.pcr_select.as_sets()
        if got == wanted:
            return None
        return {
            "rule": "quote.pcr_select",
            "claim": INSTANCE_IDENTITY,
            "message": "the quote does not select the PCRs the challenge asked for",
            "expected": _selection_text(wanted),
            "actual": _selection_text(dict(got)),
            "event": None,
        }

    def _from_result(
        self, result: AppraisalResult, attest: Attest, selection: dict[str, tuple[int, ...]]
    ) -> Appraisal:
        failures = [f.to_json() for f in result.failures]
        vector = result.trust_vector
        status = result.status
        clock: ClockInfo | None = None
        if result.quote is not None:  # the quote verified: these bytes are the TPM's
            q = result.quote
            clock = ClockInfo(q.clock, q.reset_count, q.restart_count, q.safe)
            bad = self._selection_failure(attest, selection)
            if bad is not None:
                failures.insert(0, bad)
                vector = TrustVector(
                    instance_identity=Ar4si.UNEXPECTED_EVIDENCE,
                    configuration=vector.configuration,
                    executables=vector.executables,
                )
                status = "contraindicated"
        return Appraisal(
            status=status,
            failures=tuple(failures),
            warnings=tuple({"message": w} for w in result.warnings),
            trust_vector=vector.to_json(),
            clock=clock,
            quote_verified=result.quote is not None,
            policy_id=result.policy_id,
        )

    def _without_policy(
        self,
        ak: ParsedPublic,
        attest: Attest,
        signature: Signature,
        pcrs: PcrValues,
        nonce: bytes,
        log: EventLog | None,
        selection: dict[str, tuple[int, ...]],
    ) -> Appraisal:
        """No policy assigned: quote and log replay only; at best ``warning``."""
        warnings: list[dict[str, Any]] = [{"message": "no policy assigned"}]
        try:
            verified = verify_quote(
                ak.public, attest.raw, signature, pcrs, nonce, require_ak_attributes=False
            )
        except VerificationError as exc:
            failure = {
                "rule": exc.check,
                "claim": INSTANCE_IDENTITY,
                "message": exc.message,
                "expected": "a valid check",
                "actual": "failed",
                "event": None,
            }
            return Appraisal(
                status="contraindicated",
                failures=(failure,),
                trust_vector={INSTANCE_IDENTITY: Ar4si.CRYPTO_VALIDATION_FAILED},
            )
        ci = verified.clock_info
        clock = ClockInfo(ci.clock, ci.reset_count, ci.restart_count, ci.safe)
        failures: list[dict[str, Any]] = []
        vector: dict[str, int] = {INSTANCE_IDENTITY: Ar4si.TRUSTWORTHY_INSTANCE}
        bad = self._selection_failure(attest, selection)
        if bad is not None:
            failures.append(bad)
            vector[INSTANCE_IDENTITY] = Ar4si.UNEXPECTED_EVIDENCE
        if log is not None:
            try:
                replayed = log.verify(verified.pcrs.values)
                warnings.extend({"message": w} for w in replayed.warnings)
            except VerificationError as exc:
                failures.append(
                    {
                        "rule": exc.check,
                        "claim": EXECUTABLES,
                        "message": exc.message,
                        "expected": "the log replays to the quoted PCRs",
                        "actual": "it does not",
                        "event": None,
                    }
                )
                vector[EXECUTABLES] = vector[CONFIGURATION] = Ar4si.CRYPTO_VALIDATION_FAILED
        return Appraisal(
            status="contraindicated" if failures else "warning",
            failures=tuple(failures),
            warnings=tuple(warnings),
            trust_vector=vector,
            clock=clock,
            quote_verified=True,
            policy_id=None,
        )

    # -- results -----------------------------------------------------------------------

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
        """The EAR (``verifier.ear.EarSigner``): every failing rule and lineage flag in
        ``vtpm.failures``; a flagged attester's instance-identity is untrustworthy.
        ``reappraisal``: the ``vtpm.reappraisal`` claim of a re-appraisal (issue 20)."""
        vector = TrustVector.from_json(appraisal.trust_vector)
        summaries = [_summary(f) for f in appraisal.failures]
        for flag in flags:
            summaries.append(
                {
                    "rule": f"lineage.{flag.get('flag')}",
                    "claim": INSTANCE_IDENTITY,
                    "message": str(flag.get("detail", "")),
                }
            )
        if flags:
            vector = TrustVector(
                instance_identity=Ar4si.UNTRUSTWORTHY_INSTANCE,
                configuration=vector.configuration,
                executables=vector.executables,
            )
        verdict = _Verdict(status, vector, tuple(summaries))
        return self._signer.sign(
            verdict, nonce, attester_id, appraisal.policy_id or "none", reappraisal=reappraisal
        )

    def ear_as(self, token: str, profile: str | None = None) -> str:
        """A stored EAR in ``profile`` (None: the configured ``ear_profile``).

        Unchanged when already in it; otherwise verified with the signing key
        and re-signed under the other profile's names (``EarSigner.reprofile``:
        same verdict, same ``iat``). A stored EAR the key does not verify (a
        rotated key, a changed row) is refused, never re-signed (StateError)."""
        try:
            return self._signer.reprofile(token, profile)
        except (VerificationError, ParseError) as exc:
            raise StateError(
                f"a stored EAR cannot be served in {profile or self._signer.profile!r}: {exc}"
            ) from None

    def jwks(self) -> dict[str, Any]:
        return dict(self._signer.jwks())
