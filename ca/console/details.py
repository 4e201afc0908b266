"""What the CA console shows of one certificate and of the CRL, as JSON-ready dicts.

A certificate's fields are read from the DER the ledger holds (the bytes that were
signed and handed out), not re-derived from the ledger columns; the VM identity
extension is decoded with :class:`vtpm_core.vm_identity.VmIdentity`. The CRL is the one
``GET /v1/crl`` serves at this moment (built from the ledger, signed), parsed back and
checked against the CA key and the ledger's revoked count.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.home import OpenedCa
from ca.ledger import CertRecord
from vtpm_core.errors import ParseError
from vtpm_core.vm_identity import VM_IDENTITY_OID, VmIdentity

__all__ = ["certificate_detail", "crl_state", "record_row"]

# TCG EK Credential Profile 2.0 section 3.2.9: the SAN directoryName attributes
_TCG_ATTRIBUTES = {
    "2.23.133.2.1": "tpmManufacturer",
    "2.23.133.2.2": "tpmModel",
    "2.23.133.2.3": "tpmVersion",
}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def record_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row (``Ledger.search``) as the console's JSON: times in ISO 8601."""
    return {
        "serial": row["serial"],
        "status": row["status"],
        "vm_id": row["vm_id"],
        "vm_name": row["vm_name"],
        "vtpm_instance_id": row["vtpm_instance_id"],
        "ek_name": row["ek_name"],
        "ek_template": row["ek_template"],
        "key_type": row["key_type"],
        "not_before": _iso(row["not_before"]),
        "not_after": _iso(row["not_after"]),
        "issued_at": _iso(row["created_at"]),
        "revoked_at": _iso(row["revoked_at"]),
        "revocation_reason": row["revocation_reason"],
    }


def _name(name: x509.Name) -> str:
    parts = []
    for attribute in name:
        label = _TCG_ATTRIBUTES.get(attribute.oid.dotted_string)
        if label is None:
            label = attribute.oid._name if attribute.oid._name != "Unknown OID" else None
        value = attribute.value if isinstance(attribute.value, str) else attribute.value.hex()
        parts.append(f"{label or attribute.oid.dotted_string}={value}")
    return ", ".join(parts)


def _extension(ext: x509.Extension[x509.ExtensionType]) -> dict[str, Any]:
    value = ext.value
    shown: Any
    if ext.oid.dotted_string == VM_IDENTITY_OID:
        assert isinstance(value, x509.UnrecognizedExtension)
        try:
            identity = VmIdentity.parse(value.value)
        except ParseError as exc:
            shown = f"undecodable: {exc}"
        else:
            shown = {
                "vm_id": str(identity.vm_id),
                "vm_name": identity.vm_name,
                "vtpm_instance_id": identity.vtpm_instance_id,
                "created_at": identity.created_at.isoformat(),
            }
        name = "vmIdentity (vtpm-trust)"
    elif isinstance(value, x509.SubjectAlternativeName):
        shown = [
            _name(n) if isinstance(n, x509.Name) else str(n)
            for n in value.get_values_for_type(x509.DirectoryName)
        ] + [str(n.value) for n in value if not isinstance(n, x509.DirectoryName)]
        name = "subjectAltName"
    elif isinstance(value, x509.UnrecognizedExtension):
        shown = value.value.hex()
        name = _UNNAMED.get(ext.oid.dotted_string, ext.oid.dotted_string)
    else:
        shown = _value(value)
        name = ext.oid._name
    return {"oid": ext.oid.dotted_string, "name": name, "critical": ext.critical, "value": shown}


# extensions cryptography does not decode; TCG EK Credential Profile 2.0 section 3.2.8
_UNNAMED = {"2.5.29.9": "subjectDirectoryAttributes (tpmSpecification)"}
_KEY_PURPOSES = {"2.23.133.8.1": "tcg-kp-EKCertificate"}
_KEY_USAGES = (
    "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
    "key_agreement", "key_cert_sign", "crl_sign",
)  # fmt: skip


def _value(value: x509.ExtensionType) -> str:
    """An extension's value as an operator reads it (cryptography's repr otherwise)."""
    if isinstance(value, x509.BasicConstraints):
        return f"CA: {'yes' if value.ca else 'no'}" + (
            f", path length {value.path_length}" if value.path_length is not None else ""
        )
    if isinstance(value, x509.KeyUsage):
        return ", ".join(u for u in _KEY_USAGES if getattr(value, u))
    if isinstance(value, x509.AuthorityKeyIdentifier):
        return value.key_identifier.hex() if value.key_identifier else str(value)
    if isinstance(value, x509.SubjectKeyIdentifier):
        return value.digest.hex()
    if isinstance(value, x509.ExtendedKeyUsage):
        return ", ".join(
            _KEY_PURPOSES.get(o.dotted_string, o._name) + f" ({o.dotted_string})" for o in value
        )
    return str(value)


def _key(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECC {key.curve.name}"
    return type(key).__name__


def certificate_detail(ca: OpenedCa, record: CertRecord) -> dict[str, Any]:
    """The ledger row, the VMs bound to its EK, and the certificate as signed."""
    bindings = ca.ledger.bindings_of(record)
    detail: dict[str, Any] = {
        "serial": f"{record.serial:x}",
        "status": record.status,
        "vm_id": record.vm_id,
        "vm_name": record.vm_name,
        "vtpm_instance_id": record.vtpm_instance_id,
        "ek_name": record.ek_name,
        "ek_public_sha256": record.ek_public_sha256,
        "ek_template": record.ek_template,
        "key_type": record.key_type,
        "not_before": record.not_before.isoformat(),
        "not_after": record.not_after.isoformat(),
        "revoked_at": _iso(record.revoked_at),
        "revocation_reason": record.revocation_reason,
        "bindings": [{"vm_id": vm, "kind": kind} for vm, kind in sorted(bindings.items())],
        "certificate": None,
    }
    if record.certificate_der is not None:
        cert = x509.load_der_x509_certificate(record.certificate_der)
        detail["certificate"] = {
            "issuer": cert.issuer.rfc4514_string(),
            "subject": cert.subject.rfc4514_string(),
            "serial": f"{cert.serial_number:x}",
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "signature_algorithm": cert.signature_algorithm_oid._name,
            "public_key": _key(cert),
            "sha256": hashlib.sha256(record.certificate_der).hexdigest(),
            "extensions": [_extension(e) for e in cert.extensions],
            "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        }
    return detail


def crl_state(ca: OpenedCa) -> dict[str, Any]:
    """The CRL as served now, parsed back, beside what the ledger says it must list."""
    der = ca.revocation.crl()
    crl = x509.load_der_x509_crl(der)
    summary = ca.ledger.revocation_summary()
    revoked = sum(summary["reasons"].values())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    entries = len(crl)
    return {
        "issuer": crl.issuer.rfc4514_string(),
        "this_update": crl.last_update_utc.isoformat(),
        "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
        "crl_number": number,
        "entries": entries,
        "revoked_in_ledger": revoked,
        "complete": entries == revoked,
        "signature_valid": crl.is_signature_valid(ca.material.certificate.public_key()),  # type: ignore[arg-type]
        "signature_algorithm": crl.signature_algorithm_oid._name,
        "size_bytes": len(der),
        "sha256": hashlib.sha256(der).hexdigest(),
        "validity_days": ca.crl_validity.days,
        "reasons": dict(sorted(summary["reasons"].items())),
        "latest_revocation": _iso(summary["latest"]),
        "crl_url": ca.profile.crl_url,
        "ocsp_url": ca.profile.ocsp_url,
    }
