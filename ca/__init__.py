"""The EK certificate authority (issue 3): keys, EK profile, two-step issuance, ledger,
CRL/OCSP and the HTTP API. See docs/ca.md.

Other areas use :class:`LocalCaIssuer` (in-process) or :class:`HttpCaIssuer` (over
HTTP), both :class:`vtpm_core.issuer.EkCertificateIssuer` implementations; the CLI
uses :class:`CaHome`; servers use :func:`create_app`.
"""

from ca.client import HttpCaIssuer
from ca.ek import CertifiableEk
from ca.home import CaHome, OpenedCa
from ca.http import CaServerConfig, create_app
from ca.issuance import EkIssuance, IssueRequest, IssueResult
from ca.issuer import LocalCaIssuer
from ca.keys import FileSigningKey, Pkcs11Config, Pkcs11SigningKey, SigningKey
from ca.ledger import CertRecord, Ledger
from ca.profile import EkProfile
from ca.revocation import Revocation

__all__ = [
    "CaHome",
    "CaServerConfig",
    "CertRecord",
    "CertifiableEk",
    "EkIssuance",
    "EkProfile",
    "FileSigningKey",
    "HttpCaIssuer",
    "IssueRequest",
    "IssueResult",
    "Ledger",
    "LocalCaIssuer",
    "OpenedCa",
    "Pkcs11Config",
    "Pkcs11SigningKey",
    "Revocation",
    "SigningKey",
    "create_app",
]
