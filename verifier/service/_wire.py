"""INTERIM wire parsers for TPMS_ATTEST (quote) and TPMT_SIGNATURE, until ``vtpm_core.tpm``
(``Attest.parse``, ``Signature.parse``) lands.

TPM 2.0 Part 2: 10.12.8 TPMS_ATTEST, 10.12.4 TPMS_QUOTE_INFO, 10.11.1
TPMS_CLOCK_INFO, 10.6.2 TPMS_PCR_SELECTION, 11.3.4 TPMT_SIGNATURE. Plain
``struct`` reads: the evidence hot path parses one of each per request, and
every error names the structure, field and byte offset.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtpm_core.errors import ParseError

__all__ = ["QuoteAttest", "QuoteSignature"]

_SIG_RSASSA, _SIG_RSAPSS, _SIG_ECDSA = 0x0014, 0x0016, 0x0018
_MAX_BANKS = 16


class _Reader:
    def __init__(self, data: bytes, structure: str) -> None:
        self.data = data
        self.pos = 0
        self.structure = structure

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ParseError(
                self.structure,
                field,
                self.pos,
                f"needs {n} bytes, {len(self.data) - self.pos} left",
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str) -> bytes:
        return self.take(self.u16(field), field)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ParseError(
                self.structure, "end", self.pos, f"{len(self.data) - self.pos} trailing bytes"
            )


@dataclass(frozen=True, slots=True)
class QuoteAttest:
    """A TPMS_ATTEST whose attested union is read as TPMS_QUOTE_INFO (type not yet checked)."""

    raw: bytes
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_select: tuple[tuple[int, bytes], ...]  # (hash alg, select bitmap)
    pcr_digest: bytes

    @classmethod
    def parse(cls, data: bytes) -> QuoteAttest:
        r = _Reader(data, "TPMS_ATTEST")
        magic = r.u32("magic")
        typ = r.u16("type")
        signer = r.tpm2b("qualifiedSigner")
        extra = r.tpm2b("extraData")
        clock = r.u64("clockInfo.clock")
        reset = r.u32("clockInfo.resetCount")
        restart = r.u32("clockInfo.restartCount")
        safe = r.u8("clockInfo.safe")
        fw = r.u64("firmwareVersion")
        count = r.u32("attested.quote.pcrSelect.count")
        if count > _MAX_BANKS:
            raise ParseError(
                "TPMS_ATTEST",
                "attested.quote.pcrSelect.count",
                r.pos - 4,
                f"{count} banks, at most {_MAX_BANKS}",
            )
        sel = []
        for i in range(count):
            alg = r.u16(f"pcrSelect[{i}].hash")
            size = r.u8(f"pcrSelect[{i}].sizeofSelect")
            sel.append((alg, r.take(size, f"pcrSelect[{i}].pcrSelect")))
        digest = r.tpm2b("attested.quote.pcrDigest")
        r.end()
        return cls(
            data,
            magic,
            typ,
            signer,
            extra,
            clock,
            reset,
            restart,
            bool(safe),
            fw,
            tuple(sel),
            digest,
        )


@dataclass(frozen=True, slots=True)
class QuoteSignature:
    """A TPMT_SIGNATURE: RSASSA / RSAPSS (signature bytes) or ECDSA (r, s)."""

    raw: bytes
    sig_alg: int
    hash_alg: int
    signature: bytes  # RSA: the signature; ECDSA: empty (see r, s)
    r: int = 0
    s: int = 0

    @classmethod
    def parse(cls, data: bytes) -> QuoteSignature:
        rd = _Reader(data, "TPMT_SIGNATURE")
        alg = rd.u16("sigAlg")
        if alg in (_SIG_RSASSA, _SIG_RSAPSS):
            h = rd.u16("signature.hash")
            sig = rd.tpm2b("signature.sig")
            rd.end()
            return cls(data, alg, h, sig)
        if alg == _SIG_ECDSA:
            h = rd.u16("signature.hash")
            r = int.from_bytes(rd.tpm2b("signature.signatureR"), "big")
            s = int.from_bytes(rd.tpm2b("signature.signatureS"), "big")
            rd.end()
            return cls(data, alg, h, b"", r, s)
        raise ParseError("TPMT_SIGNATURE", "sigAlg", 0, f"unsupported 0x{alg:04x}")
