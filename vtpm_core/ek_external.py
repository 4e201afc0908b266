"""EK certificates from a third-party CA: export a request per EK, import the signed result.

TCG EK Credential Profile for TPM Family 2.0 v2.5: the certificate of the
RSA-2048 EK (template L-1, B.3.3) goes to NV index 0x01C00002, that of the
ECC P-256 EK (L-2, B.3.4) to 0x01C0000A (2.2.1.4); the SAN carries the TPM
attributes tpmManufacturer/tpmModel/tpmVersion (3.2.10, values rendered as
in 3.1.2: ``id:%08X``). The NV index is defined by the platform and
write-locked after the write (TPM 2.0 Library Part 3, 31.3 and 31.8), as
:mod:`vtpm_core.provision` does for our own CA.

An EK is a restricted decryption key (fixedTPM, restricted, decrypt, not
sign): it cannot sign a PKCS#10 request, so the request is not a CSR. It is
the EK public (TPM2B_PUBLIC and PEM), its template, the VM identity and the
TPM attributes, which the third-party CA certifies out of band. No
self-signature is faked.

This module checks what needs no trust decision: that a certificate's key is
exactly one of the vTPM's EKs and that its NV index is not locked already.
The TCG profile and chain checks need the verifier's code, which
``vtpm_core`` must not import: the CLI (``vtpm_cli.ek_cmds``) runs them
before :func:`import_certificate`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtpm_core._atomic import atomic_write
from vtpm_core.errors import ConflictError, NotFoundError, ParseError, StateError, VerificationError
from vtpm_core.provision import (
    EK_CERT_NV_ATTRIBUTES_LOCKED,
    EsapiTpm,
    read_nv,
    read_nv_attributes,
    write_certificate,
)
from vtpm_core.record import EkRecord, VtpmRecord
from vtpm_core.tpm.public import Public

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

    from vtpm_core.store import VtpmStore

__all__ = [
    "REQUEST_FORMAT",
    "EkRequest",
    "ImportResult",
    "build_requests",
    "import_certificate",
    "load_certificate",
    "match_ek",
    "write_requests",
]

REQUEST_FORMAT = "vtpm-trust/ek-request/1"
_WRITELOCKED = 0x00000800  # TPMA_NV_WRITELOCKED (Part 2, 13.4)


def _tpm_id(value: int) -> str:
    """EK Credential Profile 3.1.2: TPM attributes rendered as ``id:%08X``."""
    return f"id:{value:08X}"


@dataclass(frozen=True, slots=True)
class EkRequest:
    """What a third-party CA needs to certify one EK of one vTPM (not a CSR; see module doc)."""

    kind: str
    template_id: str
    nv_index: int
    ek_public: bytes  # TPM2B_PUBLIC as the TPM returned it
    ek_pem: bytes  # SubjectPublicKeyInfo PEM of the same key
    vm_id: str
    vm_name: str
    vtpm_id: str
    tpm_manufacturer: str  # id:%08X of TPM_PT_MANUFACTURER
    tpm_model: str  # TPM_PT_VENDOR_STRING_1..4
    tpm_version: str  # id:%08X of TPM_PT_FIRMWARE_VERSION_1
    tpm_specification: dict[str, Any]
    certified: bool  # a certificate is in the record already

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "template": self.template_id,
            "nv_index": f"0x{self.nv_index:08x}",
            "ek_public_file": f"{self.kind}.ek.pub",
            "ek_pem_file": f"{self.kind}.ek.pem",
            "certified": self.certified,
            "san": {
                "tpmManufacturer": self.tpm_manufacturer,
                "tpmModel": self.tpm_model,
                "tpmVersion": self.tpm_version,
            },
            "tpmSpecification": self.tpm_specification,
        }


def build_requests(record: VtpmRecord) -> tuple[EkRequest, ...]:
    """One :class:`EkRequest` per EK of ``record`` (certified ones included, flagged)."""
    tpm = record.tpm
    spec = {"family": tpm.spec_family, "level": tpm.spec_level, "revision": tpm.spec_revision}
    out = []
    for ek in record.eks:
        out.append(
            EkRequest(
                kind=ek.kind,
                template_id=ek.template_id,
                nv_index=ek.nv_index,
                ek_public=ek.public,
                ek_pem=Public.parse_tpm2b(ek.public).to_pem(),
                vm_id=str(record.vm_id),
                vm_name=record.name,
                vtpm_id=str(record.vtpm_id),
                tpm_manufacturer=_tpm_id(tpm.manufacturer),
                tpm_model=tpm.vendor,
                tpm_version=_tpm_id(tpm.firmware_version_1),
                tpm_specification=spec,
                certified=ek.certificate_der is not None,
            )
        )
    return tuple(out)


def write_requests(record: VtpmRecord, out_dir: Path) -> Path:
    """Write ``<kind>.ek.pub`` and ``<kind>.ek.pem`` per EK, then ``request.json`` (returned)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    requests = build_requests(record)
    for req in requests:
        atomic_write(out_dir / f"{req.kind}.ek.pub", req.ek_public)
        atomic_write(out_dir / f"{req.kind}.ek.pem", req.ek_pem)
    doc = {
        "format": REQUEST_FORMAT,
        "note": "An EK is a restricted decryption key and cannot sign a PKCS#10 request; "
        "certify the EK public given here (TPM2B_PUBLIC or PEM) out of band.",
        "vm": {"id": str(record.vm_id), "name": record.name},
        "vtpm_id": str(record.vtpm_id),
        "ek_cert_mode": record.ek_cert_mode,
        "eks": [r.summary() for r in requests],
    }
    path = out_dir / "request.json"
    atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def load_certificate(data: bytes, where: str) -> bytes:
    """The DER of one X.509 certificate given as PEM or DER; ParseError naming ``where``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ParseError(
            "Certificate", "(document)", 0, f"{where}: not an X.509 certificate: {exc}"
        ) from None
    if b"-----BEGIN" not in data:
        return data  # keep exactly the bytes received (DER)
    return cert.public_bytes(serialization.Encoding.DER)


def match_ek(record: VtpmRecord, der: bytes, *, kind: str | None = None) -> EkRecord:
    """The EK of ``record`` whose public key is exactly the certificate's key.

    Raises VerificationError("ek.key") naming the vTPM when no EK (or not
    the EK ``kind``) holds that key. Compares SubjectPublicKeyInfo DER.
    """
    from cryptography import x509

    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError as exc:
        raise ParseError("Certificate", "subjectPublicKeyInfo", 0, str(exc)) from None
    candidates = [ek for ek in record.eks if kind is None or ek.kind == kind]
    if kind is not None and not candidates:
        raise NotFoundError(f"vTPM {record.name!r} has no {kind} EK")
    for ek in candidates:
        if Public.parse_tpm2b(ek.public).same_key(key):  # type: ignore[arg-type]
            return ek
    which = f"the {kind} EK" if kind else "any EK (" + ", ".join(e.kind for e in record.eks) + ")"
    raise VerificationError(
        "ek.key", f"the certificate's key is not {which} of vTPM {record.name!r}"
    )


@dataclass(frozen=True, slots=True)
class ImportResult:
    record: VtpmRecord
    ek: EkRecord
    nv_index: int
    nv_attributes: int
    already_there: bool  # this very certificate was locked in NV already (nothing written)


def _nv_state(esapi: ESAPI, nv_index: int) -> int | None:
    """TPMA_NV of ``nv_index``, or None when the index is not defined.

    Asks GetCapability(TPM_CAP_HANDLES) first (Part 3, 30.2): NV_ReadPublic on
    an undefined index would fail with TPM_RC_HANDLE (and make the TSS log it).
    """
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.constants import TPM2_CAP

    from vtpm_core.errors import TpmError

    try:
        _more, data = esapi.get_capability(TPM2_CAP.HANDLES, nv_index, 1)
    except TSS2_Exception as exc:
        raise TpmError(f"GetCapability(HANDLES, 0x{nv_index:08x}): {exc}") from None
    if nv_index not in [int(h) for h in data.data.handles]:
        return None
    attrs, _size = read_nv_attributes(esapi, nv_index)
    return attrs


def _undefine(esapi: ESAPI, nv_index: int) -> None:
    """NV_UndefineSpace(TPM_RH_PLATFORM) of an unlocked, half-written certificate index."""
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR

    from vtpm_core.errors import TpmError

    try:
        handle = esapi.tr_from_tpmpublic(nv_index)
        esapi.nv_undefine_space(handle, ESYS_TR.PLATFORM)
    except TSS2_Exception as exc:
        raise TpmError(f"NV_UndefineSpace(0x{nv_index:08x}): {exc}") from None


def import_certificate(
    store: VtpmStore,
    name: str,
    der: bytes,
    *,
    chain_pem: bytes = b"",
    kind: str | None = None,
) -> ImportResult:
    """Write a third-party EK certificate into vTPM ``name``'s NV and record it.

    Steps: (1) the certificate's key must be exactly one of the vTPM's EKs
    (:func:`match_ek`); (2) the vTPM must not be running (its swtpm owns the
    state); (3) refuse when the record already holds a certificate for that
    EK, or the NV index is write-locked with another certificate - the EK's
    identity does not silently change; the same certificate locked in NV
    but missing from the record (a crash between NV and record) is repaired;
    (4) an unlocked index (an interrupted import) is undefined; (5) define,
    write, NV_WriteLock with platform auth; (6) re-read NV and compare;
    (7) rewrite the record atomically.

    Does NOT check the TCG profile or the chain: the caller does (module doc).
    The certificate's serial is not recorded as one of ours (``serial`` stays
    None), so ``vtpm delete`` never asks our CA to revoke it.
    """
    import hmac

    record = store.get(name)
    ek = match_ek(record, der, kind=kind)  # (1)
    if store.pid(name) is not None:  # (2)
        raise ConflictError(f"vTPM {name!r} is running; `vtpm stop {name}` first")
    if ek.certificate_der is not None and not hmac.compare_digest(ek.certificate_der, der):  # (3)
        raise ConflictError(
            f"vTPM {name!r}: the {ek.kind} EK already has a certificate "
            f"(NV 0x{ek.nv_index:08x}, locked); refusing to replace it"
        )
    already = False
    with store.running(name, transport="unix") as tpm:
        esapi = tpm.esapi()
        attrs = _nv_state(esapi, ek.nv_index)
        if attrs is not None and attrs & _WRITELOCKED:
            current = read_nv(esapi, ek.nv_index)
            if not hmac.compare_digest(current, der):
                raise ConflictError(
                    f"vTPM {name!r}: NV 0x{ek.nv_index:08x} ({ek.kind} EK) already holds a "
                    "locked certificate; refusing to replace it"
                )
            already = True
        else:
            if attrs is not None:  # (4)
                _undefine(esapi, ek.nv_index)
            write_certificate(EsapiTpm(esapi), ek.nv_index, der, lock=True)  # (5)
        attrs = _nv_state(esapi, ek.nv_index)
        back = read_nv(esapi, ek.nv_index)  # (6)
    if attrs != EK_CERT_NV_ATTRIBUTES_LOCKED or not hmac.compare_digest(back, der):
        raise StateError(
            f"vTPM {name!r}: NV 0x{ek.nv_index:08x} reads back differently after the write "
            f"(attributes {attrs if attrs is None else hex(attrs)})"
        )
    new_ek = dataclasses.replace(ek, certificate_der=der, serial=None, chain_pem=chain_pem)
    eks = tuple(new_ek if e.kind == ek.kind else e for e in record.eks)
    updated = dataclasses.replace(record, eks=eks, raw=b"")
    store.write_record(store.state_dir(name).parent, updated)  # (7)
    return ImportResult(store.get(name), new_ek, ek.nv_index, attrs, already)
