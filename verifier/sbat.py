"""SBAT: revocation by component generation (shim's Secure Boot Advanced Targeting; issue 20).

Spec: rhboot/shim ``SBAT.md`` and ``SbatLevel_Variable.txt``.

- A boot binary (shim, GRUB, systemd-boot, a UKI's stub) carries a ``.sbat`` PE section:
  CSV records ``component_name,component_generation,vendor_name,vendor_package_name,
  vendor_version,vendor_url``, one a line, the first being ``sbat,1,SBAT Version,...``
  (the format's own version); the section may be NUL padded. Only the first two fields
  are normative; a record may have more or fewer of the descriptive ones.
- A revocation is an *SBAT level* (the ``SbatLevel`` variable, vendor GUID
  605dab50-e046-4300-abb6-3dd810dd8b23; shim measures it into PCR 7 as
  EV_EFI_VARIABLE_AUTHORITY ``SbatLevel``): ``sbat,1,<datestamp>`` then
  ``component,generation`` lines. shim refuses a binary any of whose components has a
  generation *below* the level's generation for the same component name; components
  the level does not name are not revoked.

:meth:`SbatLevel.revokes` says which of a binary's components a level revokes;
:meth:`SbatLevel.behind` which of a newer level's generations an older (e.g. measured)
level lacks: a machine whose measured level is behind still lets the revoked binaries
boot. Guarantees after ``parse``: every record has a component name and an integer
generation >= 0; a malformed input is a ParseError naming the source and the line.
Not checked: that the datestamp is a date (it is compared as text, as shim compares it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from vtpm_core.authenticode import PeImage, authenticode_digest
from vtpm_core.errors import ConfigError, ParseError

__all__ = ["SbatBinary", "SbatEntry", "SbatLevel", "SbatRevocation", "parse_sbat"]

_COMPONENT = re.compile(r"[A-Za-z0-9_.+-]+")
_MAX = 1 << 16  # a .sbat section or level is a few hundred bytes


@dataclass(frozen=True, slots=True)
class SbatEntry:
    """One ``.sbat`` record: a component at a generation, and who ships it."""

    component: str
    generation: int
    vendor: str = ""
    package: str = ""
    version: str = ""
    url: str = ""


def _lines(data: bytes, structure: str) -> list[tuple[int, list[str]]]:
    if len(data) > _MAX:
        raise ParseError(structure, "(data)", 0, f"{len(data)} bytes, more than {_MAX}")
    text = data.rstrip(b"\0")
    if b"\0" in text:
        raise ParseError(structure, "(data)", text.index(b"\0"), "a NUL inside the records")
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ParseError(structure, "(data)", exc.start, "not ASCII") from None
    out = []
    for n, line in enumerate(decoded.splitlines(), 1):
        if line.strip():
            out.append((n, line.split(",")))
    if not out:
        raise ParseError(structure, "line 1", 0, "no records")
    return out


def _generation(fields: list[str], structure: str, n: int) -> tuple[str, int]:
    name = fields[0].strip()
    if not _COMPONENT.fullmatch(name):
        raise ParseError(structure, f"line {n}.component_name", 0, f"bad name {name!r}")
    if len(fields) < 2 or not fields[1].strip().isdigit():
        got = fields[1] if len(fields) > 1 else "nothing"
        raise ParseError(
            structure, f"line {n}.component_generation", 0,
            f"expected an integer >= 0, got {got!r}",
        )  # fmt: skip
    return name, int(fields[1])


def parse_sbat(data: bytes, source: str) -> tuple[SbatEntry, ...]:
    """The records of a ``.sbat`` section (header record included)."""
    s = f".sbat of {source}"
    out = []
    for n, fields in _lines(data, s):
        name, gen = _generation(fields, s, n)
        rest = [f.strip() for f in fields[2:6]] + [""] * 4
        out.append(SbatEntry(name, gen, *rest[:4]))
    if out[0].component != "sbat":
        got = out[0].component
        raise ParseError(s, "line 1", 0, f"expected the 'sbat,1,...' header, got {got!r}")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SbatBinary:
    """A boot binary known by its Authenticode SHA-256 (what PCR 4 logs) and its SBAT."""

    name: str
    sha256: bytes
    entries: tuple[SbatEntry, ...]

    @classmethod
    def of_image(cls, image: bytes, name: str) -> SbatBinary:
        """Read the ``.sbat`` section of a PE image; ConfigError when it has none."""
        pe = PeImage.parse(image)
        section = next((s for s in pe.sections if s.name == b".sbat"), None)
        if section is None:
            raise ConfigError(f"{name}: no .sbat section (not an SBAT-aware boot binary)")
        return cls(name, authenticode_digest(image), parse_sbat(pe.section_data(section), name))

    def to_json(self) -> dict[str, str]:
        text = "\n".join(f"{e.component},{e.generation},{e.vendor},{e.package},{e.version},"
                         f"{e.url}" for e in self.entries)  # fmt: skip
        return {"name": self.name, "sha256": self.sha256.hex(), "sbat": text + "\n"}


@dataclass(frozen=True, slots=True)
class SbatLevel:
    """A revocation level: datestamp and the minimum generation per component."""

    datestamp: str
    generations: Mapping[str, int]
    raw: bytes

    @classmethod
    def parse(cls, data: bytes, source: str = "SbatLevel") -> SbatLevel:
        s = f"SbatLevel {source}"
        lines = _lines(data, s)
        n, head = lines[0]
        if head[0].strip() != "sbat" or len(head) < 3 or not head[2].strip():
            raise ParseError(s, "line 1", 0, "expected 'sbat,1,<datestamp>'")
        gens: dict[str, int] = {}
        for n, fields in lines[1:]:
            name, gen = _generation(fields, s, n)
            if name in gens:
                raise ParseError(s, f"line {n}.component_name", 0, f"{name} given twice")
            gens[name] = gen
        return cls(head[2].strip(), MappingProxyType(gens), bytes(data))

    def revokes(self, entries: Sequence[SbatEntry]) -> list[str]:
        """The binary's components below this level: ``grub 3 < 4`` each."""
        return [
            f"{e.component} {e.generation} < {self.generations[e.component]}"
            for e in entries
            if e.component != "sbat" and e.generation < self.generations.get(e.component, -1)
        ]

    def behind(self, newer: SbatLevel) -> list[str]:
        """What this level lacks of ``newer``: ``shim 2 < 4`` (absent: 0) each."""
        return [
            f"{name} {self.generations.get(name, 0)} < {gen}"
            for name, gen in newer.generations.items()
            if self.generations.get(name, 0) < gen
        ]


@dataclass(frozen=True, slots=True)
class SbatRevocation:
    """An SBAT level to apply, and the boot binaries whose SBAT is known (by digest)."""

    level: SbatLevel
    binaries: Mapping[bytes, SbatBinary]

    @classmethod
    def parse_json(cls, doc: Mapping[str, Any]) -> SbatRevocation:
        """``{"sbat_level": TEXT, "binaries": [{"name", "sha256", "sbat": TEXT}]}`` (what
        ``vtpm policy dbx-update`` sends the verifier)."""
        s = "sbat revocation"
        level = doc.get("sbat_level")
        if not isinstance(level, str):
            raise ParseError(s, "sbat_level", 0, "expected the SbatLevel text")
        items = doc.get("binaries", [])
        if not isinstance(items, list):
            raise ParseError(s, "binaries", 0, "expected a list")
        binaries = {}
        for i, b in enumerate(items):
            where = f"binaries[{i}]"
            keys = ("name", "sha256", "sbat")
            if not isinstance(b, dict) or not all(isinstance(b.get(k), str) for k in keys):
                raise ParseError(s, where, 0, "expected name, sha256 and sbat strings")
            try:
                digest = bytes.fromhex(b["sha256"])
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ParseError(s, f"{where}.sha256", 0, "expected 64 hex digits")
            entries = parse_sbat(b["sbat"].encode("ascii", "replace"), b["name"])
            binaries[digest] = SbatBinary(b["name"], digest, entries)
        return cls(SbatLevel.parse(level.encode("ascii", "replace")), MappingProxyType(binaries))

    def to_json(self) -> bytes:
        return json.dumps({
            "sbat_level": self.level.raw.decode("ascii"),
            "binaries": [b.to_json() for b in self.binaries.values()],
        }).encode()  # fmt: skip
