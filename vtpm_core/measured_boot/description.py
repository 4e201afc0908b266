"""What a simulated boot measures: firmware, secure-boot state, boot applications.

A :class:`BootDescription` is parsed once (from a mapping, e.g. YAML) into
frozen values holding the bytes or digests the simulator needs. Boot
applications are PE files (their Authenticode digests are computed for every
bank) or precomputed digests; a digest-only entry must give one digest per
bank the simulator writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtpm_core.errors import ConfigError

__all__ = ["BootApplication", "BootDescription", "FirmwareBlob", "Measured"]

_BANKS = ("sha1", "sha256", "sha384", "sha512")
DEFAULT_FIRMWARE_VERSION = "vtpm-trust simulated firmware 1.0"


@dataclass(frozen=True, slots=True)
class Measured:
    """Something measured by digest: the bytes themselves or their digests per bank."""

    content: bytes | None = None
    digests: Mapping[str, bytes] = field(default_factory=dict)

    def digest(self, bank: str) -> bytes:
        if self.content is not None:
            return hashlib.new(bank, self.content).digest()
        try:
            return self.digests[bank]
        except KeyError:
            raise ConfigError(
                f"no {bank} digest given (digest-only entries need every bank)"
            ) from None

    @property
    def length(self) -> int:
        return len(self.content) if self.content is not None else 0


@dataclass(frozen=True, slots=True)
class FirmwareBlob:
    """A firmware volume measured into PCR 0 (EV_EFI_PLATFORM_FIRMWARE_BLOB)."""

    base: int
    measured: Measured


@dataclass(frozen=True, slots=True)
class BootApplication:
    """An EFI application the firmware loads (EV_EFI_BOOT_SERVICES_APPLICATION, PCR 4).

    ``pe`` holds the image when known; then the digests are its Authenticode
    hashes. Otherwise ``digests`` holds them per bank.
    """

    path: str
    pe: bytes | None = None
    digests: Mapping[str, bytes] = field(default_factory=dict)

    def digest(self, bank: str) -> bytes:
        if self.pe is not None:
            from vtpm_core.authenticode import authenticode_digest

            return authenticode_digest(self.pe, bank)
        try:
            return self.digests[bank]
        except KeyError:
            raise ConfigError(f"boot application {self.path}: no {bank} digest given") from None

    @property
    def length(self) -> int:
        return len(self.pe) if self.pe is not None else 0


@dataclass(frozen=True, slots=True)
class BootDescription:
    """One boot, as UEFI firmware, systemd-boot and the Linux EFI stub measure it."""

    firmware_version: str = DEFAULT_FIRMWARE_VERSION
    firmware_blobs: Sequence[FirmwareBlob] = ()
    secure_boot: bool = False
    pk: Sequence[bytes] = ()  # DER certificates
    kek: Sequence[bytes] = ()
    db: Sequence[bytes] = ()
    dbx_sha256: Sequence[bytes] = ()
    boot_applications: Sequence[BootApplication] = ()
    kernel_cmdline: str | None = None
    initrd: Measured | None = None

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], base_dir: Path = Path()) -> BootDescription:
        """Parse the YAML/JSON shape documented in docs/measured-boot.md.

        Relative file names are read below ``base_dir``. Raises ConfigError
        naming the key that is wrong.
        """
        known = {
            "firmware",
            "secure_boot",
            "boot_applications",
            "kernel_cmdline",
            "initrd",
        }
        extra = set(doc) - known
        if extra:
            raise ConfigError(f"boot description: unknown keys {sorted(extra)}")

        def read(where: str, name: object) -> bytes:
            if not isinstance(name, str):
                raise ConfigError(f"boot description: {where} must be a file name")
            path = base_dir / name
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"boot description: {where}: cannot read {path}: {exc}") from None

        def digests(where: str, value: object) -> dict[str, bytes]:
            if not isinstance(value, Mapping):
                raise ConfigError(f"boot description: {where} must map bank names to hex")
            out: dict[str, bytes] = {}
            for bank, hexval in value.items():
                if bank not in _BANKS or not isinstance(hexval, str):
                    raise ConfigError(f"boot description: {where}.{bank} is not a bank digest")
                try:
                    out[bank] = bytes.fromhex(hexval)
                except ValueError:
                    raise ConfigError(f"boot description: {where}.{bank} is not hex") from None
                if len(out[bank]) != hashlib.new(bank).digest_size:
                    raise ConfigError(f"boot description: {where}.{bank} has the wrong length")
            return out

        fw = doc.get("firmware", {}) or {}
        blobs = []
        for i, blob in enumerate(fw.get("blobs", []) or []):
            where = f"firmware.blobs[{i}]"
            if "file" in blob:
                measured = Measured(content=read(where + ".file", blob["file"]))
            else:
                measured = Measured(digests=digests(where + ".digests", blob.get("digests")))
            blobs.append(
                FirmwareBlob(
                    base=int(blob.get("base", 0xFFC00000 + 0x10000 * i)), measured=measured
                )
            )

        sb = doc.get("secure_boot", {}) or {}
        if not isinstance(sb, Mapping):
            raise ConfigError("boot description: secure_boot must be a mapping")

        def certs(key: str) -> list[bytes]:
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            out = []
            for i, name in enumerate(sb.get(key, []) or []):
                raw = read(f"secure_boot.{key}[{i}]", name)
                try:
                    cert = (
                        x509.load_pem_x509_certificate(raw)
                        if raw.lstrip().startswith(b"-----")
                        else x509.load_der_x509_certificate(raw)
                    )
                except ValueError as exc:
                    raise ConfigError(f"boot description: secure_boot.{key}[{i}]: {exc}") from None
                out.append(cert.public_bytes(Encoding.DER))
            return out

        apps = []
        for i, app in enumerate(doc.get("boot_applications", []) or []):
            where = f"boot_applications[{i}]"
            if not isinstance(app, Mapping) or "path" not in app:
                raise ConfigError(f"boot description: {where} needs a 'path'")
            if "file" in app:
                apps.append(
                    BootApplication(path=str(app["path"]), pe=read(where + ".file", app["file"]))
                )
            else:
                apps.append(
                    BootApplication(
                        path=str(app["path"]),
                        digests=digests(where + ".digests", app.get("digests")),
                    )
                )

        initrd = None
        if doc.get("initrd") is not None:
            spec = doc["initrd"]
            if isinstance(spec, Mapping) and "file" in spec:
                initrd = Measured(content=read("initrd.file", spec["file"]))
            else:
                initrd = Measured(digests=digests("initrd.digests", (spec or {}).get("digests")))

        cmdline = doc.get("kernel_cmdline")
        if cmdline is not None and not isinstance(cmdline, str):
            raise ConfigError("boot description: kernel_cmdline must be a string")
        dbx = []
        for i, hexval in enumerate(sb.get("dbx_sha256", []) or []):
            try:
                value = bytes.fromhex(str(hexval))
            except ValueError:
                raise ConfigError(
                    f"boot description: secure_boot.dbx_sha256[{i}] is not hex"
                ) from None
            if len(value) != 32:
                raise ConfigError(f"boot description: secure_boot.dbx_sha256[{i}] is not 32 bytes")
            dbx.append(value)
        return cls(
            firmware_version=str(fw.get("version", DEFAULT_FIRMWARE_VERSION)),
            firmware_blobs=tuple(blobs),
            secure_boot=bool(sb.get("enabled", False)),
            pk=tuple(certs("pk")),
            kek=tuple(certs("kek")),
            db=tuple(certs("db")),
            dbx_sha256=tuple(dbx),
            boot_applications=tuple(apps),
            kernel_cmdline=cmdline,
            initrd=initrd,
        )
