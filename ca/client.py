"""The CA's HTTP API as an :class:`vtpm_core.issuer.EkCertificateIssuer`.

The CLI wires this to ``vtpm create --ca-url URL --ca-token TOKEN``. Problem
bodies from the server become the project's errors with the server's detail.
"""

from __future__ import annotations

import base64
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vtpm_core.errors import (
    ConflictError,
    ParseError,
    PermissionDeniedError,
    StateError,
    VerificationError,
    VtpmTrustError,
)
from vtpm_core.issuer import EkCertificateRequest, IssuedEkCertificate

__all__ = ["HttpCaIssuer"]


class HttpCaIssuer:
    """Talks to ``vtpm ca serve``; one ``requests.Session`` until :meth:`close`."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._session.post(self.url + path, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise StateError(f"CA at {self.url} unreachable: {exc}") from exc
        try:
            answer = response.json()
        except ValueError:
            raise StateError(f"CA answered {response.status_code} without JSON") from None
        if response.status_code in (200, 201):
            if not isinstance(answer, dict):
                raise StateError("CA answered with a non-object")
            return answer
        detail = str(answer.get("detail") or answer.get("title") or response.status_code)
        status = response.status_code
        if status in (401, 403):
            raise PermissionDeniedError(f"CA refused the token ({status}): {detail}")
        if status == 400:
            raise ParseError("request", str(answer.get("field", "body")), 0, detail)
        if status == 422:
            raise VerificationError("ca.request", detail)
        if status == 409:
            raise ConflictError(detail)
        raise VtpmTrustError(f"CA error {status}: {detail}")

    def issue_ek_certificate(self, request: EkCertificateRequest) -> IssuedEkCertificate:
        body: dict[str, Any] = {
            "ek_public": base64.b64encode(request.ek_public).decode(),
            "vm_id": str(request.vm_id),
            "vm_name": request.vm_name,
            "vtpm_instance_id": request.vtpm_instance_id,
            "tpm_manufacturer": request.tpm_manufacturer,
            "tpm_version": request.tpm_version,
        }
        if request.tpm_model:
            body["tpm_model"] = request.tpm_model
        if request.clone_of is not None:
            body["clone_of"] = str(request.clone_of)
        answer = self._post("/v1/ek-certificates", body)
        try:
            cert = x509.load_pem_x509_certificate(str(answer["certificate_pem"]).encode())
            serial = int(str(answer["serial"]), 16)
            chain = str(answer["chain_pem"]).encode()
        except (KeyError, ValueError) as exc:
            raise StateError(f"CA answer incomplete: {exc}") from exc
        if cert.serial_number != serial:
            raise StateError("CA answer: serial does not match the certificate")
        return IssuedEkCertificate(serial, cert.public_bytes(serialization.Encoding.DER), chain)

    def revoke_ek_certificate(self, serial: int, reason: str) -> None:
        self._post(f"/v1/ek-certificates/{serial:x}/revoke", {"reason": reason})

    def close(self) -> None:
        self._session.close()
