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

The commands go through :class:`ProvisioningTpm`: `vtpm create` sends them
with :class:`vtpm_core.tpm_client.RawTpm`, everything else (and the tests, as
the plain version) with :class:`EsapiTpm` over tpm2-pytss; no pytss object
leaves this module. Transient EK handles are flushed before returning (swtpm
runs without a resource manager).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
    "CreatedPublic",
    "EsapiTpm",
    "ProvisioningTpm",
    "VmIdentityRef",
    "create_ek",
    "ek_template",
    "provision_eks",
    "read_nv",
    "read_nv_attributes",
    "read_tpm_info",
    "send_create_ek",
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


class CreatedPublic(Protocol):
    def result(self) -> bytes: ...


class ProvisioningTpm(Protocol):
    """The TPM commands provisioning sends; empty platform/endorsement authorization.

    Two implementations: :class:`vtpm_core.tpm_client.RawTpm` (what `vtpm
    create` uses: marshalled by hand, CreatePrimary answered later) and
    :class:`EsapiTpm` (tpm2-pytss, the plain version the tests compare it with).
    """

    def properties(self, first: int, count: int) -> dict[int, int]: ...

    def send_create_primary(self, tpm2b_public: bytes, what: str) -> CreatedPublic: ...

    def nv_define_space(self, nv_index: int, attributes: int, size: int) -> None: ...

    def nv_write(self, nv_index: int, data: bytes, offset: int) -> None: ...

    def nv_write_lock(self, nv_index: int) -> None: ...


@dataclass(frozen=True, slots=True)
class _Done:
    public: bytes

    def result(self) -> bytes:
        return self.public


class EsapiTpm:
    """:class:`ProvisioningTpm` through tpm2-pytss's ESAPI (each call answered at once)."""

    def __init__(self, esapi: ESAPI) -> None:
        self.esapi = esapi

    def properties(self, first: int, count: int) -> dict[int, int]:
        from tpm2_pytss.constants import TPM2_CAP

        with _tpm(f"GetCapability(TPM_PROPERTIES, 0x{first:x})"):
            _more, data = self.esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, first, count)
        return {int(p.property): int(p.value) for p in data.data.tpmProperties}

    def send_create_primary(self, tpm2b_public: bytes, what: str) -> _Done:
        from tpm2_pytss.constants import ESYS_TR
        from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE

        in_public, _ = TPM2B_PUBLIC.unmarshal(tpm2b_public)
        with _tpm(what):
            handle, out_public, _cd, _ch, _ct = self.esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), in_public, ESYS_TR.ENDORSEMENT
            )
        try:
            return _Done(bytes(out_public.marshal()))
        finally:
            self.esapi.flush_context(handle)

    def nv_define_space(self, nv_index: int, attributes: int, size: int) -> None:
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=nv_index, nameAlg=TPM2_ALG.SHA256, attributes=attributes, dataSize=size
            )
        )
        with _tpm(f"NV_DefineSpace(0x{nv_index:08x}, {size} bytes)"):
            handle = self.esapi.nv_define_space(b"", public, ESYS_TR.PLATFORM)
        self.esapi.tr_close(handle)

    def nv_write(self, nv_index: int, data: bytes, offset: int) -> None:
        from tpm2_pytss.constants import ESYS_TR

        with _tpm(f"NV_Write(0x{nv_index:08x}, offset {offset})"):
            handle = self.esapi.tr_from_tpmpublic(nv_index)
            try:
                self.esapi.nv_write(handle, data, offset, ESYS_TR.PLATFORM)
            finally:
                self.esapi.tr_close(handle)

    def nv_write_lock(self, nv_index: int) -> None:
        from tpm2_pytss.constants import ESYS_TR

        with _tpm(f"NV_WriteLock(0x{nv_index:08x})"):
            handle = self.esapi.tr_from_tpmpublic(nv_index)
            try:
                self.esapi.nv_write_lock(handle, ESYS_TR.PLATFORM)
            finally:
                self.esapi.tr_close(handle)


def read_tpm_info(tpm: ProvisioningTpm) -> TpmInfo:
    """TPM_PT_MANUFACTURER, the vendor strings, firmware version and spec level/revision."""
    # PT_FIXED from TPM_PT_FAMILY_INDICATOR up to TPM_PT_NV_BUFFER_MAX and a little beyond
    props = tpm.properties(_PT_FAMILY_INDICATOR, 0x2D)
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


def _nv_buffer_max(tpm: ProvisioningTpm) -> int:
    # the smallest value the PC Client profile allows, if the TPM does not say
    return tpm.properties(_PT_NV_BUFFER_MAX, 1).get(_PT_NV_BUFFER_MAX, 512)


def send_create_ek(tpm: ProvisioningTpm, template: EkTemplate) -> CreatedPublic:
    """TPM2_CreatePrimary(TPM_RH_ENDORSEMENT, template); ``.result()`` is the TPM2B_PUBLIC.

    The transient handle is flushed when the result is read.
    """
    return tpm.send_create_primary(
        template.wire_template(), f"CreatePrimary(endorsement, {template.description})"
    )


def create_ek(tpm: ProvisioningTpm, template: EkTemplate) -> bytes:
    """TPM2_CreatePrimary(TPM_RH_ENDORSEMENT, template); returns the TPM2B_PUBLIC. Flushed."""
    return send_create_ek(tpm, template).result()


def write_certificate(
    tpm: ProvisioningTpm, nv_index: int, der: bytes, *, lock: bool = True
) -> None:
    """Define the index, write ``der`` in NV_BUFFER_MAX chunks, NV_WriteLock (platform auth)."""
    if not der:
        raise ConfigError("empty certificate")
    tpm.nv_define_space(nv_index, EK_CERT_NV_ATTRIBUTES, len(der))
    chunk = _nv_buffer_max(tpm)
    for offset in range(0, len(der), chunk):
        tpm.nv_write(nv_index, der[offset : offset + chunk], offset)
    if lock:
        tpm.nv_write_lock(nv_index)


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
    chunk = _nv_buffer_max(EsapiTpm(esapi))
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
    tpm: ProvisioningTpm,
    *,
    kinds: Sequence[str],
    identity: VmIdentityRef,
    issuer: EkCertificateIssuer | None,
    tpm_info: TpmInfo | None = None,
    meanwhile: Callable[[], object] = lambda: None,
) -> tuple[TpmInfo, tuple[EkRecord, ...]]:
    """Create each EK, have ``issuer`` certify it, write the DER to its NV index and lock it.

    Steps: (1) read the TPM properties the certificate's SAN needs; (2) per
    kind: CreatePrimary from the TCG template, (3) ask the issuer, (4) check
    that the certificate's key is exactly this EK (an issuer is not trusted to
    have certified the right key), (5) NV define/write/lock.
    With ``issuer=None`` (external CA mode) only (1)-(2) run: the EKs exist,
    their certificate indices stay undefined.

    ``meanwhile`` runs after the first EK's CreatePrimary is sent and before
    its answer is read: with :class:`vtpm_core.tpm_client.RawTpm` the TPM
    generates that key (RSA 2048, the first of the default kinds: 20-60 ms
    in swtpm) while ``vtpm create`` opens the CA there.
    """

    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"an EK kind is given twice: {', '.join(kinds)}")
    templates = [(kind, ek_template(kind)) for kind in kinds]  # all known, before any TPM work
    info = tpm_info or read_tpm_info(tpm)
    pending = send_create_ek(tpm, templates[0][1]) if templates else None
    meanwhile()
    from cryptography import x509

    eks: list[EkRecord] = []
    for kind, template in templates:
        if pending is None:
            pending = send_create_ek(tpm, template)
        public, pending = pending.result(), None
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
        write_certificate(tpm, template.cert_nv_index, issued.certificate_der)
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
