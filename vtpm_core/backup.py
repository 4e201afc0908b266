"""vTPM backup files: everything needed to restore one vTPM, integrity-protected.

Layout (all integers big-endian)::

    magic    8 bytes  "VTPMBAK" 0x01
    length   4 bytes  length of body
    body     JSON     {"format": "vtpm-trust/backup/1", "record": <vtpm.json>,
                       "key_provider": {"id": ..., "kind": ..., "where": ...},
                       "state": {"tpm2-00.permall": base64, ...}}
    digest  32 bytes  SHA-256(magic || length || body)
    mac     32 bytes  HMAC-SHA256(K, magic || length || body),
                      K = HKDF-SHA256(data key, info "vtpm-trust backup mac v1")  (RFC 5869)

The digest catches a damaged file before any key is needed; the MAC proves
that someone holding the vTPM's data key wrote it, so it can only be checked
once the key provider has unwrapped that key. ``key_provider`` names the
provider that holds the key (the record's ``key.provider`` is its id, and
``key.key_id`` the key there) so that a restore that cannot reach it says
which KMS or token is needed; backups written before it have no such field. The state stays as swtpm
encrypted it; the data key stays wrapped. As in VMware, a backup without the
state cannot be restored: :meth:`Backup.require_state` says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtpm_core.errors import ParseError, StateError, VerificationError
from vtpm_core.record import VtpmRecord

__all__ = ["MAGIC", "STATE_FILES", "Backup"]

MAGIC = b"VTPMBAK\x01"
FORMAT = "vtpm-trust/backup/1"
# the swtpm files that make up a TPM 2.0 state (permanent, volatile, saved)
STATE_FILES = ("tpm2-00.permall", "tpm2-00.volatilestate", "tpm2-00.savestate")
_S = "vtpm-backup"
_HEAD = len(MAGIC) + 4
_TRAILER = 64
_MAX_BODY = 64 << 20


def _mac_key(data_key: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"vtpm-trust backup mac v1"
    ).derive(data_key)


@dataclass(frozen=True, slots=True)
class Backup:
    """A parsed backup whose digest matched; its MAC is checked by :meth:`verify_mac`."""

    record: VtpmRecord
    state: Mapping[str, bytes]
    signed: bytes = field(repr=False)  # magic || length || body, as received
    mac: bytes = field(repr=False)
    provider: Mapping[str, str] | None = None  # {"id", "kind", "where"} of the key's provider

    @staticmethod
    def build(
        record: VtpmRecord,
        state: Mapping[str, bytes],
        data_key: bytes,
        *,
        provider: Mapping[str, str] | None = None,
    ) -> bytes:
        """Serialise; ``data_key`` is the vTPM's unwrapped data key (for the MAC only)."""
        doc: dict[str, object] = {"format": FORMAT, "record": record.to_dict()}
        if provider is not None:
            doc["key_provider"] = dict(provider)
        doc["state"] = {n: base64.b64encode(d).decode("ascii") for n, d in state.items()}
        body = json.dumps(doc, indent=1).encode()
        signed = MAGIC + struct.pack(">I", len(body)) + body
        digest = hashlib.sha256(signed).digest()
        mac = hmac.new(_mac_key(data_key), signed, hashlib.sha256).digest()
        return signed + digest + mac

    @classmethod
    def parse(cls, data: bytes) -> Backup:
        """Check framing and digest, parse the body. The MAC is not checked here."""
        if len(data) < _HEAD:
            raise ParseError(_S, "magic", 0, f"file too short ({len(data)} bytes)")
        if data[: len(MAGIC)] != MAGIC:
            raise ParseError(_S, "magic", 0, "not a vtpm-trust backup (bad magic)")
        (length,) = struct.unpack_from(">I", data, len(MAGIC))
        if length > _MAX_BODY:
            raise ParseError(_S, "length", len(MAGIC), f"body length {length} is implausible")
        end = _HEAD + length
        if len(data) != end + _TRAILER:
            raise ParseError(
                _S,
                "length",
                len(MAGIC),
                f"file is {len(data)} bytes, expected {end + _TRAILER} (truncated or extended)",
            )
        signed, digest, mac = data[:end], data[end : end + 32], data[end + 32 :]
        if not hmac.compare_digest(hashlib.sha256(signed).digest(), digest):
            raise VerificationError("backup.digest", "SHA-256 mismatch: the backup is damaged")
        try:
            doc = json.loads(data[_HEAD:end])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ParseError(_S, "body", _HEAD, f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ParseError(_S, "body.format", _HEAD, f"expected format {FORMAT!r}")
        record = VtpmRecord.from_dict(doc.get("record"), structure=f"{_S}.record")
        raw_state = doc.get("state")
        if raw_state is None:
            raw_state = {}
        if not isinstance(raw_state, dict):
            raise ParseError(_S, "body.state", _HEAD, "expected an object")
        state: dict[str, bytes] = {}
        for name, value in raw_state.items():
            if name not in STATE_FILES:
                raise ParseError(_S, f"body.state.{name}", _HEAD, "not a swtpm state file name")
            if not isinstance(value, str):
                raise ParseError(_S, f"body.state.{name}", _HEAD, "expected base64 text")
            try:
                state[name] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ParseError(_S, f"body.state.{name}", _HEAD, f"not base64: {exc}") from None
        provider = doc.get("key_provider")
        if provider is not None:
            if not isinstance(provider, dict) or not all(
                isinstance(provider.get(k), str) for k in ("id", "kind", "where")
            ):
                raise ParseError(_S, "body.key_provider", _HEAD, "expected {id, kind, where} text")
            if provider["id"] != record.key.provider:
                raise ParseError(
                    _S,
                    "body.key_provider.id",
                    _HEAD,
                    f"{provider['id']!r} is not the record's key provider {record.key.provider!r}",
                )
            provider = MappingProxyType({k: provider[k] for k in ("id", "kind", "where")})
        return cls(record, MappingProxyType(state), signed, mac, provider)

    def require_state(self, source: str) -> None:
        """StateError unless the backup holds the vTPM's permanent state."""
        if not self.state.get(STATE_FILES[0]):
            raise StateError(
                f"backup {source} of vTPM {self.record.name!r} holds no vTPM state "
                f"({STATE_FILES[0]}): a vTPM cannot be restored without its state"
            )

    def verify_mac(self, data_key: bytes) -> None:
        """VerificationError("backup.mac") unless the MAC was made with ``data_key``."""
        want = hmac.new(_mac_key(data_key), self.signed, hashlib.sha256).digest()
        if not hmac.compare_digest(want, self.mac):
            raise VerificationError(
                "backup.mac",
                f"backup of vTPM {self.record.name!r} was not written with its data key "
                "(altered after the backup was made)",
            )
