"""The metadata of one vTPM in the store (``vtpm.json``), parsed once at the boundary.

Binary fields travel base64 (standard alphabet, padded). The EK publics are
the TPM2B_PUBLIC the TPM returned from TPM2_CreatePrimary (TPM 2.0 Library
Part 2, 12.2.5); certificates are DER as written to NV (TCG EK Credential
Profile 2.x, 2.2.1.4).

The record keeps the bytes it was parsed from (``raw``); ``to_json`` is the
only writer, and ``parse(to_json(r))`` gives back ``r``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vtpm_core.errors import ConfigError, ParseError

__all__ = [
    "EK_KINDS",
    "FORMAT",
    "EkRecord",
    "KeyRef",
    "Origin",
    "RetiredKey",
    "TpmInfo",
    "VtpmRecord",
    "check_name",
]

FORMAT = "vtpm-trust/vtpm/1"
_UUID = uuid.UUID
# EK kinds the CLI accepts, and the TCG template each one uses (EK profile B.3.3, B.3.4)
EK_KINDS: Mapping[str, str] = {"rsa2048": "L-1", "ecc-p256": "L-2"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_S = "vtpm.json"

OriginKind = Literal["created", "clone-copy", "clone-replace", "restored"]
EkCertMode = Literal["ca", "external"]


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid vTPM name (it becomes a directory name)."""
    if not _NAME.match(name):
        raise ConfigError(
            f"invalid vTPM name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class TpmInfo:
    """What GetCapability(TPM_PROPERTIES) said about the TPM (Part 2, 6.13)."""

    manufacturer: int  # TPM_PT_MANUFACTURER
    vendor: str  # TPM_PT_VENDOR_STRING_1..4, trailing NULs stripped
    firmware_version: int  # TPM_PT_FIRMWARE_VERSION_1 << 32 | TPM_PT_FIRMWARE_VERSION_2
    spec_family: str  # TPM_PT_FAMILY_INDICATOR, e.g. "2.0"
    spec_level: int  # TPM_PT_LEVEL
    spec_revision: int  # TPM_PT_REVISION (e.g. 164 for 1.64)

    @property
    def firmware_version_1(self) -> int:
        return self.firmware_version >> 32


@dataclass(frozen=True, slots=True)
class EkRecord:
    """One EK: its public area, the NV index of its certificate and the certificate."""

    kind: str  # a key of EK_KINDS
    template_id: str
    nv_index: int
    public: bytes  # TPM2B_PUBLIC
    certificate_der: bytes | None  # None: not certified (yet) - external CA mode
    serial: int | None
    chain_pem: bytes = b""


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Where the data key lives: the provider kind, its key id, the wrapped data key."""

    provider: str
    key_id: str
    wrapped: bytes


@dataclass(frozen=True, slots=True)
class RetiredKey:
    """A KEK that wrapped this vTPM's data key before a rekey (older backups still need it).

    Kept so that ``vtpm delete --shred`` can destroy every key any backup of
    this vTPM names, not only the current one.
    """

    provider: str
    key_id: str


@dataclass(frozen=True, slots=True)
class Origin:
    kind: OriginKind
    source_name: str | None = None
    source_vtpm_id: uuid.UUID | None = None
    source_vm_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class VtpmRecord:
    name: str
    vtpm_id: uuid.UUID
    vm_id: uuid.UUID
    created_at: dt.datetime
    key: KeyRef
    tpm: TpmInfo
    eks: tuple[EkRecord, ...]
    ek_cert_mode: EkCertMode = "ca"
    origin: Origin = Origin("created")
    # serials the CA issued for this VM besides those in NV (a copy's second binding)
    bound_serials: tuple[int, ...] = ()
    # KEKs earlier rekeys moved away from, oldest first (absent from records before issue 15)
    retired_keys: tuple[RetiredKey, ...] = ()
    raw: bytes = field(default=b"", compare=False, repr=False)

    def ek(self, kind: str) -> EkRecord:
        for ek in self.eks:
            if ek.kind == kind:
                return ek
        raise KeyError(kind)

    @property
    def serials(self) -> tuple[int, ...]:
        """Every certificate serial this vTPM holds or is bound to."""
        nv = tuple(ek.serial for ek in self.eks if ek.serial is not None)
        return nv + tuple(s for s in self.bound_serials if s not in nv)

    def renamed(self, name: str) -> VtpmRecord:
        return replace(self, name=name, raw=b"")

    def rekeyed(self, key: KeyRef) -> VtpmRecord:
        """This record with ``key`` as its data key, the old KEK retired (unless it is the same)."""
        old = RetiredKey(self.key.provider, self.key.key_id)
        same = (key.provider, key.key_id) == (old.provider, old.key_id)
        retired = (
            self.retired_keys
            if same or old in self.retired_keys
            else (
                *self.retired_keys,
                old,
            )
        )
        return replace(self, key=key, retired_keys=retired, raw=b"")

    def all_keys(self) -> tuple[RetiredKey, ...]:
        """The current KEK and every retired one: what a backup of this vTPM may need."""
        return (RetiredKey(self.key.provider, self.key.key_id), *self.retired_keys)

    # -- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        doc = self._to_dict()
        if self.retired_keys:
            doc["retired_keys"] = [
                {"provider": k.provider, "key_id": k.key_id} for k in self.retired_keys
            ]
        return doc

    def _to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "vtpm_id": str(self.vtpm_id),
            "vm_id": str(self.vm_id),
            "created_at": self.created_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "key": {
                "provider": self.key.provider,
                "key_id": self.key.key_id,
                "wrapped": _b64(self.key.wrapped),
            },
            "tpm": {
                "manufacturer": self.tpm.manufacturer,
                "vendor": self.tpm.vendor,
                "firmware_version": self.tpm.firmware_version,
                "spec_family": self.tpm.spec_family,
                "spec_level": self.tpm.spec_level,
                "spec_revision": self.tpm.spec_revision,
            },
            "ek_cert_mode": self.ek_cert_mode,
            "eks": [
                {
                    "kind": ek.kind,
                    "template": ek.template_id,
                    "nv_index": f"0x{ek.nv_index:08x}",
                    "public": _b64(ek.public),
                    "certificate": _b64(ek.certificate_der) if ek.certificate_der else None,
                    "serial": f"{ek.serial:x}" if ek.serial is not None else None,
                    "chain_pem": ek.chain_pem.decode("ascii"),
                }
                for ek in self.eks
            ],
            "origin": {
                "kind": self.origin.kind,
                "source_name": self.origin.source_name,
                "source_vtpm_id": _opt_str(self.origin.source_vtpm_id),
                "source_vm_id": _opt_str(self.origin.source_vm_id),
            },
            "bound_serials": [f"{s:x}" for s in self.bound_serials],
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes) -> VtpmRecord:
        """Parse ``vtpm.json`` bytes; ParseError names the field that is wrong."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            pos = getattr(exc, "pos", getattr(exc, "start", 0))
            raise ParseError(_S, "(document)", int(pos), f"not JSON: {exc}") from None
        return cls.from_dict(doc, raw=bytes(data))

    @classmethod
    def from_dict(cls, doc: object, *, raw: bytes = b"", structure: str = _S) -> VtpmRecord:
        r = _Doc(doc, structure, "")
        if r.text("format") != FORMAT:
            raise ParseError(
                structure, "format", 0, f"expected {FORMAT!r}, got {r.get('format')!r}"
            )
        key = r.sub("key")
        tpm = r.sub("tpm")
        origin = r.sub("origin")
        eks = []
        for i, item in enumerate(r.items("eks")):
            e = _Doc(item, structure, f"eks[{i}].")
            kind = e.text("kind")
            if kind not in EK_KINDS:
                raise ParseError(structure, f"eks[{i}].kind", 0, f"unknown EK kind {kind!r}")
            cert = e.opt_b64("certificate")
            serial_hex = e.opt_str("serial")
            eks.append(
                EkRecord(
                    kind=kind,
                    template_id=e.text("template"),
                    nv_index=e.hex_int("nv_index"),
                    public=e.b64("public"),
                    certificate_der=cert,
                    serial=_hex(structure, f"eks[{i}].serial", serial_hex)
                    if serial_hex is not None
                    else None,
                    chain_pem=e.text("chain_pem").encode("ascii"),
                )
            )
        mode = r.text("ek_cert_mode")
        if mode not in ("ca", "external"):
            raise ParseError(structure, "ek_cert_mode", 0, f"unknown mode {mode!r}")
        okind = origin.text("kind")
        if okind not in ("created", "clone-copy", "clone-replace", "restored"):
            raise ParseError(structure, "origin.kind", 0, f"unknown origin {okind!r}")
        return cls(
            name=check_name_parse(structure, r.text("name")),
            vtpm_id=r.uuid("vtpm_id"),
            vm_id=r.uuid("vm_id"),
            created_at=r.time("created_at"),
            key=KeyRef(key.text("provider"), key.text("key_id"), key.b64("wrapped")),
            tpm=TpmInfo(
                manufacturer=tpm.num("manufacturer"),
                vendor=tpm.text("vendor"),
                firmware_version=tpm.num("firmware_version"),
                spec_family=tpm.text("spec_family"),
                spec_level=tpm.num("spec_level"),
                spec_revision=tpm.num("spec_revision"),
            ),
            eks=tuple(eks),
            ek_cert_mode=mode,  # type: ignore[arg-type]
            origin=Origin(
                okind,  # type: ignore[arg-type]
                origin.opt_str("source_name"),
                origin.opt_uuid("source_vtpm_id"),
                origin.opt_uuid("source_vm_id"),
            ),
            bound_serials=tuple(
                _hex(structure, "bound_serials", s) for s in r.items("bound_serials")
            ),
            retired_keys=tuple(
                RetiredKey(k.text("provider"), k.text("key_id"))
                for i, item in enumerate(r.items("retired_keys") if r.get("retired_keys") else [])
                for k in (_Doc(item, structure, f"retired_keys[{i}]."),)
            ),
            raw=raw,
        )


def check_name_parse(structure: str, name: str) -> str:
    if not _NAME.match(name):
        raise ParseError(structure, "name", 0, f"invalid vTPM name {name!r}")
    return name


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _opt_str(value: object | None) -> str | None:
    return None if value is None else str(value)


def _hex(structure: str, fld: str, value: object) -> int:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{1,64}", value):
        raise ParseError(structure, fld, 0, f"expected lower-case hex, got {value!r}")
    return int(value, 16)


class _Doc:
    """Typed access to one JSON object; every miss is a ParseError naming the field."""

    def __init__(self, doc: object, structure: str, prefix: str) -> None:
        if not isinstance(doc, dict):
            raise ParseError(structure, prefix.rstrip(".") or "(document)", 0, "expected an object")
        self._d: dict[str, object] = doc
        self._s = structure
        self._p = prefix

    def _err(self, key: str, message: str) -> ParseError:
        return ParseError(self._s, self._p + key, 0, message)

    def get(self, key: str) -> object:
        return self._d.get(key)

    def _req(self, key: str) -> object:
        if key not in self._d:
            raise self._err(key, "missing")
        return self._d[key]

    def sub(self, key: str) -> _Doc:
        return _Doc(self._req(key), self._s, f"{self._p}{key}.")

    def text(self, key: str) -> str:
        v = self._req(key)
        if not isinstance(v, str):
            raise self._err(key, f"expected a string, got {type(v).__name__}")
        return v

    def opt_str(self, key: str) -> str | None:
        v = self._d.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise self._err(key, f"expected a string or null, got {type(v).__name__}")
        return v

    def num(self, key: str) -> int:
        v = self._req(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise self._err(key, f"expected a non-negative integer, got {v!r}")
        return v

    def items(self, key: str) -> list[object]:
        v = self._req(key)
        if not isinstance(v, list):
            raise self._err(key, f"expected a list, got {type(v).__name__}")
        return v

    def b64(self, key: str) -> bytes:
        v = self.text(key)
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise self._err(key, f"not base64: {exc}") from None

    def opt_b64(self, key: str) -> bytes | None:
        if self._d.get(key) is None:
            return None
        return self.b64(key)

    def hex_int(self, key: str) -> int:
        v = self.text(key)
        if not re.fullmatch(r"0x[0-9a-fA-F]{1,8}", v):
            raise self._err(key, f"expected 0x-prefixed hex, got {v!r}")
        return int(v, 16)

    def uuid(self, key: str) -> _UUID:
        v = self.text(key)
        try:
            return uuid.UUID(v)
        except ValueError:
            raise self._err(key, f"not a UUID: {v!r}") from None

    def opt_uuid(self, key: str) -> _UUID | None:
        if self._d.get(key) is None:
            return None
        return self.uuid(key)

    def time(self, key: str) -> dt.datetime:
        v = self.text(key)
        try:
            return dt.datetime.strptime(v, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            raise self._err(key, f"expected YYYY-MM-DDTHH:MM:SSZ, got {v!r}") from None
