"""The interface through which the vTPM core asks for EK certificates.

`vtpm_core` never imports the CA: the CLI wires an implementation of
:class:`EkCertificateIssuer` to it, either the CA in-process (``--ca-home``)
or the CA's HTTP API (``--ca-url`` + token). A third-party CA is not an
issuer: for it the vTPM exports a request and imports the signed result.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DeferredIssuer",
    "EkCertificateIssuer",
    "EkCertificateRequest",
    "IssuedEkCertificate",
    "OpenedIssuer",
]


@dataclass(frozen=True, slots=True)
class EkCertificateRequest:
    """What the CA needs to certify one EK of one vTPM.

    ``ek_public`` is the EK's TPM2B_PUBLIC wire encoding (as the TPM returned
    it from CreatePrimary). ``tpm_manufacturer`` and ``tpm_version`` are the
    TPM_PT_MANUFACTURER and TPM_PT_FIRMWARE_VERSION_1 property values; the CA
    renders them as ``id:%08X`` in the SAN. ``clone_of`` is set only for a
    clone by copy: the same EK is bound to a second VM on purpose.
    """

    ek_public: bytes
    vm_id: uuid.UUID
    vm_name: str
    vtpm_instance_id: str
    template_id: str
    tpm_manufacturer: int
    tpm_model: str
    tpm_version: int
    clone_of: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class IssuedEkCertificate:
    """A certificate the CA issued (or had issued before, for the same EK)."""

    serial: int
    certificate_der: bytes
    chain_pem: bytes


class EkCertificateIssuer(Protocol):
    """Certifies EKs and revokes their certificates."""

    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        """Certify ``request.ek_public``; the same EK again returns the same certificate."""
        ...

    def revoke_ek_certificate(self, serial: int, reason: str) -> None:
        """Revoke a certificate this issuer issued (RFC 5280 reason name)."""
        ...


class OpenedIssuer(EkCertificateIssuer, Protocol):
    def close(self) -> None: ...


class DeferredIssuer:
    """An issuer opened when first needed, or when :meth:`open` is called.

    `vtpm create --ca-home` opens the CA (about 60 ms of imports and key
    loading) while the TPM generates the RSA EK, instead of before starting
    the TPM: :meth:`VtpmStore.create`'s ``prepare`` calls :meth:`open`.
    """

    def __init__(self, opener: Callable[[], OpenedIssuer]) -> None:
        self._opener = opener
        self._issuer: OpenedIssuer | None = None

    def open(self) -> OpenedIssuer:
        if self._issuer is None:
            self._issuer = self._opener()
        return self._issuer

    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        return self.open().issue_ek_certificate(request)

    def revoke_ek_certificate(self, serial: int, reason: str) -> None:
        self.open().revoke_ek_certificate(serial, reason)

    def close(self) -> None:
        if self._issuer is not None:
            self._issuer.close()
            self._issuer = None
