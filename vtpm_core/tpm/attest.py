"""TPMS_ATTEST / TPM2B_ATTEST: what TPM2_Quote, Certify and CertifyCreation sign.

TPM 2.0 Library Part 2 (rev 1.59): 10.12.12 TPMS_ATTEST, 10.12.13
TPM2B_ATTEST, 10.11.1 TPMS_CLOCK_INFO, 10.12.3 TPMS_CERTIFY_INFO, 10.12.4
TPMS_QUOTE_INFO, 10.12.7 TPMS_CREATION_INFO, 10.12.11 TPMU_ATTEST; 6.9 TPM_ST.

The parser decodes; it does not judge. ``magic`` and ``type`` are reported as
read (the verifier checks them against the constants below); types whose
union member we do not model are framed and kept as ``UnknownAttested``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vtpm_core.tpm import _marshal
from vtpm_core.tpm._reader import Reader
from vtpm_core.tpm.pcr import PcrSelection

__all__ = [
    "ST_ATTEST_CERTIFY",
    "ST_ATTEST_COMMAND_AUDIT",
    "ST_ATTEST_CREATION",
    "ST_ATTEST_NV",
    "ST_ATTEST_NV_DIGEST",
    "ST_ATTEST_QUOTE",
    "ST_ATTEST_SESSION_AUDIT",
    "ST_ATTEST_TIME",
    "TPM_GENERATED_VALUE",
    "Attest",
    "CertifyInfo",
    "ClockInfo",
    "CreationInfo",
    "QuoteInfo",
    "UnknownAttested",
]

TPM_GENERATED_VALUE = 0xFF544347  # "\xffTCG", Part 2 6.2
ST_ATTEST_NV = 0x8014
ST_ATTEST_COMMAND_AUDIT = 0x8015
ST_ATTEST_SESSION_AUDIT = 0x8016
ST_ATTEST_CERTIFY = 0x8017
ST_ATTEST_QUOTE = 0x8018
ST_ATTEST_TIME = 0x8019
ST_ATTEST_CREATION = 0x801A
ST_ATTEST_NV_DIGEST = 0x801C

_MAX_NAME = 2 + 64  # sizeof(TPMU_NAME): a hash algorithm and a digest
_MAX_DIGEST = 64
_MAX_DATA = 64
_MAX_NV_BUFFER = 2048  # generous: TPM2_MAX_NV_BUFFER_SIZE is implementation-defined


@dataclass(frozen=True, slots=True)
class ClockInfo:
    """TPMS_CLOCK_INFO (Part 2, 10.11.1)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, slots=True)
class QuoteInfo:
    """TPMS_QUOTE_INFO: the quoted selection and the digest of those PCR values."""

    pcr_select: PcrSelection
    pcr_digest: bytes


@dataclass(frozen=True, slots=True)
class CertifyInfo:
    """TPMS_CERTIFY_INFO (TPM2_Certify)."""

    name: bytes
    qualified_name: bytes


@dataclass(frozen=True, slots=True)
class CreationInfo:
    """TPMS_CREATION_INFO (TPM2_CertifyCreation)."""

    object_name: bytes
    creation_hash: bytes


@dataclass(frozen=True, slots=True)
class UnknownAttested:
    """A union member we frame but do not model (time, audit, NV): its raw bytes."""

    type: int
    raw: bytes


# clockInfo (u64 clock, u32 resetCount, u32 restartCount, u8 safe) then u64
# firmwareVersion: TPMS_ATTEST's fixed-size middle, read at once when it is all there
_CLOCK_AND_FIRMWARE = struct.Struct(">QIIBQ")


def _clock_and_firmware(r: Reader) -> tuple[ClockInfo, int]:
    pos = r.pos
    if pos + _CLOCK_AND_FIRMWARE.size > len(r.data):  # the field-by-field reads say where
        return _clock(r, "clockInfo"), r.u64("firmwareVersion")
    clock, reset, restart, safe, firmware = _CLOCK_AND_FIRMWARE.unpack_from(r.data, pos)
    if safe > 1:
        raise r.fail("clockInfo.safe", f"TPMI_YES_NO is {safe}, expected 0 or 1", pos + 16)
    r.pos = pos + _CLOCK_AND_FIRMWARE.size
    return ClockInfo(clock, reset, restart, bool(safe)), firmware


def _clock(r: Reader, prefix: str) -> ClockInfo:
    clock = r.u64(f"{prefix}.clock")
    reset = r.u32(f"{prefix}.resetCount")
    restart = r.u32(f"{prefix}.restartCount")
    at = r.pos
    safe = r.u8(f"{prefix}.safe")
    if safe > 1:
        raise r.fail(f"{prefix}.safe", f"TPMI_YES_NO is {safe}, expected 0 or 1", at)
    return ClockInfo(clock, reset, restart, bool(safe))


@dataclass(frozen=True, slots=True)
class Attest:
    """A TPMS_ATTEST. ``raw`` holds the exact bytes (what the signature covers)."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    attested: QuoteInfo | CertifyInfo | CreationInfo | UnknownAttested
    raw: bytes

    @classmethod
    def parse(cls, data: bytes) -> Attest:
        """A bare TPMS_ATTEST (``tpm2_quote -m``, ``tpm2_certify -o``) filling ``data`` exactly."""
        r = Reader(data, "TPMS_ATTEST")
        attest = cls._read(r)
        r.end()
        _marshal.check("TPMS_ATTEST", attest.raw)
        return attest

    @classmethod
    def parse_tpm2b(cls, data: bytes) -> Attest:
        """A TPM2B_ATTEST (u16 size || TPMS_ATTEST) filling ``data`` exactly."""
        r = Reader(data, "TPM2B_ATTEST")
        size = r.u16("size")
        if size != r.remaining():
            raise r.fail("size", f"says {size} bytes, {r.remaining()} follow", 0)
        inner = Reader(r.take(size, "attestationData"), "TPMS_ATTEST", base=2)
        attest = cls._read(inner)
        inner.end()
        _marshal.check("TPMS_ATTEST", attest.raw)
        return attest

    @classmethod
    def load(cls, data: bytes) -> Attest:
        """A bare TPMS_ATTEST or a TPM2B_ATTEST (told apart by the magic at the start)."""
        if data[:4] != TPM_GENERATED_VALUE.to_bytes(4, "big") and (
            len(data) >= 2 and int.from_bytes(data[:2], "big") == len(data) - 2
        ):
            return cls.parse_tpm2b(data)
        return cls.parse(data)

    def to_bytes(self) -> bytes:
        return self.raw

    def to_tpm2b(self) -> bytes:
        return len(self.raw).to_bytes(2, "big") + self.raw

    @property
    def quote(self) -> QuoteInfo | None:
        return self.attested if isinstance(self.attested, QuoteInfo) else None

    @classmethod
    def _read(cls, r: Reader) -> Attest:
        magic = r.u32("magic")
        type_at = r.pos
        typ = r.u16("type")
        signer = r.tpm2b("qualifiedSigner", _MAX_NAME)
        extra = r.tpm2b("extraData", _MAX_DATA)
        clock, firmware = _clock_and_firmware(r)
        attested: QuoteInfo | CertifyInfo | CreationInfo | UnknownAttested
        start = r.pos
        if typ == ST_ATTEST_QUOTE:
            select = PcrSelection.read(r, "attested.quote.pcrSelect.")
            attested = QuoteInfo(select, r.tpm2b("attested.quote.pcrDigest", _MAX_DIGEST))
        elif typ == ST_ATTEST_CERTIFY:
            attested = CertifyInfo(
                r.tpm2b("attested.certify.name", _MAX_NAME),
                r.tpm2b("attested.certify.qualifiedName", _MAX_NAME),
            )
        elif typ == ST_ATTEST_CREATION:
            attested = CreationInfo(
                r.tpm2b("attested.creation.objectName", _MAX_NAME),
                r.tpm2b("attested.creation.creationHash", _MAX_DIGEST),
            )
        elif typ == ST_ATTEST_TIME:
            r.u64("attested.time.time.time")
            _clock(r, "attested.time.time.clockInfo")
            r.u64("attested.time.firmwareVersion")
            attested = UnknownAttested(typ, r.data[start : r.pos])
        elif typ == ST_ATTEST_COMMAND_AUDIT:
            r.u64("attested.commandAudit.auditCounter")
            r.u16("attested.commandAudit.digestAlg")
            r.tpm2b("attested.commandAudit.auditDigest", _MAX_DIGEST)
            r.tpm2b("attested.commandAudit.commandDigest", _MAX_DIGEST)
            attested = UnknownAttested(typ, r.data[start : r.pos])
        elif typ == ST_ATTEST_SESSION_AUDIT:
            at = r.pos
            if r.u8("attested.sessionAudit.exclusiveSession") > 1:
                raise r.fail("attested.sessionAudit.exclusiveSession", "not 0 or 1", at)
            r.tpm2b("attested.sessionAudit.sessionDigest", _MAX_DIGEST)
            attested = UnknownAttested(typ, r.data[start : r.pos])
        elif typ == ST_ATTEST_NV:
            r.tpm2b("attested.nv.indexName", _MAX_NAME)
            r.u16("attested.nv.offset")
            r.tpm2b("attested.nv.nvContents", _MAX_NV_BUFFER)
            attested = UnknownAttested(typ, r.data[start : r.pos])
        elif typ == ST_ATTEST_NV_DIGEST:
            r.tpm2b("attested.nvDigest.indexName", _MAX_NAME)
            r.tpm2b("attested.nvDigest.nvDigest", _MAX_DIGEST)
            attested = UnknownAttested(typ, r.data[start : r.pos])
        else:
            raise r.fail("type", f"0x{typ:04x} is not a TPMI_ST_ATTEST value", type_at)
        return cls(magic, typ, signer, extra, clock, firmware, attested, r.data[: r.pos])
