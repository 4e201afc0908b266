"""EK provisioning of a fresh vTPM: the manufacturer's step, done at creation.

TCG EK Credential Profile for TPM Family 2.0, version 2.5: the EKs are
created with TPM2_CreatePrimary in the endorsement hierarchy from the default
templates (B.3.3 L-1 RSA 2048, B.3.4 L-2 ECC NIST P256); each certificate is
stored at its index (2.2.1.4: 0x01C00002 RSA, 0x01C0000A ECC) in an NV index
defined by the platform (TPM 2.0 Library Part 3, 31.3 NV_DefineSpace; Part 2,
13.4 TPMA_NV) with exactly the DER's size, written with platform
authorization, then write-locked (Part 3, 31.8 NV_WriteLock).

The attribute set is what real TPMs and swtpm_setup use: PLATFORMCREATE,
PPWRITE, WRITEDEFINE, PPREAD, OWNERREAD, AUTHREAD, NO_DA; after the lock the
TPM reports WRITTEN and WRITELOCKED too (0x62072801).

This is the one module of the vTPM store that talks tpm2-pytss; no pytss
object leaves it. Transient EK handles are flushed before returning (swtpm
runs without a resource manager).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vtpm_core.errors import ConfigError, TpmError, VerificationError
from vtpm_core.issuer import EkCertificateIssuer, EkCertificateRequest
from vtpm_core.record import EK_KINDS, EkRecord, TpmInfo
from vtpm_core.tpm.public import Public
from vtpm_core.tpm.templates import EK_TEMPLATES, EkTemplate

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

__all__ = [
    "EK_CERT_NV_ATTRIBUTES",
    "EK_CERT_NV_ATTRIBUTES_LOCKED",
    "VmIdentityRef",
    "create_ek",
    "define_certificate_index",
    "ek_template",
    "provision_eks",
    "read_nv",
    "read_nv_attributes",
    "read_tpm_info",
    "write_certificate",
]

# TPMA_NV bits (Part 2, 13.4)
_PPWRITE = 0x00000001
_WRITEDEFINE = 0x00002000
_WRITELOCKED = 0x00000800
_PPREAD = 0x00010000
_OWNERREAD = 0x00020000
_AUTHREAD = 0x00040000
_NO_DA = 0x02000000
_WRITTEN = 0x20000000
_PLATFORMCREATE = 0x40000000
EK_CERT_NV_ATTRIBUTES = (
    _PLATFORMCREATE | _PPWRITE | _WRITEDEFINE | _PPREAD | _OWNERREAD | _AUTHREAD | _NO_DA
)  # 0x42072001
EK_CERT_NV_ATTRIBUTES_LOCKED = EK_CERT_NV_ATTRIBUTES | _WRITTEN | _WRITELOCKED  # 0x62072801

# TPM_PT values (Part 2, 6.13)
_PT_FAMILY_INDICATOR = 0x100
_PT_LEVEL = 0x101
_PT_REVISION = 0x102
_PT_MANUFACTURER = 0x105
_PT_VENDOR_STRING_1 = 0x106
_PT_FIRMWARE_VERSION_1 = 0x10B
_PT_FIRMWARE_VERSION_2 = 0x10C
_PT_NV_BUFFER_MAX = 0x12C


@dataclass(frozen=True, slots=True)
class VmIdentityRef:
    """Who the EKs are certified for (copied into each EkCertificateRequest)."""

    vm_id: uuid.UUID
    vm_name: str
    vtpm_id: uuid.UUID
    clone_of: uuid.UUID | None = None


def ek_template(kind: str) -> EkTemplate:
    try:
        return EK_TEMPLATES[EK_KINDS[kind]]
    except KeyError:
        raise ConfigError(f"unknown EK kind {kind!r} (known: {', '.join(EK_KINDS)})") from None


@contextlib.contextmanager
def _tpm(what: str) -> Iterator[None]:
    """Turn tpm2-pytss errors into TpmError naming the command."""
    from tpm2_pytss import TSS2_Exception

    try:
        yield
    except TSS2_Exception as exc:
        raise TpmError(f"{what}: {exc}") from None


def read_tpm_info(esapi: ESAPI) -> TpmInfo:
    """TPM_PT_MANUFACTURER, the vendor strings, firmware version and spec level/revision."""
    from tpm2_pytss.constants import TPM2_CAP

    with _tpm("GetCapability(TPM_PROPERTIES)"):
        # PT_FIXED from TPM_PT_FAMILY_INDICATOR up to TPM_PT_NV_BUFFER_MAX and a little beyond
        _more, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_FAMILY_INDICATOR, 0x2D)
    props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
    missing = [
        f"0x{pt:x}"
        for pt in (_PT_FAMILY_INDICATOR, _PT_MANUFACTURER, _PT_FIRMWARE_VERSION_1)
        if pt not in props
    ]
    if missing:
        raise TpmError(f"GetCapability(TPM_PROPERTIES) did not return {', '.join(missing)}")
    vendor = b"".join(props.get(_PT_VENDOR_STRING_1 + i, 0).to_bytes(4, "big") for i in range(4))
    family = props[_PT_FAMILY_INDICATOR].to_bytes(4, "big").rstrip(b"\0")
    return TpmInfo(
        manufacturer=props[_PT_MANUFACTURER],
        vendor=vendor.rstrip(b"\0").decode("ascii", "replace"),
        firmware_version=(props[_PT_FIRMWARE_VERSION_1] << 32)
        | props.get(_PT_FIRMWARE_VERSION_2, 0),
        spec_family=family.decode("ascii", "replace"),
        spec_level=props.get(_PT_LEVEL, 0),
        spec_revision=props.get(_PT_REVISION, 0),
    )


def _nv_buffer_max(esapi: ESAPI) -> int:
    from tpm2_pytss.constants import TPM2_CAP

    with _tpm("GetCapability(TPM_PT_NV_BUFFER_MAX)"):
        _more, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_NV_BUFFER_MAX, 1)
    for p in data.data.tpmProperties:
        if int(p.property) == _PT_NV_BUFFER_MAX:
            return int(p.value)
    return 512  # smallest value the PC Client profile allows


def create_ek(esapi: ESAPI, template: EkTemplate) -> bytes:
    """TPM2_CreatePrimary(TPM_RH_ENDORSEMENT, template); returns the TPM2B_PUBLIC. Flushed."""
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

    in_public, _ = TPM2B_PUBLIC.unmarshal(template.public_template())
    with _tpm(f"CreatePrimary(endorsement, {template.description})"):
        handle, out_public, _cd, _ch, _ct = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), in_public, ESYS_TR.ENDORSEMENT
        )
    try:
        return bytes(out_public.marshal())
    finally:
        esapi.flush_context(handle)


def define_certificate_index(esapi: ESAPI, nv_index: int, size: int) -> None:
    """NV_DefineSpace(TPM_RH_PLATFORM) for an EK certificate of exactly ``size`` bytes."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=nv_index,
            nameAlg=TPM2_ALG.SHA256,
            attributes=EK_CERT_NV_ATTRIBUTES,
            dataSize=size,
        )
    )
    with _tpm(f"NV_DefineSpace(0x{nv_index:08x}, {size} bytes)"):
        handle = esapi.nv_define_space(b"", public, ESYS_TR.PLATFORM)
    esapi.tr_close(handle)


def write_certificate(esapi: ESAPI, nv_index: int, der: bytes, *, lock: bool = True) -> None:
    """Define the index, write ``der`` in NV_BUFFER_MAX chunks, NV_WriteLock (platform auth)."""
    from tpm2_pytss.constants import ESYS_TR

    if not der:
        raise ConfigError("empty certificate")
    define_certificate_index(esapi, nv_index, len(der))
    chunk = _nv_buffer_max(esapi)
    with _tpm(f"ESYS_TR_FromTPMPublic(0x{nv_index:08x})"):
        handle = esapi.tr_from_tpmpublic(nv_index)
    try:
        for offset in range(0, len(der), chunk):
            with _tpm(f"NV_Write(0x{nv_index:08x}, offset {offset})"):
                esapi.nv_write(handle, der[offset : offset + chunk], offset, ESYS_TR.PLATFORM)
        if lock:
            with _tpm(f"NV_WriteLock(0x{nv_index:08x})"):
                esapi.nv_write_lock(handle, ESYS_TR.PLATFORM)
    finally:
        esapi.tr_close(handle)


def read_nv_attributes(esapi: ESAPI, nv_index: int) -> tuple[int, int]:
    """(TPMA_NV attributes, dataSize) of a defined index (NV_ReadPublic)."""
    with _tpm(f"NV_ReadPublic(0x{nv_index:08x})"):
        handle = esapi.tr_from_tpmpublic(nv_index)
        try:
            pub, _name = esapi.nv_read_public(handle)
        finally:
            esapi.tr_close(handle)
    return int(pub.nvPublic.attributes), int(pub.nvPublic.dataSize)


def read_nv(esapi: ESAPI, nv_index: int) -> bytes:
    """The whole content of an NV index, read with owner authorization (empty auth)."""
    from tpm2_pytss.constants import ESYS_TR

    _attrs, size = read_nv_attributes(esapi, nv_index)
    chunk = _nv_buffer_max(esapi)
    out = bytearray()
    with _tpm(f"NV_Read(0x{nv_index:08x})"):
        handle = esapi.tr_from_tpmpublic(nv_index)
        try:
            for offset in range(0, size, chunk):
                part = esapi.nv_read(handle, min(chunk, size - offset), offset, ESYS_TR.OWNER)
                out += bytes(part)
        finally:
            esapi.tr_close(handle)
    return bytes(out)


def provision_eks(
    esapi: ESAPI,
    *,
    kinds: Sequence[str],
    identity: VmIdentityRef,
    issuer: EkCertificateIssuer | None,
    tpm_info: TpmInfo | None = None,
) -> tuple[TpmInfo, tuple[EkRecord, ...]]:
    """Create each EK, have ``issuer`` certify it, write the DER to its NV index and lock it.

    Steps: (1) read the TPM properties the certificate's SAN needs; (2) per
    kind: CreatePrimary from the TCG template, (3) ask the issuer, (4) check
    that the certificate's key is exactly this EK (an issuer is not trusted to
    have certified the right key), (5) NV define/write/lock.
    With ``issuer=None`` (external CA mode) only (1)-(2) run: the EKs exist,
    their certificate indices stay undefined.
    """
    from cryptography import x509

    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"an EK kind is given twice: {', '.join(kinds)}")
    templates = [(kind, ek_template(kind)) for kind in kinds]  # all known, before any TPM work
    info = tpm_info or read_tpm_info(esapi)
    eks: list[EkRecord] = []
    for kind, template in templates:
        public = create_ek(esapi, template)
        if issuer is None:
            eks.append(EkRecord(kind, template.id, template.cert_nv_index, public, None, None))
            continue
        issued = issuer.issue_ek_certificate(
            EkCertificateRequest(
                ek_public=public,
                vm_id=identity.vm_id,
                vm_name=identity.vm_name,
                vtpm_instance_id=str(identity.vtpm_id),
                template_id=template.id,
                tpm_manufacturer=info.manufacturer,
                tpm_model=info.vendor,
                tpm_version=info.firmware_version_1,
                clone_of=identity.clone_of,
            )
        )
        try:
            cert_key = x509.load_der_x509_certificate(issued.certificate_der).public_key()
        except ValueError as exc:
            raise VerificationError(
                "ek.certificate", f"the issuer returned an unreadable certificate: {exc}"
            ) from None
        if not Public.parse_tpm2b(public).same_key(cert_key):  # type: ignore[arg-type]
            raise VerificationError(
                "ek.certificate", f"the issuer certified another key than the {kind} EK"
            )
        write_certificate(esapi, template.cert_nv_index, issued.certificate_der)
        eks.append(
            EkRecord(
                kind,
                template.id,
                template.cert_nv_index,
                public,
                issued.certificate_der,
                issued.serial,
                issued.chain_pem,
            )
        )
    return info, tuple(eks)
