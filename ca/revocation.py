"""Revocation: revoke in the ledger, CRLs (RFC 5280 section 5) and OCSP (RFC 6960).

Both answers come from the ledger at the moment they are asked; nothing is
cached. The OCSP responder is the CA itself (RFC 6960 section 4.2.2.2: the
issuing CA may sign responses), identified by key hash. A serial the ledger
never issued is answered ``unknown`` (section 2.2), never ``good``; a request
for another issuer is answered ``unauthorized`` (section 2.3).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from asn1crypto import core as asn1
from asn1crypto import ocsp as aocsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp

from ca.der import replace_signature, tbs_of
from ca.issuance import CaMaterial
from ca.ledger import REASONS, CertRecord, Ledger
from vtpm_core.errors import ParseError

__all__ = ["REASON_FLAGS", "Revocation"]

REASON_FLAGS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "ca-compromise": x509.ReasonFlags.ca_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "certificate-hold": x509.ReasonFlags.certificate_hold,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aa-compromise": x509.ReasonFlags.aa_compromise,
}
assert set(REASON_FLAGS) == set(REASONS)

_OCSP_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Revocation:
    material: CaMaterial
    ledger: Ledger
    crl_validity: dt.timedelta = dt.timedelta(days=7)
    ocsp_validity: dt.timedelta = dt.timedelta(hours=1)
    clock: Callable[[], dt.datetime] = _now

    def revoke(self, serial: int, reason: str) -> CertRecord:
        return self.ledger.revoke(serial, reason, self.clock().replace(microsecond=0))

    def _aki(self) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.material.key.public_key)

    def crl(self) -> bytes:
        """A complete CRL (DER) of every revoked certificate; CRL number = issuance ms."""
        now = self.clock().replace(microsecond=0)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.material.certificate.subject)
            .last_update(now)
            .next_update(now + self.crl_validity)
            .add_extension(x509.CRLNumber(int(self.clock().timestamp() * 1000)), critical=False)
            .add_extension(self._aki(), critical=False)
        )
        for record in self.ledger.revoked():
            assert record.revoked_at is not None and record.revocation_reason is not None
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(record.serial)
                .revocation_date(record.revoked_at)
            )
            if record.revocation_reason != "unspecified":  # RFC 5280 5.3.1: omit unspecified
                entry = entry.add_extension(
                    x509.CRLReason(REASON_FLAGS[record.revocation_reason]), critical=False
                )
            builder = builder.add_revoked_certificate(entry.build())
        key = self.material.key
        stand_in = builder.sign(key.stand_in, key.hash_algorithm).public_bytes(
            serialization.Encoding.DER
        )
        der, _ = replace_signature(stand_in, key.sign(tbs_of(stand_in)))
        return der

    def ocsp(self, request_der: bytes) -> bytes:
        """An OCSPResponse (DER) for one OCSP request; malformed -> ParseError."""
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            algorithm = request.hash_algorithm
            serial = request.serial_number
        except (ValueError, TypeError, Exception) as exc:
            raise ParseError(
                "OCSPRequest", "der", 0, f"not a single-certificate OCSP request: {exc}"
            ) from exc
        make_hash = _OCSP_HASHES.get(algorithm.name)
        if make_hash is None:
            return ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.MALFORMED_REQUEST
            ).public_bytes(serialization.Encoding.DER)
        name_hash, key_hash = self._issuer_hashes(algorithm.name)
        if not (
            hmac.compare_digest(name_hash, request.issuer_name_hash)
            and hmac.compare_digest(key_hash, request.issuer_key_hash)
        ):
            return ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.UNAUTHORIZED
            ).public_bytes(serialization.Encoding.DER)
        now = self.clock().replace(microsecond=0)
        record = self.ledger.find(serial)
        revocation_time = None
        reason = None
        if record is None or record.status == "pending":
            status = ocsp.OCSPCertStatus.UNKNOWN
        elif record.status == "revoked":
            status = ocsp.OCSPCertStatus.REVOKED
            revocation_time = record.revoked_at
            if record.revocation_reason != "unspecified":
                reason = REASON_FLAGS[str(record.revocation_reason)]
        else:
            status = ocsp.OCSPCertStatus.GOOD
        # cryptography's OCSP builder insists the responder certificate matches the
        # signing key, so the stand-in trick of ca.keys cannot be used here: the
        # BasicOCSPResponse (RFC 6960 4.2.1) is built with asn1crypto and signed once.
        if status == ocsp.OCSPCertStatus.GOOD:
            cert_status = aocsp.CertStatus(name="good", value=asn1.Null())
        elif status == ocsp.OCSPCertStatus.REVOKED:
            info: dict[str, object] = {"revocation_time": revocation_time}
            if reason is not None:
                info["revocation_reason"] = str(record.revocation_reason).replace("-", "_")  # type: ignore[union-attr]
            cert_status = aocsp.CertStatus(name="revoked", value=info)
        else:
            cert_status = aocsp.CertStatus(name="unknown", value=asn1.Null())
        single = {
            "cert_id": {
                "hash_algorithm": {"algorithm": algorithm.name},
                "issuer_name_hash": name_hash,
                "issuer_key_hash": key_hash,
                "serial_number": serial,
            },
            "cert_status": cert_status,
            "this_update": now,
            "next_update": now + self.ocsp_validity,
        }
        data: dict[str, object] = {
            "responder_id": aocsp.ResponderId(name="by_key", value=self._issuer_hashes("sha1")[1]),
            "produced_at": now,
            "responses": [single],
        }
        for ext in request.extensions:
            if isinstance(ext.value, x509.OCSPNonce):  # RFC 8954: echo the nonce
                data["response_extensions"] = [
                    {"extn_id": "nonce", "critical": False, "extn_value": ext.value.nonce}
                ]
        tbs = aocsp.ResponseData(data)
        key = self.material.key
        family = "rsa" if isinstance(key.public_key, rsa.RSAPublicKey) else "ecdsa"
        basic = aocsp.BasicOCSPResponse(
            {
                "tbs_response_data": tbs,
                "signature_algorithm": {"algorithm": f"{key.hash_algorithm.name}_{family}"},
                "signature": key.sign(tbs.dump()),
            }
        )
        return bytes(
            aocsp.OCSPResponse(
                {
                    "response_status": "successful",
                    "response_bytes": {"response_type": "basic_ocsp_response", "response": basic},
                }
            ).dump()
        )

    def _issuer_hashes(self, name: str) -> tuple[bytes, bytes]:
        # RFC 6960 4.1.1: hash of the issuer's DER Name and of its public key BIT STRING value
        cert = self.material.certificate
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        from ca.der import read_tlv

        _, content, _ = read_tlv(spki, 0)
        _, _, alg_end = read_tlv(spki, content)
        _, bits_start, bits_end = read_tlv(spki, alg_end)
        key_bits = spki[bits_start + 1 : bits_end]
        return (
            hashlib.new(name, cert.subject.public_bytes()).digest(),
            hashlib.new(name, key_bits).digest(),
        )
