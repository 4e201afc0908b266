"""PCR 11 of a unified kernel image (UKI), predicted (issue 20).

Spec: the UAPI Group's "Unified Kernel Image" specification (version 1), section
"UKI TPM PCR Measurements", and systemd's docs/TPM2_PCR_MEASUREMENTS.md: the stub
(systemd-stub) extends PCR 11 with, for each UKI section it knows, in the canonical
order, first the digest of the section name with its NUL terminator, then the digest of
the section's contents (``VirtualSize`` bytes as loaded). ``.pcrsig`` is never measured
(it signs the result). systemd-pcrphase then extends the digest of each boot phase word
(``enter-initrd``, ``leave-initrd``, ``sysinit``, ``ready``, ...; no terminator), so a
machine quoting PCR 11 when fully booted is at phase
``enter-initrd:leave-initrd:sysinit:ready``.

Which sections a stub measures depends on its version: systemd 252's stub (Debian 12)
measures ``.linux .osrel .cmdline .initrd .splash .dtb .pcrpkey``; later stubs add
``.uname`` and ``.sbat`` (and ``.ucode`` before ``.splash``). The version is read from the
stub's ``.sdmagic`` (``#### LoaderInfo: systemd-stub 252... ####``); a stub whose version
cannot be read is taken as a current one, and the prediction says so. Multi-profile UKIs
(``.profile`` sections) are refused: which profile boots is chosen at boot time.

Three sources give the same values, so a distribution that ships any needs no extra step:

- the UKI itself (:func:`uki_pcr11`), computed here;
- the JSON ``systemd-measure calculate --json=short`` (and ``ukify``) print
  (:func:`parse_measure_json`): ``{bank: [{phase, pcr: 11, hash}]}``;
- the UKI's ``.pcrsig`` (``systemd-measure sign``'s JSON: ``{bank: [{pcrs: [11], pkfp,
  pol, sig}]}``): it holds TPM2 PolicyPCR digests, not PCR values, so it cannot give a
  value; :func:`check_pcrsig` holds computed values against it (a ``pol`` that no computed
  value yields is refused) and verifies ``sig`` (RSA PKCS#1 v1.5 over ``pol`` with the
  bank's hash) with the ``.pcrpkey`` public key.

Not checked: that the stub will actually boot, or the UKI's Authenticode signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vtpm_core.authenticode import PeImage
from vtpm_core.errors import ConfigError, ParseError

__all__ = [
    "DEFAULT_PHASES",
    "Pcr11Value",
    "check_pcrsig",
    "parse_measure_json",
    "policy_pcr_digest",
    "uki_pcr11",
]

PCR = 11
DEFAULT_PHASES = (
    "enter-initrd",
    "enter-initrd:leave-initrd",
    "enter-initrd:leave-initrd:sysinit",
    "enter-initrd:leave-initrd:sysinit:ready",
)
# the canonical order (UKI spec; systemd src/fundamental/uki.h); .pcrsig is not measured
_SECTIONS_CURRENT = (
    ".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".uname", ".sbat",
    ".pcrpkey",
)  # fmt: skip
_SECTIONS_252 = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey")
_PHASE_WORD = re.compile(r"[A-Za-z0-9_.-]+")
_TPM_ALG = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
_TPM_CC_POLICY_PCR = 0x0000017F
_SDMAGIC = re.compile(rb"LoaderInfo: systemd-stub (\d+)")


@dataclass(frozen=True, slots=True)
class Pcr11Value:
    """One predicted PCR 11 value: bank, boot phase, value, and where it came from."""

    bank: str
    phase: str
    value: bytes
    source: str

    def describe(self) -> str:
        if self.phase.startswith("after "):
            return f"{self.source}, {self.phase}"
        return f"{self.source}, phase {self.phase or '(stub only)'}"


def _extend(bank: str, pcr: bytes, data: bytes) -> bytes:
    return hashlib.new(bank, pcr + hashlib.new(bank, data).digest()).digest()


def _check_phase(phase: str, where: str) -> tuple[str, ...]:
    words = tuple(phase.split(":")) if phase else ()
    for w in words:
        if not _PHASE_WORD.fullmatch(w):
            raise ConfigError(f"{where}: phase {phase!r} has a bad word {w!r}")
    return words


def uki_pcr11(
    image: bytes,
    name: str,
    *,
    banks: Sequence[str] = ("sha256",),
    phases: Sequence[str] = DEFAULT_PHASES,
) -> tuple[tuple[Pcr11Value, ...], str]:
    """The PCR 11 values the UKI ``image`` leads to at each of ``phases``, in each bank, and
    a description of what was measured (stub version, sections). Raises ParseError for a
    malformed PE and ConfigError for a PE that is no UKI (no ``.linux``) or has profiles."""
    pe = PeImage.parse(image)
    present = {s.name.decode("ascii", "replace"): s for s in pe.sections}
    if ".linux" not in present:
        raise ConfigError(f"{name}: no .linux section: not a unified kernel image")
    if ".profile" in present:
        raise ConfigError(f"{name}: a multi-profile UKI (.profile sections) is not predicted")
    version = None
    if ".sdmagic" in present:
        found = _SDMAGIC.search(pe.section_data(present[".sdmagic"]))
        version = int(found.group(1)) if found else None
    order = _SECTIONS_252 if version is not None and version < 253 else _SECTIONS_CURRENT
    measured = [s for s in order if s in present]
    contents = [(s, pe.section_data(present[s])) for s in measured]
    stub = f"systemd-stub {version}" if version is not None else "a stub of unknown version"
    what = f"{name} ({stub}; sections {' '.join(measured)})"
    out = []
    for bank in banks:
        if bank not in _TPM_ALG:
            raise ConfigError(f"{name}: bank {bank!r} (known: {', '.join(_TPM_ALG)})")
        pcr = bytes(hashlib.new(bank).digest_size)
        for section, data in contents:
            pcr = _extend(bank, pcr, section.encode() + b"\0")
            pcr = _extend(bank, pcr, data)
        for phase in phases:
            value = pcr
            for word in _check_phase(phase, name):
                value = _extend(bank, value, word.encode())
            out.append(Pcr11Value(bank, phase, value, what))
    return tuple(out), what


def parse_measure_json(data: bytes, source: str) -> tuple[Pcr11Value, ...]:
    """``systemd-measure calculate --json`` output: every (bank, phase, PCR 11 value).
    A malformed file is a ParseError naming ``source`` and the field (``sha256[1].hash``)."""
    s = f"systemd-measure JSON {source}"
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ParseError(s, "json", getattr(exc, "pos", 0), str(exc)) from None
    if not isinstance(doc, dict) or not doc:
        raise ParseError(s, "(top)", 0, "expected an object of banks")
    out = []
    for bank, entries in doc.items():
        if bank not in _TPM_ALG:
            raise ParseError(s, bank, 0, f"unknown bank (known: {', '.join(_TPM_ALG)})")
        if not isinstance(entries, list) or not entries:
            raise ParseError(s, bank, 0, "expected a non-empty list")
        for i, e in enumerate(entries):
            where = f"{bank}[{i}]"
            if not isinstance(e, dict):
                raise ParseError(s, where, 0, "expected an object")
            if e.get("pcr") != PCR:
                raise ParseError(s, f"{where}.pcr", 0, f"expected 11, got {e.get('pcr')!r}")
            phase = e.get("phase", "")
            if not isinstance(phase, str):
                raise ParseError(s, f"{where}.phase", 0, f"expected a string, got {phase!r}")
            try:
                _check_phase(phase, source)
            except ConfigError as exc:
                raise ParseError(s, f"{where}.phase", 0, str(exc)) from None
            value = _hex(e.get("hash"), hashlib.new(bank).digest_size, s, f"{where}.hash")
            out.append(Pcr11Value(bank, phase, value, f"{source} (systemd-measure)"))
    return tuple(out)


def _hex(value: Any, size: int, structure: str, where: str) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ParseError(structure, where, 0, f"expected {2 * size} hex digits, got {value!r}")
    return raw


def policy_pcr_digest(bank: str, value: bytes) -> bytes:
    """The TPM2 policy digest of PolicyPCR(PCR 11 in ``bank`` = ``value``) from an empty
    SHA-256 session (TPM 2.0 Part 3 §23.7): what ``.pcrsig``'s ``pol`` holds."""
    select = struct.pack(">IHB", 1, _TPM_ALG[bank], 3) + bytes([0, 1 << (PCR - 8), 0])
    pcr_digest = hashlib.sha256(value).digest()
    return hashlib.sha256(
        bytes(32) + struct.pack(">I", _TPM_CC_POLICY_PCR) + select + pcr_digest
    ).digest()


def check_pcrsig(
    pcrsig: bytes, pcrpkey: bytes | None, values: Sequence[Pcr11Value], source: str
) -> int:
    """Hold ``values`` against a ``.pcrsig``: every signed ``pol`` must be the PolicyPCR
    digest of one of them (else ConfigError: the UKI's own prediction disagrees with ours),
    and each ``sig`` must verify with ``pcrpkey`` (PEM) when given. Returns how many
    signed policies matched. A malformed ``.pcrsig`` is a ParseError naming the field."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    s = f".pcrsig of {source}"
    try:
        doc = json.loads(pcrsig.rstrip(b"\0"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ParseError(s, "json", getattr(exc, "pos", 0), str(exc)) from None
    if not isinstance(doc, dict):
        raise ParseError(s, "(top)", 0, "expected an object of banks")
    key = None
    if pcrpkey is not None:
        try:
            key = serialization.load_pem_public_key(pcrpkey.rstrip(b"\0"))
        except ValueError as exc:
            raise ParseError(f".pcrpkey of {source}", "PEM", 0, str(exc)) from None
    matched = 0
    for bank, entries in doc.items():
        if bank not in _TPM_ALG or not isinstance(entries, list):
            raise ParseError(s, str(bank), 0, "expected a known bank with a list")
        ours = {policy_pcr_digest(v.bank, v.value): v for v in values if v.bank == bank}
        for i, e in enumerate(entries):
            where = f"{bank}[{i}]"
            if not isinstance(e, dict) or e.get("pcrs") != [PCR]:
                raise ParseError(s, f"{where}.pcrs", 0, "expected [11]")
            pol = _hex(e.get("pol"), 32, s, f"{where}.pol")
            if pol not in ours:
                raise ConfigError(
                    f"{s}: {where}.pol {pol.hex()} is the policy of no PCR 11 value computed"
                    f" here ({len(ours)} in {bank}): the UKI's signed prediction disagrees"
                )
            if isinstance(key, rsa.RSAPublicKey):
                try:
                    sig = base64.b64decode(str(e.get("sig")), validate=True)
                    key.verify(sig, pol, padding.PKCS1v15(), _hash(bank))
                except (InvalidSignature, binascii.Error, ValueError):
                    raise ConfigError(
                        f"{s}: {where}.sig does not verify with the .pcrpkey"
                    ) from None
            matched += 1
    return matched


def _hash(bank: str) -> Any:
    from cryptography.hazmat.primitives import hashes

    # (SHA-1 only where the bank is SHA-1: systemd-measure signs with the bank's hash)
    algorithms: dict[str, Any] = {
        "sha1": hashes.SHA1(),  # noqa: S303
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }
    return algorithms[bank]
