"""The EK certificate authority (issue 3): keys, EK profile, two-step issuance, ledger,
CRL/OCSP and the HTTP API. See docs/ca.md.

Other areas use :class:`LocalCaIssuer` (in-process) or :class:`HttpCaIssuer` (over
HTTP), both :class:`vtpm_core.issuer.EkCertificateIssuer` implementations; the CLI
uses :class:`CaHome`; servers use :func:`create_app`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each name is imported from its module when first read (PEP 562), so that importing
# one module of the package (``ca.issuer`` for ``vtpm create``) does not import the
# HTTP server, the HTTP client (requests, urllib3) and the revocation code with it.
_HOME = {
    "CaHome": "ca.home",
    "CaServerConfig": "ca.http",
    "CertRecord": "ca.ledger",
    "CertifiableEk": "ca.ek",
    "EkIssuance": "ca.issuance",
    "EkProfile": "ca.profile",
    "FileSigningKey": "ca.keys",
    "HttpCaIssuer": "ca.client",
    "IssueRequest": "ca.issuance",
    "IssueResult": "ca.issuance",
    "Ledger": "ca.ledger",
    "LocalCaIssuer": "ca.issuer",
    "OpenedCa": "ca.home",
    "Pkcs11Config": "ca.keys",
    "Pkcs11SigningKey": "ca.keys",
    "Revocation": "ca.revocation",
    "SigningKey": "ca.keys",
    "create_app": "ca.http",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'ca' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
