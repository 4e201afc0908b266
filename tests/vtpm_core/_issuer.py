"""A small, real X.509 issuer for vtpm_core tests (the project CA lives in ``ca``).

It signs EK certificates with an ECDSA P-256 key so the vTPM core can be
tested against the EkCertificateIssuer protocol on its own; the CLI tests use
the project's CA (``ca.issuer.LocalCaIssuer``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vtpm_core.errors import ConflictError, NotFoundError
from vtpm_core.issuer import EkCertificateRequest, IssuedEkCertificate
from vtpm_core.tpm.public import Public


@dataclass
class SmallIssuer:
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    requests: list[EkCertificateRequest] = field(default_factory=list)
    issued: dict[int, bytes] = field(default_factory=dict)
    revoked: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test EK CA")])
        now = dt.datetime.now(dt.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def chain_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        self.requests.append(request)
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_cert.subject)
            .public_key(Public.parse_tpm2b(request.ek_public).public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DirectoryName(
                            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.vm_name)])
                        )
                    ]
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        der = cert.public_bytes(serialization.Encoding.DER)
        self.issued[serial] = der
        return IssuedEkCertificate(serial, der, self.chain_pem)

    def revoke_ek_certificate(self, serial: int, reason: str) -> None:
        if serial not in self.issued:
            raise NotFoundError(f"no certificate {serial:x}")
        if reason != "cessation-of-operation":
            raise ConflictError(f"unknown revocation reason {reason!r}")
        if any(s == serial for s, _ in self.revoked):
            raise ConflictError(f"certificate {serial:x} already revoked")
        self.revoked.append((serial, reason))
