"""The VM identity extension carried in vtpm-trust EK certificates.

Shared by the CA (which encodes it) and the verifier (which decodes it); pure,
no I/O. The extension is non-critical so that X.509 libraries that do not
know it still accept the certificate (RFC 5280 section 4.2).

The OID is derived from a UUID generated once for this project,
9bf21706-9469-4343-9057-8d36a2c6153c. Not under ``2.25.<UUID as one integer>``
(ITU-T X.667): that arc is a 128-bit number, and Go's crypto/x509 (cryptobyte
``readBase128Int`` stops at 31 bits) rejects a *whole certificate* that has
such an extension OID ("malformed extension OID field"), as does pkilint's
DER decoder (pyasn1-fasder: "arc larger than 32-bits"). Instead it uses
Microsoft's documented UUID-to-OID mapping under 1.2.840.113556.1.8000.2554
(the UUID's hex digits split 4-4-4-4-4-6-6, each part in decimal), whose
arcs all fit in 24 bits. ``VM_IDENTITY_OID_X667`` is the 2.25 form of the same
UUID, for reference only.

ASN.1 (DER)::

    vtpmVmIdentity OBJECT IDENTIFIER ::= { 1 2 840 113556 1 8000 2554
        39922 5894 37993 17219 36951 9254562 12981564 }

    VmIdentity ::= SEQUENCE {
        vmId            UTF8String,        -- RFC 4122 UUID, lower-case hyphenated text
        vmName          UTF8String,        -- may be empty
        vtpmInstanceId  UTF8String,        -- may be empty
        createdAt       GeneralizedTime    -- UTC, whole seconds ("YYYYMMDDHHMMSSZ")
    }
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from dataclasses import dataclass
from typing import Any

from vtpm_core.errors import ParseError

__all__ = ["VM_IDENTITY_OID", "VM_IDENTITY_OID_X667", "VM_IDENTITY_UUID", "VmIdentity"]

VM_IDENTITY_UUID = uuid.UUID("9bf21706-9469-4343-9057-8d36a2c6153c")


def _uuid_oid(value: uuid.UUID) -> str:
    h = value.hex
    parts = (h[0:4], h[4:8], h[8:12], h[12:16], h[16:20], h[20:26], h[26:32])
    return "1.2.840.113556.1.8000.2554." + ".".join(str(int(p, 16)) for p in parts)


VM_IDENTITY_OID = _uuid_oid(VM_IDENTITY_UUID)
VM_IDENTITY_OID_X667 = f"2.25.{VM_IDENTITY_UUID.int}"

_MAX_TEXT = 1024


@functools.cache
def _decoder() -> Any:
    """The asn1crypto declaration :meth:`VmIdentity.parse` decodes with, made when
    first needed: an issuance only builds (by hand), so ``vtpm create`` does not
    import asn1crypto."""
    from asn1crypto import core

    class _VmIdentityAsn1(core.Sequence):  # type: ignore[misc]
        _fields = [  # noqa: RUF012 - asn1crypto's declaration style
            ("vm_id", core.UTF8String),
            ("vm_name", core.UTF8String),
            ("vtpm_instance_id", core.UTF8String),
            ("created_at", core.GeneralizedTime),
        ]

    return _VmIdentityAsn1


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


@dataclass(frozen=True, slots=True)
class VmIdentity:
    """Which VM (and which vTPM instance) an EK was certified for.

    ``raw`` is the DER the value was parsed from (or encodes to).
    """

    vm_id: uuid.UUID
    vm_name: str
    vtpm_instance_id: str
    created_at: dt.datetime
    raw: bytes

    @classmethod
    def build(
        cls, vm_id: uuid.UUID, vm_name: str, vtpm_instance_id: str, created_at: dt.datetime
    ) -> VmIdentity:
        """Encode; ``created_at`` must be timezone-aware and is truncated to seconds."""
        if created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware")
        when = created_at if created_at.tzinfo is dt.UTC else created_at.astimezone(dt.UTC)
        if when.microsecond:
            when = when.replace(microsecond=0)
        if when.year < 1000:  # asn1crypto (the decoder) cannot write such a GeneralizedTime
            raise ValueError("created_at before the year 1000")
        if len(vm_name) > _MAX_TEXT:
            raise ValueError(f"vmName longer than {_MAX_TEXT} characters")
        if len(vtpm_instance_id) > _MAX_TEXT:
            raise ValueError(f"vtpmInstanceId longer than {_MAX_TEXT} characters")
        # Hand-written DER (the decoder below is asn1crypto, so the two cross-check in tests);
        # built on every issuance, where asn1crypto's encoder cost ~90 us.
        der = _tlv(
            0x30,
            _tlv(0x0C, str(vm_id).encode())
            + _tlv(0x0C, vm_name.encode())
            + _tlv(0x0C, vtpm_instance_id.encode())
            + b"\x18\x0f%04d%02d%02d%02d%02d%02dZ"
            % (when.year, when.month, when.day, when.hour, when.minute, when.second),
        )
        return cls(vm_id, vm_name, vtpm_instance_id, when, der)

    @classmethod
    def parse(cls, data: bytes) -> VmIdentity:
        """Decode the extension value (the DER inside extnValue's OCTET STRING).

        Raises :class:`ParseError` for anything but exactly one DER VmIdentity in the
        form :meth:`build` writes (lower-case hyphenated vmId, whole-second UTC
        createdAt, texts of at most 1024 characters), so ``build`` of the parsed
        fields gives back exactly ``data``.
        """
        try:
            value = _decoder().load(bytes(data), strict=True)
            vm_id_text = value["vm_id"].native
            vm_name = value["vm_name"].native
            instance = value["vtpm_instance_id"].native
            created = value["created_at"].native
            # re-encoding is the DER check; asn1crypto raises ValueError for a time it
            # cannot encode (no "Z": a local time)
            der_again = value.dump(force=True)
        except (ValueError, TypeError) as exc:
            raise ParseError("VmIdentity", "der", 0, f"not a DER VmIdentity: {exc}") from exc
        try:
            vm_id = uuid.UUID(vm_id_text)
        except ValueError as exc:
            raise ParseError("VmIdentity", "vmId", 0, f"not a UUID: {vm_id_text!r}") from exc
        if vm_id_text != str(vm_id):  # not "{...}", "urn:uuid:", upper case or bare hex
            raise ParseError(
                "VmIdentity", "vmId", 0, f"not a lower-case hyphenated UUID: {vm_id_text!r}"
            )
        if der_again != bytes(data):
            raise ParseError("VmIdentity", "der", 0, "not in DER form")
        if not isinstance(created, dt.datetime) or created.microsecond:
            raise ParseError("VmIdentity", "createdAt", 0, "not whole seconds in UTC")
        if len(vm_name) > _MAX_TEXT or len(instance) > _MAX_TEXT:
            raise ParseError("VmIdentity", "vmName", 0, f"longer than {_MAX_TEXT} characters")
        return cls(vm_id, vm_name, instance, created, bytes(data))

    def to_bytes(self) -> bytes:
        return self.raw
