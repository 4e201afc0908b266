"""Request bodies of the attestation API, parsed at the boundary into frozen values.

Every TPM structure travels as standard base64 (RFC 4648, section 4) of its
wire encoding. A bad field raises :class:`ParseError` naming the message and
the field (offset 0: JSON has no byte offsets worth reporting).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from vtpm_core.errors import ParseError

__all__ = [
    "ActivationRequest",
    "EvidenceRequest",
    "FaultReport",
    "ImaDelta",
    "PolicyRequest",
    "RegistrationRequest",
    "decode_json",
]

_BANKS = ("sha1", "sha256", "sha384", "sha512", "sm3_256")
_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def decode_json(body: bytes, structure: str) -> dict[str, Any]:
    """The body as a JSON object, or ParseError saying where it broke."""
    try:
        value = json.loads(body)
    except UnicodeDecodeError as exc:
        raise ParseError(structure, "body", exc.start, "not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ParseError(structure, "body", exc.pos, f"malformed JSON: {exc.msg}") from None
    except RecursionError:  # "[[[[..." past the interpreter's recursion limit
        raise ParseError(structure, "body", 0, "malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise ParseError(
            structure, "body", 0, f"expected a JSON object, got {type(value).__name__}"
        )
    return value


def _b64(obj: dict[str, Any], structure: str, field: str, *, required: bool = True) -> bytes | None:
    value = obj.get(field)
    if value is None:
        if required:
            raise ParseError(structure, field, 0, "missing")
        return None
    if not isinstance(value, str):
        raise ParseError(
            structure, field, 0, f"expected a base64 string, got {type(value).__name__}"
        )
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ParseError(structure, field, 0, f"bad base64: {exc}") from None
    if required and not raw:
        raise ParseError(structure, field, 0, "empty")
    return raw


def _req(value: bytes | None) -> bytes:
    assert value is not None  # _b64(required=True) never returns None
    return value


def _opt_str(obj: dict[str, Any], structure: str, field: str, limit: int = 255) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ParseError(structure, field, 0, f"expected a string of 1..{limit} characters")
    return value


def _unknown(obj: dict[str, Any], structure: str, known: set[str]) -> None:
    extra = sorted(set(obj) - known)
    if extra:
        raise ParseError(structure, extra[0], 0, f"unknown field (known: {sorted(known)})")


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """``POST /v1/attesters``: EK certificate and/or EK public, AK public, optional VM id."""

    ek_certificate: bytes | None
    ek_public: bytes | None
    ak_public: bytes
    vm_id: str | None

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> RegistrationRequest:
        s = "RegistrationRequest"
        _unknown(obj, s, {"ek_certificate", "ek_public", "ak_public", "vm_id"})
        cert = _b64(obj, s, "ek_certificate", required=False)
        ek = _b64(obj, s, "ek_public", required=False)
        if cert is None and ek is None:
            raise ParseError(s, "ek_certificate", 0, "give ek_certificate, ek_public or both")
        return cls(cert, ek, _req(_b64(obj, s, "ak_public")), _opt_str(obj, s, "vm_id"))


@dataclass(frozen=True, slots=True)
class ActivationRequest:
    """``POST /v1/attesters/{id}/activation``: the secret TPM2_ActivateCredential returned."""

    secret: bytes

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> ActivationRequest:
        s = "ActivationRequest"
        _unknown(obj, s, {"secret"})
        return cls(_req(_b64(obj, s, "secret")))


FAULT_KINDS = ("tpm", "event_log", "ima_list")


@dataclass(frozen=True, slots=True)
class FaultReport:
    """``POST /v1/attesters/{id}/faults`` (issue 16): the agent could not produce evidence.

    ``kind``: ``tpm`` (the TPM failed or is gone), ``event_log`` or ``ima_list``
    (unreadable);
    ``detail``: the agent's one-line message, at most 500 characters.
    """

    kind: str
    detail: str

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> FaultReport:
        s = "FaultReport"
        _unknown(obj, s, {"kind", "detail"})
        kind, detail = obj.get("kind"), obj.get("detail", "")
        if kind not in FAULT_KINDS:
            raise ParseError(s, "kind", 0, f"expected one of {', '.join(FAULT_KINDS)}")
        if not isinstance(detail, str) or len(detail) > 500:
            raise ParseError(s, "detail", 0, "expected a string of at most 500 characters")
        return cls(str(kind), detail)


def parse_pcrs(value: object, structure: str = "EvidenceRequest") -> dict[str, dict[int, bytes]]:
    """``{"sha256": {"0": "hex", ...}}`` (the shape `vtpm eventlog replay --json` prints)."""
    if not isinstance(value, dict) or not value:
        raise ParseError(structure, "pcrs", 0, 'expected {"<bank>": {"<index>": "<hex>"}}')
    out: dict[str, dict[int, bytes]] = {}
    for bank, entries in value.items():
        if bank not in _BANKS or not isinstance(entries, dict):
            raise ParseError(structure, f"pcrs.{bank}", 0, f"unknown bank (known: {_BANKS})")
        values: dict[int, bytes] = {}
        for index, hexval in entries.items():
            where = f"pcrs.{bank}.{index}"
            if not isinstance(index, str) or not index.isdigit() or not 0 <= int(index) < 24:
                raise ParseError(structure, where, 0, "PCR index must be a string 0..23")
            if not isinstance(hexval, str):
                raise ParseError(structure, where, 0, "expected a hex string")
            try:
                digest = bytes.fromhex(hexval)
            except ValueError:
                raise ParseError(structure, where, 0, "not hexadecimal") from None
            if len(digest) != _DIGEST_SIZES[bank]:
                raise ParseError(
                    structure,
                    where,
                    0,
                    f"{len(digest)} bytes, expected {_DIGEST_SIZES[bank]} for {bank}",
                )
            values[int(index)] = digest
        out[bank] = values
    return out


IMA_EXTEND_MODES = ("per-bank", "sha1-padded")
_MAX_INDEX = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class ImaDelta:
    """The ``ima`` field of evidence (issue 14): IMA measurement-list entries from
    ``start_index`` on, as the kernel lists them (``binary_runtime_measurements``
    bytes, or the ASCII lines), read after the quote was taken.

    ``extend``: how the kernel extended PCR 10 (``per-bank``: kernels since 5.8;
    ``sha1-padded``: older ones). Nothing here is trusted: the entries are
    parsed and replayed onto the verified state by the appraiser.
    """

    start_index: int
    entries: bytes
    extend: str = "per-bank"

    @classmethod
    def parse(cls, obj: object) -> ImaDelta:
        s = "EvidenceRequest"
        if not isinstance(obj, dict):
            raise ParseError(s, "ima", 0, 'expected {"start_index": N, "entries": "<base64>"}')
        unknown = sorted(set(obj) - {"start_index", "entries", "extend"})
        if unknown:
            raise ParseError(s, f"ima.{unknown[0]}", 0, "unknown field")
        start = obj.get("start_index")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= _MAX_INDEX:
            raise ParseError(s, "ima.start_index", 0, "expected an entry index >= 0")
        entries = obj.get("entries")
        if not isinstance(entries, str):
            raise ParseError(s, "ima.entries", 0, "expected the entries as a base64 string")
        try:
            raw = base64.b64decode(entries, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ParseError(s, "ima.entries", 0, f"bad base64: {exc}") from None
        extend = obj.get("extend", "per-bank")
        if extend not in IMA_EXTEND_MODES:
            raise ParseError(s, "ima.extend", 0, f"expected one of {', '.join(IMA_EXTEND_MODES)}")
        return cls(start, raw, str(extend))


@dataclass(frozen=True, slots=True)
class EvidenceRequest:
    """``POST /v1/attesters/{id}/evidence``: the answer to one challenge."""

    nonce: bytes
    quote: bytes  # TPMS_ATTEST (what `tpm2_quote -m` writes)
    signature: bytes  # TPMT_SIGNATURE (`tpm2_quote -s`)
    pcrs: dict[str, dict[int, bytes]]
    event_log: bytes | None
    ak_public: bytes | None  # optional: lets the verifier name an AK swap
    ima: ImaDelta | None = None  # the IMA delta (issue 14); None: none sent

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> EvidenceRequest:
        s = "EvidenceRequest"
        _unknown(obj, s, {"nonce", "quote", "signature", "pcrs", "event_log", "ak_public", "ima"})
        return cls(
            nonce=_req(_b64(obj, s, "nonce")),
            quote=_req(_b64(obj, s, "quote")),
            signature=_req(_b64(obj, s, "signature")),
            pcrs=parse_pcrs(obj.get("pcrs")),
            event_log=_b64(obj, s, "event_log", required=False),
            ak_public=_b64(obj, s, "ak_public", required=False),
            ima=ImaDelta.parse(obj["ima"]) if obj.get("ima") is not None else None,
        )


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """``POST /v1/policies``, ``PUT /v1/policies/{name}``: a policy (YAML or JSON text)."""

    name: str
    body: str

    @classmethod
    def parse(cls, obj: dict[str, Any], name: str | None = None) -> PolicyRequest:
        s = "PolicyRequest"
        _unknown(obj, s, {"name", "policy"})
        given = obj.get("name", name)
        if not isinstance(given, str) or not _NAME_RE.match(given):
            raise ParseError(
                s, "name", 0, "expected 1..128 of [A-Za-z0-9._-], not starting with . or -"
            )
        if name is not None and given != name:
            raise ParseError(s, "name", 0, f"body names {given!r}, the URL {name!r}")
        policy = obj.get("policy")
        if isinstance(policy, dict):
            policy = json.dumps(policy, sort_keys=True)
        if not isinstance(policy, str) or not policy.strip():
            raise ParseError(
                s, "policy", 0, "expected the policy document (YAML/JSON text or object)"
            )
        return cls(given, policy)


def check_name(name: str, structure: str, field: str) -> str:
    if not _NAME_RE.match(name):
        raise ParseError(structure, field, 0, "expected 1..128 of [A-Za-z0-9._-]")
    return name
