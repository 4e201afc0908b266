"""The VM identity extension our CA writes into vTPM EK certificates.

The ASN.1 (``VmIdentity ::= SEQUENCE { vmId, vmName, vtpmInstanceId,
createdAt }`` under OID 2.25.<UUID>) is defined once in
``vtpm_core.vm_identity`` (shared so that ``ca`` and ``verifier`` never import
each other); ``decoded`` is its ``VmIdentity``. The module is looked up at run
time so that this package works before the CA side exists.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from verifier.ekcert.parse import ASN1_ERRORS, ParsedCertificate
from vtpm_core.errors import ParseError

__all__ = ["VmIdentityExtension", "read_vm_identity"]


@dataclass(frozen=True, slots=True)
class VmIdentityExtension:
    """The raw extension, and its decoded value when the schema module is present."""

    oid: str
    critical: bool
    value: bytes
    decoded: Any


def _schema() -> Any:
    try:
        return importlib.import_module("vtpm_core.vm_identity")
    except ImportError:
        return None


def read_vm_identity(cert: ParsedCertificate) -> VmIdentityExtension | None:
    """Return the VM identity extension of ``cert``, or None if it has none.

    Only meaningful on a certificate whose chain has been validated: the
    extension says which VM the CA certified the EK for.
    """
    schema = _schema()
    if schema is None:
        return None
    oid = str(schema.VM_IDENTITY_OID)
    ext = cert.extension(oid)
    if ext is None:
        return None
    try:
        decoded = schema.VmIdentity.parse(ext.value)
    except ParseError:
        raise
    except ASN1_ERRORS as exc:
        raise ParseError("VmIdentity", "value", 0, str(exc)) from None
    return VmIdentityExtension(oid, ext.critical, ext.value, decoded)
