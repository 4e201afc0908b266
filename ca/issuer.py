"""The CA as an :class:`vtpm_core.issuer.EkCertificateIssuer`, in-process.

The CLI wires this to ``vtpm create --ca-home DIR``. It opens the CA home
(key, ledger) once and issues through the same two-step path as the HTTP API.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from ca.ek import CertifiableEk
from ca.home import CaHome, OpenedCa
from ca.issuance import IssueRequest
from ca.profile import render_tpm_id
from vtpm_core.issuer import EkCertificateRequest, IssuedEkCertificate

__all__ = ["LocalCaIssuer", "to_issue_request"]


def to_issue_request(request: EkCertificateRequest) -> IssueRequest:
    """Map the vTPM core's request to the CA's; the EK is checked against the templates."""
    return IssueRequest(
        ek=CertifiableEk.load(request.ek_public, allow_bare_key=False),
        vm_id=request.vm_id,
        vm_name=request.vm_name,
        vtpm_instance_id=request.vtpm_instance_id,
        tpm_manufacturer=render_tpm_id(request.tpm_manufacturer, "tpm_manufacturer"),
        tpm_model=request.tpm_model or None,
        tpm_version=render_tpm_id(request.tpm_version, "tpm_version"),
        clone_of=request.clone_of,
    )


class LocalCaIssuer:
    """Issues EK certificates with a CA opened from its home directory."""

    def __init__(self, ca: OpenedCa) -> None:
        self.ca = ca

    @classmethod
    def open(
        cls,
        home: Path,
        *,
        passphrase: bytes | None = None,
        pin: str | None = None,
        database: str | None = None,
    ) -> LocalCaIssuer:
        return cls(CaHome(home).open(passphrase=passphrase, pin=pin, database=database))

    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        result = self.ca.issuance.issue(to_issue_request(request))
        return IssuedEkCertificate(result.record.serial, result.certificate_der, result.chain_pem)

    def revoke_ek_certificate(self, serial: int, reason: str) -> None:
        self.ca.revocation.revoke(serial, reason)

    def close(self) -> None:
        self.ca.close()

    def __enter__(self) -> LocalCaIssuer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
