"""INTERIM TPM structure readers for verifier.quote, until ``vtpm_core.tpm`` has them.

``Public`` and ``ObjectAttributes`` already come from ``vtpm_core.tpm`` (re-exported
here for existing imports). The rest follows the announced ``vtpm_core.tpm`` API
(``Attest``/``QuoteInfo``, ``Signature``, ``PcrSelection``, ``PcrValues``) so that
switching is an import change in ``verifier/quote.py`` and the CLI.

TPM 2.0 Part 2: 10.12.8 TPMS_ATTEST, 10.12.1 TPMS_QUOTE_INFO, 10.11.1
TPMS_CLOCK_INFO, 10.6.2 TPMS_PCR_SELECTION, 11.3.4 TPMT_SIGNATURE.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import ObjectAttributes, Public

__all__ = [
    "HASH_ALGS",
    "Attest",
    "ClockInfo",
    "ObjectAttributes",
    "PcrSelection",
    "PcrValues",
    "Public",
    "QuoteInfo",
    "Signature",
]

# TPM_ALG_ID -> (name, digest size)
HASH_ALGS: dict[int, tuple[str, int]] = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
}
_CRYPTO_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_SIG_RSASSA, _SIG_RSAPSS, _SIG_ECDSA = 0x0014, 0x0016, 0x0018
_MAX_BANKS = 16
_MAX_PCR = 32


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
        return self.take(self.u16(f"{field}.size"), field)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ParseError(
                self.structure, "end", self.pos, f"{len(self.data) - self.pos} trailing bytes"
            )


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """Selected PCRs per bank, in TPML_PCR_SELECTION order (indices ascending)."""

    banks: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_mapping(cls, selected: Mapping[str, object]) -> PcrSelection:
        return cls(tuple((bank, tuple(sorted(pcrs))) for bank, pcrs in selected.items()))  # type: ignore[call-overload]

    def as_sets(self) -> dict[str, frozenset[int]]:
        """Bank -> PCR set, ignoring empty banks and order (what two selections must share)."""
        return {bank: frozenset(pcrs) for bank, pcrs in self.banks if pcrs}

    def __str__(self) -> str:
        return (
            "+".join(f"{bank}:{','.join(map(str, pcrs))}" for bank, pcrs in self.banks if pcrs)
            or "(none)"
        )


@dataclass(frozen=True, slots=True)
class PcrValues:
    """PCR values per bank: ``{bank: {index: value}}``."""

    values: Mapping[str, Mapping[int, bytes]]

    @property
    def selection(self) -> PcrSelection:
        """The supplied PCRs, banks in TPM_ALG_ID order (the values carry no bank order)."""
        order = [name for name, _ in HASH_ALGS.values()]
        banks = sorted(self.values, key=lambda b: order.index(b) if b in order else len(order))
        return PcrSelection(tuple((bank, tuple(sorted(self.values[bank]))) for bank in banks))

    def digest(self, selection: PcrSelection, hash_alg: str) -> bytes:
        """H(values in selection order) as TPM2_Quote computes pcrDigest (Part 3 §18.4)."""
        h = hashlib.new(hash_alg)
        for bank, pcrs in selection.banks:
            for pcr in pcrs:
                h.update(self.values[bank][pcr])
        return h.digest()

    def as_mapping(self) -> dict[str, dict[int, bytes]]:
        return {bank: dict(v) for bank, v in self.values.items()}

    @classmethod
    def load(cls, data: bytes, quote_selection: PcrSelection | None = None) -> PcrValues:
        """tpm2_quote -o (serialized), JSON ``{bank: {"index": "hex"}}``, or -F values.

        The ``-F values`` form is the bare concatenation of the values; it has
        no indices, so it is read against ``quote_selection`` (the quote's own).
        """
        stripped = data.lstrip()
        if stripped[:1] == b"{":
            return cls._from_json(data)
        from vtpm_core.vm.pcrs_file import parse_pcrs_file

        try:
            return cls._checked(parse_pcrs_file(data))
        except ParseError:
            if quote_selection is None:
                raise
        return cls._from_values_form(data, quote_selection)

    @classmethod
    def _checked(cls, values: Mapping[str, Mapping[int, bytes]]) -> PcrValues:
        sizes = {name: size for name, size in HASH_ALGS.values()}
        for bank, pcrs in values.items():
            if bank not in sizes:
                raise ParseError("PcrValues", bank, 0, f"unknown bank {bank!r}")
            for pcr, value in pcrs.items():
                if not 0 <= pcr < _MAX_PCR:
                    raise ParseError("PcrValues", f"{bank}:{pcr}", 0, "PCR index out of range")
                if len(value) != sizes[bank]:
                    raise ParseError(
                        "PcrValues",
                        f"{bank}:{pcr}",
                        0,
                        f"{len(value)} bytes, expected {sizes[bank]}",
                    )
        return cls({bank: dict(sorted(pcrs.items())) for bank, pcrs in values.items()})

    @classmethod
    def _from_json(cls, data: bytes) -> PcrValues:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParseError("PcrValues.json", "document", 0, str(exc)) from None
        if not isinstance(doc, dict):
            raise ParseError(
                "PcrValues.json", "document", 0, "expected an object {bank: {pcr: hex}}"
            )
        out: dict[str, dict[int, bytes]] = {}
        for bank, pcrs in doc.items():
            if not isinstance(pcrs, dict):
                raise ParseError("PcrValues.json", str(bank), 0, "expected an object {pcr: hex}")
            out[bank] = {}
            for index, value in pcrs.items():
                if not re.fullmatch(r"\d{1,2}", str(index)) or not isinstance(value, str):
                    raise ParseError(
                        "PcrValues.json", f"{bank}.{index}", 0, 'expected "index": "hex"'
                    )
                try:
                    out[bank][int(index)] = bytes.fromhex(value.removeprefix("0x"))
                except ValueError:
                    raise ParseError("PcrValues.json", f"{bank}.{index}", 0, "not hex") from None
        return cls._checked(out)

    @classmethod
    def _from_values_form(cls, data: bytes, selection: PcrSelection) -> PcrValues:
        sizes = {name: size for name, size in HASH_ALGS.values()}
        out: dict[str, dict[int, bytes]] = {}
        offset = 0
        for bank, pcrs in selection.banks:
            size = sizes[bank]
            for pcr in pcrs:
                if offset + size > len(data):
                    raise ParseError("tpm2_tools.pcrs.values", f"{bank}:{pcr}", offset, "truncated")
                out.setdefault(bank, {})[pcr] = data[offset : offset + size]
                offset += size
        if offset != len(data):
            raise ParseError(
                "tpm2_tools.pcrs", "values", offset,
                f"{len(data)} bytes: neither a serialized PCR file nor the values of {selection}",
            )  # fmt: skip
        return cls._checked(out)


@dataclass(frozen=True, slots=True)
class ClockInfo:
    """TPMS_CLOCK_INFO (Part 2 §10.11.1)."""

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
class Attest:
    """A TPMS_ATTEST whose attested union is TPMS_QUOTE_INFO (the caller checks the type)."""

    raw: bytes
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    attested: QuoteInfo

    @classmethod
    def parse(cls, data: bytes) -> Attest:
        r = _Reader(data, "TPMS_ATTEST")
        magic = r.u32("magic")
        typ = r.u16("type")
        signer = r.tpm2b("qualifiedSigner")
        extra = r.tpm2b("extraData")
        clock = ClockInfo(
            r.u64("clockInfo.clock"),
            r.u32("clockInfo.resetCount"),
            r.u32("clockInfo.restartCount"),
            bool(r.u8("clockInfo.safe")),
        )
        firmware = r.u64("firmwareVersion")
        count = r.u32("attested.quote.pcrSelect.count")
        if count > _MAX_BANKS:
            raise ParseError("TPMS_ATTEST", "attested.quote.pcrSelect.count", r.pos - 4,
                             f"{count} banks, at most {_MAX_BANKS}")  # fmt: skip
        banks: list[tuple[str, tuple[int, ...]]] = []
        for i in range(count):
            alg = r.u16(f"pcrSelect[{i}].hash")
            if alg not in HASH_ALGS:
                raise ParseError(
                    "TPMS_ATTEST", f"pcrSelect[{i}].hash", r.pos - 2, f"unknown bank 0x{alg:04x}"
                )
            size = r.u8(f"pcrSelect[{i}].sizeofSelect")
            if size > _MAX_PCR // 8:
                raise ParseError(
                    "TPMS_ATTEST", f"pcrSelect[{i}].sizeofSelect", r.pos - 1, f"{size} > 4"
                )
            bitmap = r.take(size, f"pcrSelect[{i}].pcrSelect")
            pcrs = tuple(
                8 * b + j for b, byte in enumerate(bitmap) for j in range(8) if byte >> j & 1
            )
            name = HASH_ALGS[alg][0]
            if any(existing == name for existing, _ in banks):
                raise ParseError("TPMS_ATTEST", f"pcrSelect[{i}].hash", r.pos, f"bank {name} twice")
            banks.append((name, pcrs))
        digest = r.tpm2b("attested.quote.pcrDigest")
        r.end()
        return cls(
            data,
            magic,
            typ,
            signer,
            extra,
            clock,
            firmware,
            QuoteInfo(PcrSelection(tuple(banks)), digest),
        )


@dataclass(frozen=True, slots=True)
class Signature:
    """A TPMT_SIGNATURE: RSASSA, RSAPSS or ECDSA."""

    raw: bytes
    sig_alg: int
    hash_alg: int
    signature: bytes  # RSA signature, or DER ECDSA-Sig-Value

    @property
    def hash_name(self) -> str:
        return HASH_ALGS[self.hash_alg][0]

    @property
    def scheme(self) -> str:
        return {_SIG_RSASSA: "rsassa", _SIG_RSAPSS: "rsapss", _SIG_ECDSA: "ecdsa"}[self.sig_alg]

    @classmethod
    def parse(cls, data: bytes) -> Signature:
        r = _Reader(data, "TPMT_SIGNATURE")
        alg = r.u16("sigAlg")
        if alg not in (_SIG_RSASSA, _SIG_RSAPSS, _SIG_ECDSA):
            raise ParseError("TPMT_SIGNATURE", "sigAlg", 0, f"unsupported 0x{alg:04x}")
        hash_alg = r.u16("signature.hash")
        if hash_alg not in HASH_ALGS:
            raise ParseError("TPMT_SIGNATURE", "signature.hash", 2, f"unsupported 0x{hash_alg:04x}")
        if alg == _SIG_ECDSA:
            sig_r = int.from_bytes(r.tpm2b("signature.signatureR"), "big")
            sig_s = int.from_bytes(r.tpm2b("signature.signatureS"), "big")
            sig = encode_dss_signature(sig_r, sig_s)
        else:
            sig = r.tpm2b("signature.sig")
        r.end()
        return cls(data, alg, hash_alg, sig)

    def verify(
        self, public: Public | rsa.RSAPublicKey | ec.EllipticCurvePublicKey, message: bytes
    ) -> None:
        """Raise VerificationError("quote.signature") unless this signs exactly ``message``."""
        key = public.public_key() if isinstance(public, Public) else public
        algorithm = _CRYPTO_HASHES[self.hash_name]()
        try:
            if self.sig_alg == _SIG_ECDSA:
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise VerificationError(
                        "quote.signature", "ECDSA signature but the AK is not an ECC key"
                    )
                key.verify(self.signature, message, ec.ECDSA(algorithm))
                return
            if not isinstance(key, rsa.RSAPublicKey):
                raise VerificationError(
                    "quote.signature", f"{self.scheme} signature but the AK is not RSA"
                )
            if self.sig_alg == _SIG_RSAPSS:
                # TPMs use salt = digest size (Part 1 §B.7, libtpms); accept any salt length
                key.verify(
                    self.signature,
                    message,
                    padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO),
                    algorithm,
                )
            else:
                key.verify(self.signature, message, padding.PKCS1v15(), algorithm)
        except InvalidSignature:
            raise VerificationError(
                "quote.signature",
                f"{self.scheme}/{self.hash_name} signature does not verify with the AK",
            ) from None
        except ValueError as exc:  # e.g. an RSA signature of the wrong length
            raise VerificationError("quote.signature", f"malformed signature: {exc}") from None
