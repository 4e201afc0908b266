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

- an SBAT revocation (:mod:`verifier.sbat`): an ``SbatLevel`` (``sbat,1,<datestamp>``
  then ``component,generation`` lines, shim's SbatLevel_Variable.txt format), alone or
  with the boot binaries whose ``.sbat`` is known (JSON, what the CLI sends).

:func:`scan` holds one replayed event log against an update: the boot
applications (PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION, whose SHA-256 digest is
the image's Authenticode hash) the update revokes, the authorities (PCR 7
EV_EFI_VARIABLE_AUTHORITY, the db certificate that verified an image) it
revokes, and whether the measured dbx already holds every hash entry of the
update (dbx currency). For an SBAT revocation: the boot applications whose digest is a
known binary with a component below the level (``sbat``), and whether the ``SbatLevel``
shim measured (PCR 7 EV_EFI_VARIABLE_AUTHORITY) already holds the level's generations
(SBAT currency). Only events whose digests the replay proves are read.
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
from verifier.sbat import SbatLevel, SbatRevocation
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

    source: str  # "authenticated-variable" | "microsoft-json" | "sbat-level"
    hashes: frozenset[bytes]
    cert_sha1: frozenset[bytes]
    cert_sha256: frozenset[bytes]
    names: dict[bytes, str]  # hash -> file name (JSON)
    svns: int
    sbat: SbatRevocation | None = None

    @classmethod
    def parse(cls, data: bytes) -> DbxUpdate:
        """Any format: an SbatLevel when it starts with ``sbat,``; JSON when it starts with
        ``{`` (an SBAT revocation when it has ``sbat_level``); else the authenticated
        variable."""
        head = data.lstrip()
        if head.startswith(b"sbat,"):
            return cls.of_sbat(SbatRevocation(SbatLevel.parse(data), {}))
        if head[:1] == b"{":
            try:
                doc = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError):
                doc = None
            if isinstance(doc, dict) and "sbat_level" in doc:
                return cls.of_sbat(SbatRevocation.parse_json(doc))
            return cls.parse_json(data)
        return cls.parse_authenticated(data)

    @classmethod
    def of_sbat(cls, revocation: SbatRevocation) -> DbxUpdate:
        empty: frozenset[bytes] = frozenset()
        return cls("sbat-level", empty, empty, empty, {}, 0, revocation)

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
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
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
        out: dict[str, Any] = {
            "source": self.source,
            "hashes": len(self.hashes),
            "certificates": len(self.cert_sha1),
            "svns": self.svns,
        }
        if self.sbat is not None:
            out["sbat_level"] = {
                "datestamp": self.sbat.level.datestamp,
                "generations": dict(self.sbat.level.generations),
                "binaries": len(self.sbat.binaries),
            }
        return out


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
    """One revoked thing the log shows booted: ``kind`` is ``hash``, ``certificate`` or
    ``sbat`` (a known binary with components below the level: ``detail``)."""

    kind: str
    event: int
    pcr: int
    what: str  # the Authenticode hash or certificate SHA-256, hex
    name: str | None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "event": self.event, "pcr": self.pcr, "value": self.what,
                "name": self.name, "detail": self.detail}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DbxScan:
    """A log held against an update. ``dbx_missing``: the update's hash entries the
    measured dbx lacks (None: no trusted dbx measurement to compare)."""

    revoked: tuple[DbxFinding, ...]
    dbx_entries: int | None
    dbx_missing: int | None
    # SBAT (an SbatLevel update only): the measured level's datestamp (None: none measured)
    # and what it lacks of the update's level
    sbat_level: str | None = None
    sbat_behind: tuple[str, ...] | None = None

    @property
    def current(self) -> bool:
        return self.dbx_missing == 0

    @property
    def sbat_current(self) -> bool:
        return self.sbat_behind is None or (self.sbat_level is not None and not self.sbat_behind)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "revoked": [f.to_json() for f in self.revoked],
            "dbx_entries": self.dbx_entries,
            "dbx_missing": self.dbx_missing,
            "dbx_current": self.current,
        }
        if self.sbat_behind is not None:
            out |= {"sbat_level": self.sbat_level, "sbat_behind": list(self.sbat_behind),
                    "sbat_current": self.sbat_current}  # fmt: skip
        return out


def scan(log: ReplayedLog, update: DbxUpdate) -> DbxScan:
    """What ``update`` says about the boot in ``log`` (only digest-proven events count)."""
    if update.sbat is not None:
        return _scan_sbat(log, update.sbat)
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


def _scan_sbat(log: ReplayedLog, revocation: SbatRevocation) -> DbxScan:
    """Known binaries booted below the level; the measured SbatLevel against it."""
    found: list[DbxFinding] = []
    measured: SbatLevel | None = None
    for e in log.events:
        if e.pcr == 4 and e.event_type == _BOOT_APPLICATION:
            binary = revocation.binaries.get(e.digests.get("sha256", b""))
            below = [] if binary is None else revocation.level.revokes(binary.entries)
            if binary is not None and below:
                found.append(
                    DbxFinding(
                        "sbat", e.index, e.pcr, binary.sha256.hex(), binary.name, ", ".join(below)
                    )
                )
        elif e.pcr == 7 and e.event_type == _AUTHORITY and e.data_verified:
            var = e.decoded
            if isinstance(var, EfiVariable) and var.name == "SbatLevel":
                try:
                    measured = SbatLevel.parse(var.data, f"event {e.index}")
                except ParseError:
                    measured = None  # (an unreadable level is no level: not current)
    if measured is None:
        return DbxScan(tuple(found), None, None, None, ("no SbatLevel measured",))
    return DbxScan(
        tuple(found), None, None, measured.datestamp, tuple(measured.behind(revocation.level))
    )
