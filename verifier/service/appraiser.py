"""The service's appraiser: EK chain, AK attributes, MakeCredential, quote, event log, policy, EAR.

Library use (issue 5): ``verifier.ekcert`` validates EK certificates (path to
the configured roots, TCG EK profile, key match, VM identity);
``verifier.credential`` makes credentials; ``verifier.quote`` checks AK
attributes (at registration) and verifies quotes (signature over the received
bytes, magic, type, nonce, pcrSelect, pcrDigest); ``verifier.eventlog``
replays logs. INTERIM, until ``verifier.policy`` and ``verifier.ear`` land:
a literal-PCR policy and ES256 EAR signing live here.

Appraisal steps:
  1-5. ``verify_quote`` with the activated AK, the challenge nonce and the
       supplied PCR values;
  5a.  the quote's selection equals the challenge's (the policy's PCRs);
  6.   the event log (if any) replays to the supplied values;
  7.   the policy's reference values, every failing rule reported.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# PcrValues moves to vtpm_core.tpm with the rest of the TPM structure layer
from verifier._tpm_interim import Attest, PcrValues, Public, Signature
from verifier.credential import make_credential
from verifier.ekcert import (
    EkValidationOptions,
    TrustStore,
    VmIdentityExtension,
    validate_ek_certificate,
)
from verifier.quote import check_ak_attributes, verify_quote
from verifier.service.config import ServiceConfig
from verifier.service.messages import EvidenceRequest, RegistrationRequest, parse_pcrs
from verifier.service.ports import Appraisal, CheckedRegistration, ClockInfo, CredentialChallenge
from vtpm_core.errors import ConfigError, ParseError, VerificationError

__all__ = ["LibraryAppraiser", "parse_public"]

_HASHES: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    0x0004: ("sha1", hashes.SHA1),
    0x000B: ("sha256", hashes.SHA256),
    0x000C: ("sha384", hashes.SHA384),
    0x000D: ("sha512", hashes.SHA512),
}
_CURVES: dict[int, ec.EllipticCurve] = {
    0x0003: ec.SECP256R1(),
    0x0004: ec.SECP384R1(),
    0x0005: ec.SECP521R1(),
}
_ALG_RSA, _ALG_ECC = 0x0001, 0x0023
# TPMA_OBJECT bits (Part 2, 8.3.2)
_DECRYPT, _SIGN = 1 << 17, 1 << 18
_AR4SI_AFFIRMING, _AR4SI_WARNING, _AR4SI_CONTRA, _AR4SI_NONE = 2, 32, 96, 0


@dataclass(frozen=True, slots=True)
class _Public:
    raw: bytes  # TPM2B_PUBLIC
    area: bytes  # TPMT_PUBLIC
    type: int
    name_alg: int
    attributes: int
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def name(self) -> bytes:
        hname, _hcls = _HASHES.get(self.name_alg, ("?", hashes.SHA256))
        if hname == "?":
            raise ParseError("TPMT_PUBLIC", "nameAlg", 2, f"unsupported 0x{self.name_alg:04x}")
        return self.name_alg.to_bytes(2, "big") + hashlib.new(hname, self.area).digest()


def parse_public(raw: bytes, what: str) -> _Public:
    """TPM2B_PUBLIC -> key and attributes (Part 2, 12.2.5); ParseError when malformed."""
    from tpm2_pytss.types import TPM2B_PUBLIC

    try:
        pub, used = TPM2B_PUBLIC.unmarshal(raw)
    except Exception as exc:  # tpm2-pytss raises its own TSS2_Exception
        raise ParseError("TPM2B_PUBLIC", what, 0, f"does not unmarshal: {exc}") from None
    if used != len(raw):
        raise ParseError("TPM2B_PUBLIC", what, used, f"{len(raw) - used} trailing bytes")
    area = pub.publicArea
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if area.type == _ALG_RSA:
        n = int.from_bytes(bytes(area.unique.rsa), "big")
        e = int(area.parameters.rsaDetail.exponent) or 65537
        if n == 0:
            raise ParseError("TPM2B_PUBLIC", f"{what}.unique.rsa", 0, "empty modulus")
        key = rsa.RSAPublicNumbers(e, n).public_key()
    elif area.type == _ALG_ECC:
        curve = _CURVES.get(int(area.parameters.eccDetail.curveID))
        if curve is None:
            raise ParseError("TPM2B_PUBLIC", f"{what}.curveID", 0, "unsupported curve")
        x = int.from_bytes(bytes(area.unique.ecc.x), "big")
        y = int.from_bytes(bytes(area.unique.ecc.y), "big")
        try:
            key = ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError as exc:
            raise ParseError("TPM2B_PUBLIC", f"{what}.unique.ecc", 0, str(exc)) from None
    else:
        raise ParseError("TPM2B_PUBLIC", f"{what}.type", 2, f"unsupported 0x{int(area.type):04x}")
    return _Public(raw, raw[2:], int(area.type), int(area.nameAlg), int(area.objectAttributes), key)


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


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


class LibraryAppraiser:
    """The :class:`~verifier.service.ports.Appraiser` the service runs with."""

    def __init__(
        self,
        trust: TrustStore | None,
        ek_options: EkValidationOptions,
        signing_key: ec.EllipticCurvePrivateKey,
        verifier_id: str,
    ) -> None:
        self._trust = trust
        # parsed AK publics by their wire bytes (immutable values; per app instance)
        self._ak_cache: dict[bytes, _Public] = {}
        # parsed policies by their text (never mutated after parsing)
        self._policy_cache: dict[str, dict[str, Any]] = {}
        self._ek_options = ek_options
        self._key = signing_key
        self._verifier_id = verifier_id
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing_key.public_key()))
        thumb_input = json.dumps(
            {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
        )
        # RFC 7638 JWK thumbprint as the key id
        self._kid = (
            base64.urlsafe_b64encode(hashlib.sha256(thumb_input.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        self._jwks = {"keys": [{**jwk, "kid": self._kid, "alg": "ES256", "use": "sig"}]}

    @classmethod
    def from_config(cls, config: ServiceConfig) -> LibraryAppraiser:
        assert config.signing_key_path is not None
        key = serialization.load_pem_private_key(config.signing_key_path.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{config.signing_key_path}: expected an EC private key")
        trust = (
            TrustStore.load(config.trust_roots, config.intermediates)
            if config.trust_roots
            else None
        )
        options = EkValidationOptions(
            allow_sha1=config.allow_sha1_chains,
            allow_expired_intermediates=config.allow_expired_intermediates,
        )
        return cls(
            trust,
            options,
            key,
            config.verifier_id,
        )

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
        if ek.attributes & _SIGN or not ek.attributes & _DECRYPT:
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

    def _load_policy(self, body: str) -> dict[str, Any]:
        cached = self._policy_cache.get(body)
        if cached is not None:
            return cached
        doc = self._parse_policy(body)
        if len(self._policy_cache) >= 256:
            self._policy_cache.clear()
        self._policy_cache[body] = doc
        return doc

    def _parse_policy(self, body: str) -> dict[str, Any]:
        try:
            doc = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            raise ParseError("Policy", "body", 0, f"not YAML/JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ParseError("Policy", "body", 0, "expected a mapping")
        extra = set(doc) - {"schema", "name", "pcrs", "require_event_log"}
        if extra:
            raise ParseError("Policy", sorted(extra)[0], 0, "unknown key")
        if "pcrs" not in doc:
            raise ParseError("Policy", "pcrs", 0, "a policy needs reference PCR values")
        return doc

    def check_policy(self, body: str) -> dict[str, tuple[int, ...]]:
        doc = self._load_policy(body)
        pcrs = parse_pcrs(doc["pcrs"], "Policy")
        return {bank: tuple(sorted(v)) for bank, v in pcrs.items()}

    # -- evidence ----------------------------------------------------------------------

    def appraise(
        self,
        *,
        ak_public: bytes,
        nonce: bytes,
        evidence: EvidenceRequest,
        selection: dict[str, tuple[int, ...]],
        policy_body: str | None,
    ) -> Appraisal:
        failures: list[dict[str, Any]] = []
        warnings: list[dict[str, Any]] = []
        ak = self._ak_cache.get(ak_public)
        if ak is None:
            ak = parse_public(ak_public, "ak_public")
            if len(self._ak_cache) >= 4096:
                self._ak_cache.clear()  # a bound, not an LRU: refills from the next requests
            self._ak_cache[ak_public] = ak
        # malformed structures are a 400 before anything is consumed or recorded
        Attest.parse(evidence.quote)
        signature = Signature.parse(evidence.signature)
        clock: ClockInfo | None = None
        try:
            # steps 1-5: verifier.quote (signature over the received bytes, magic,
            # type, nonce, pcrSelect == supplied values, pcrDigest). The AK's
            # attributes were checked at registration (check_registration).
            verified = verify_quote(
                ak.key,
                evidence.quote,
                signature,
                PcrValues(evidence.pcrs),
                nonce,
                require_ak_attributes=False,
            )
            # ... and the quote covers exactly what the challenge asked for
            wanted = {bank: frozenset(p) for bank, p in selection.items() if p}
            if verified.pcr_selection.as_sets() != wanted:
                raise VerificationError(
                    "quote.pcr_select",
                    f"the quote selects {verified.pcr_selection}, the challenge asked for "
                    + "+".join(f"{b}:{','.join(map(str, sorted(p)))}" for b, p in wanted.items()),
                )
            ci = verified.clock_info
            clock = ClockInfo(ci.clock, ci.reset_count, ci.restart_count, ci.safe)
        except VerificationError as exc:
            failures.append({"rule": exc.check, "message": exc.message})
            return Appraisal(
                status="contraindicated",
                failures=tuple(failures),
                trust_vector={"instance-identity": _AR4SI_CONTRA},
                clock=None,
                quote_verified=False,
            )
        log_ok: bool | None = None
        if evidence.event_log is not None:  # step 6
            from verifier.eventlog import EventLog

            log = EventLog.parse(evidence.event_log)
            try:
                replayed = log.verify(evidence.pcrs)
                log_ok = True
                warnings.extend({"rule": "eventlog", "message": w} for w in replayed.warnings)
            except VerificationError as exc:
                log_ok = False
                failures.append({"rule": exc.check, "message": exc.message})
        executables = _AR4SI_NONE
        if policy_body is not None:  # step 7
            doc = self._load_policy(policy_body)
            expected = parse_pcrs(doc["pcrs"], "Policy")
            for bank, values in expected.items():
                for index, want in sorted(values.items()):
                    got = evidence.pcrs.get(bank, {}).get(index)
                    if got is None or not hmac.compare_digest(got, want):
                        failures.append(
                            {
                                "rule": f"policy.pcr.{bank}.{index}",
                                "message": f"PCR {index} {bank}: expected {want.hex()}, "
                                f"got {got.hex() if got else 'nothing'}",
                                "expected": want.hex(),
                                "actual": got.hex() if got else None,
                            }
                        )
            if doc.get("require_event_log") and log_ok is None:
                failures.append({"rule": "policy.event_log", "message": "no event log given"})
            executables = _AR4SI_CONTRA if failures else _AR4SI_AFFIRMING
        else:
            warnings.append({"rule": "policy", "message": "no policy assigned"})
        status = "contraindicated" if failures else ("affirming" if policy_body else "warning")
        return Appraisal(
            status=status,
            failures=tuple(failures),
            warnings=tuple(warnings),
            trust_vector={
                "instance-identity": _AR4SI_AFFIRMING,
                "hardware": _AR4SI_AFFIRMING,
                "executables": executables,
                "configuration": _AR4SI_CONTRA if log_ok is False else _AR4SI_AFFIRMING,
            },
            clock=clock,
            quote_verified=True,
        )

    # -- results -----------------------------------------------------------------------

    def sign_result(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})

    def jwks(self) -> dict[str, Any]:
        return self._jwks
