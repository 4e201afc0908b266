"""dbx updates, and which boots they revoke (issue 20).

Two inputs name the same revocations:

- the authenticated variable a dbx update ships as (``DBXUpdate.bin``): an
  EFI_VARIABLE_AUTHENTICATION_2 (UEFI Specification 2.10, 8.2.2: an EFI_TIME,
  then a WIN_CERTIFICATE_UEFI_GUID whose ``dwLength`` covers its PKCS#7
  CertData) followed by the new dbx content, EFI_SIGNATURE_LISTs (32.4.1)
  parsed by ``verifier.eventlog.efivars.SignatureDatabase``. The PKCS#7
  signature (a KEK's) is NOT verified here: the firmware does that when the
  update is applied; this module only reads what the update revokes;
- Microsoft's machine-readable list (microsoft/secureboot_objects,
  ``PreSignedObjects/DBX/dbx_info_msft_*.json``): ``images.<arch>[]`` with
  ``authenticodeHash`` (SHA-256 hex), ``certificates[]`` with ``thumbprint``
  (SHA-1 hex of the certificate), ``svns[]`` (Windows boot manager SVNs, read
  and counted, not matched).

:func:`scan` holds one replayed event log against an update: the boot
applications (PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION, whose SHA-256 digest is
the image's Authenticode hash) the update revokes, the authorities (PCR 7
EV_EFI_VARIABLE_AUTHORITY, the db certificate that verified an image) it
revokes, and whether the measured dbx already holds every hash entry of the
update (dbx currency). Only events whose digests the replay proves are read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from verifier.eventlog import ReplayedLog
from verifier.eventlog.efivars import EfiVariable, SignatureData, SignatureDatabase
from verifier.eventlog.guids import EFI_CERT_SHA256, EFI_CERT_X509
from vtpm_core.errors import ParseError

__all__ = ["DbxFinding", "DbxScan", "DbxUpdate", "scan"]

_WIN_CERT_TYPE_EFI_GUID = 0x0EF1
_WIN_CERT_REVISION = 0x0200
_EFI_TIME = 16
_BOOT_APPLICATION = 0x80000003  # EV_EFI_BOOT_SERVICES_APPLICATION
_AUTHORITY = 0x800000E0  # EV_EFI_VARIABLE_AUTHORITY
_DRIVER_CONFIG = 0x80000001  # EV_EFI_VARIABLE_DRIVER_CONFIG


@dataclass(frozen=True, slots=True)
class DbxUpdate:
    """What an update revokes: Authenticode SHA-256 hashes, certificates (by SHA-1 and
    SHA-256 thumbprint), and (JSON only) the names of the images and SVN entries."""

    source: str  # "authenticated-variable" | "microsoft-json"
    hashes: frozenset[bytes]
    cert_sha1: frozenset[bytes]
    cert_sha256: frozenset[bytes]
    names: dict[bytes, str]  # hash -> file name (JSON)
    svns: int

    @classmethod
    def parse(cls, data: bytes) -> DbxUpdate:
        """Either format: JSON when it starts with ``{`` (after whitespace)."""
        if data.lstrip()[:1] == b"{":
            return cls.parse_json(data)
        return cls.parse_authenticated(data)

    @classmethod
    def parse_authenticated(cls, data: bytes) -> DbxUpdate:
        s = "EFI_VARIABLE_AUTHENTICATION_2"
        if len(data) < _EFI_TIME + 24:
            raise ParseError(s, "AuthInfo", 0, f"{len(data)} bytes, too short for the header")
        length, revision, cert_type = struct.unpack_from("<IHH", data, _EFI_TIME)
        if revision != _WIN_CERT_REVISION:
            raise ParseError(
                s, "AuthInfo.Hdr.wRevision", _EFI_TIME + 4, f"0x{revision:04x}, expected 0x0200"
            )
        if cert_type != _WIN_CERT_TYPE_EFI_GUID:
            raise ParseError(
                s, "AuthInfo.Hdr.wCertificateType", _EFI_TIME + 6,
                f"0x{cert_type:04x}, expected WIN_CERT_TYPE_EFI_GUID (0x0ef1)",
            )  # fmt: skip
        if length < 24 or _EFI_TIME + length > len(data):
            raise ParseError(
                s, "AuthInfo.Hdr.dwLength", _EFI_TIME, f"{length} runs past the {len(data)} bytes"
            )
        body = data[_EFI_TIME + length :]
        db = SignatureDatabase.parse(body, base=_EFI_TIME + length)
        hashes: set[bytes] = set()
        sha1: set[bytes] = set()
        sha256: set[bytes] = set()
        for lst in db.lists:
            for entry in lst.entry_data():
                if lst.signature_type == EFI_CERT_SHA256:
                    hashes.add(entry)
                elif lst.signature_type == EFI_CERT_X509:
                    sha1.add(hashlib.sha1(entry).digest())  # noqa: S324 (a thumbprint)
                    sha256.add(hashlib.sha256(entry).digest())
        return cls("authenticated-variable", frozenset(hashes), frozenset(sha1),
                   frozenset(sha256), {}, 0)  # fmt: skip

    @classmethod
    def parse_json(cls, data: bytes) -> DbxUpdate:
        s = "dbx_info"
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParseError(s, "json", getattr(exc, "pos", 0), str(exc)) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), dict):
            raise ParseError(s, "images", 0, "expected an object of architectures")
        hashes: set[bytes] = set()
        names: dict[bytes, str] = {}
        for arch, images in doc["images"].items():
            if not isinstance(images, list):
                raise ParseError(s, f"images.{arch}", 0, "expected a list")
            for i, image in enumerate(images):
                where = f"images.{arch}[{i}].authenticodeHash"
                value = image.get("authenticodeHash") if isinstance(image, dict) else None
                digest = _hex(value, 32, s, where)
                hashes.add(digest)
                names[digest] = str(image.get("filename", "")).strip()
        sha1: set[bytes] = set()
        for i, cert in enumerate(doc.get("certificates") or []):
            value = cert.get("thumbprint") if isinstance(cert, dict) else None
            sha1.add(_hex(value, 20, s, f"certificates[{i}].thumbprint"))
        svns = doc.get("svns") or []
        if not isinstance(svns, list):
            raise ParseError(s, "svns", 0, "expected a list")
        return cls("microsoft-json", frozenset(hashes), frozenset(sha1), frozenset(), names,
                   len(svns))  # fmt: skip

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "hashes": len(self.hashes),
            "certificates": len(self.cert_sha1),
            "svns": self.svns,
        }


def _hex(value: Any, size: int, structure: str, where: str) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ParseError(structure, where, 0, f"expected {2 * size} hex digits, got {value!r}")
    return raw


@dataclass(frozen=True, slots=True)
class DbxFinding:
    """One revoked thing the log shows booted: ``kind`` is ``hash`` or ``certificate``."""

    kind: str
    event: int
    pcr: int
    what: str  # the Authenticode hash or certificate SHA-256, hex
    name: str | None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "event": self.event, "pcr": self.pcr, "value": self.what,
                "name": self.name}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DbxScan:
    """A log held against an update. ``dbx_missing``: the update's hash entries the
    measured dbx lacks (None: no trusted dbx measurement to compare)."""

    revoked: tuple[DbxFinding, ...]
    dbx_entries: int | None
    dbx_missing: int | None

    @property
    def current(self) -> bool:
        return self.dbx_missing == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "revoked": [f.to_json() for f in self.revoked],
            "dbx_entries": self.dbx_entries,
            "dbx_missing": self.dbx_missing,
            "dbx_current": self.current,
        }


def scan(log: ReplayedLog, update: DbxUpdate) -> DbxScan:
    """What ``update`` says about the boot in ``log`` (only digest-proven events count)."""
    found: list[DbxFinding] = []
    for e in log.events:
        if e.pcr == 4 and e.event_type == _BOOT_APPLICATION:
            digest = e.digests.get("sha256")
            if digest is not None and digest in update.hashes:
                found.append(
                    DbxFinding("hash", e.index, e.pcr, digest.hex(), update.names.get(digest))
                )
        elif e.pcr == 7 and e.event_type == _AUTHORITY and e.data_verified:
            var = e.decoded
            if isinstance(var, EfiVariable) and isinstance(var.value, SignatureData):
                cert = var.value.data
                sha256 = hashlib.sha256(cert).digest()
                sha1 = hashlib.sha1(cert).digest()  # noqa: S324 (a thumbprint)
                if sha256 in update.cert_sha256 or sha1 in update.cert_sha1:
                    found.append(DbxFinding("certificate", e.index, e.pcr, sha256.hex(), None))
    entries: int | None = None
    missing: int | None = None
    for e in log.events:
        if e.pcr != 7 or e.event_type != _DRIVER_CONFIG or not e.data_verified:
            continue
        var = e.decoded
        if isinstance(var, EfiVariable) and var.name == "dbx":
            have = (
                {d for lst in var.value.lists for d in lst.entry_data()}
                if isinstance(var.value, SignatureDatabase)
                else set()
            )
            entries = len(have)
            missing = len(update.hashes - have)
    return DbxScan(tuple(found), entries, missing)
