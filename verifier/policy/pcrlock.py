"""systemd-pcrlock's component files, read as predictions (issue 20).

Format: systemd.pcrlock(5) (systemd 255+). A ``.pcrlock`` file is a JSON object whose
``records`` follow a subset of the TCG Canonical Event Log Format (CEL-JSON): each record
has ``pcr`` (0..23) and ``digests`` (a list of ``{hashAlg, digest}``); ``recnum``,
``content`` and ``content_type`` are ignored, as systemd ignores them. One file is one
*variant* of a *component* of the boot; a directory ``NNN-name.pcrlock.d/`` holds several
alternative variants of one component (e.g. two kernels installed side by side), and a
variant with no records is the component being absent. Components are ordered by their
file name (``NNN-``), earlier ones measured first.

:func:`load_component` reads a file or a ``.pcrlock.d`` directory. :func:`pcr_states`
works out, for one PCR and bank, every value the PCR can hold across the components'
variants (their product), from a PCR at zero, at each point of a location range: by
default systemd-pcrlock's own (``--location=760-:940-``: after entering the initrd and
before shutdown), which for PCR 11 are the states a booted machine is quoted in.

Guarantees: a component's every record was checked (PCR range, known bank, digest size);
a malformed file is a ParseError naming the file and the field (``records[2].digests[0]
.digest``). Not checked: that the digests describe anything real.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vtpm_core.errors import ConfigError, ParseError

__all__ = [
    "DEFAULT_LOCATION",
    "MAX_COMBINATIONS",
    "Component",
    "Record",
    "Variant",
    "load_component",
    "parse_pcrlock",
    "pcr_states",
]

DEFAULT_LOCATION = ("760-", "940-")  # systemd-pcrlock's default --location=
MAX_COMBINATIONS = 4096
_BANKS = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
_IGNORED = frozenset({"recnum", "content", "content_type"})  # (systemd.pcrlock(5))
_MAX_FILE = 1 << 20


@dataclass(frozen=True, slots=True)
class Record:
    """One expected extend: PCR and its digest in each bank the file gives."""

    pcr: int
    digests: Mapping[str, bytes]
    where: str  # "FILE records[i]"


@dataclass(frozen=True, slots=True)
class Variant:
    """One alternative of a component: one ``.pcrlock`` file."""

    path: str
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Component:
    """A boot component (``650-kernel``) and its variants."""

    name: str
    variants: tuple[Variant, ...]

    def records(self, pcr: int) -> list[Record]:
        return [r for v in self.variants for r in v.records if r.pcr == pcr]


def parse_pcrlock(data: bytes, source: str) -> tuple[Record, ...]:
    """The records of one ``.pcrlock`` file; a ParseError names ``source`` and the field."""
    s = f"pcrlock {source}"
    if len(data) > _MAX_FILE:
        raise ParseError(s, "(file)", 0, f"larger than {_MAX_FILE} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ParseError(s, "json", getattr(exc, "pos", 0), str(exc)) from None
    if not isinstance(doc, dict):
        raise ParseError(s, "(top)", 0, f"expected an object, got {type(doc).__name__}")
    extra = set(doc) - {"records"}
    if extra:
        raise ParseError(s, sorted(extra)[0], 0, "unknown key (known: records)")
    items = doc.get("records", [])
    if not isinstance(items, list):
        raise ParseError(s, "records", 0, "expected a list")
    return tuple(_record(r, s, f"records[{i}]", source) for i, r in enumerate(items))


def _record(obj: Any, s: str, where: str, source: str) -> Record:
    if not isinstance(obj, dict):
        raise ParseError(s, where, 0, "expected an object")
    extra = set(obj) - {"pcr", "digests"} - _IGNORED
    if extra:
        raise ParseError(s, f"{where}.{sorted(extra)[0]}", 0, "unknown key (known: pcr, digests)")
    pcr = obj.get("pcr")
    if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr <= 23:
        raise ParseError(s, f"{where}.pcr", 0, f"expected a PCR index 0..23, got {pcr!r}")
    digests = obj.get("digests")
    if not isinstance(digests, list) or not digests:
        raise ParseError(s, f"{where}.digests", 0, "expected a non-empty list")
    out: dict[str, bytes] = {}
    for j, d in enumerate(digests):
        dw = f"{where}.digests[{j}]"
        if not isinstance(d, dict):
            raise ParseError(s, dw, 0, "expected an object")
        bank = d.get("hashAlg")
        if bank not in _BANKS:
            raise ParseError(s, f"{dw}.hashAlg", 0, f"{bank!r} (known: {', '.join(_BANKS)})")
        if bank in out:
            raise ParseError(s, f"{dw}.hashAlg", 0, f"{bank} given twice")
        value = d.get("digest")
        try:
            raw = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != _BANKS[bank]:
            raise ParseError(
                s, f"{dw}.digest", 0, f"expected {2 * _BANKS[bank]} hex digits, got {value!r}"
            )
        out[bank] = raw
    return Record(pcr, MappingProxyType(out), f"{source} {where}")


def load_component(path: Path) -> Component:
    """A ``NNN-name.pcrlock`` file (one variant) or ``NNN-name.pcrlock.d/`` directory
    (each ``*.pcrlock`` in it a variant, in name order)."""
    name = path.name
    if path.is_dir():
        if not name.endswith(".pcrlock.d"):
            raise ConfigError(f"{path}: a directory of variants must be named NAME.pcrlock.d")
        files = sorted(p for p in path.iterdir() if p.name.endswith(".pcrlock"))
        if not files:
            raise ConfigError(f"{path}: no .pcrlock variant in the directory")
        comp = name.removesuffix(".pcrlock.d")
    else:
        if not name.endswith(".pcrlock"):
            raise ConfigError(f"{path}: not a .pcrlock file")
        files = [path]
        comp = name.removesuffix(".pcrlock")
    variants = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{f}: cannot read: {exc.strerror}") from None
        variants.append(Variant(str(f), parse_pcrlock(data, str(f))))
    return Component(comp, tuple(variants))


def _extend(bank: str, pcr: bytes, digest: bytes) -> bytes:
    return hashlib.new(bank, pcr + digest).digest()


def pcr_states(
    components: Sequence[Component],
    pcr: int,
    bank: str,
    location: tuple[str, str] = DEFAULT_LOCATION,
) -> list[tuple[bytes, str]]:
    """Every value PCR ``pcr`` in ``bank`` can hold, from zero, extended by the components
    (in name order) up to each point of ``location`` (after the components sorting before
    its start; then after each further component sorting before its end), over every
    combination of variants. Each value comes with the variants that give it. Raises
    ConfigError when a record lacks ``bank`` or the combinations pass MAX_COMBINATIONS."""
    ordered = sorted(components, key=lambda c: c.name)
    start, end = location
    size = _BANKS[bank]
    options: list[list[tuple[list[bytes], str]]] = []
    for comp in ordered:
        alts = []
        for v in comp.variants:
            digests = []
            for r in v.records:
                if r.pcr != pcr:
                    continue
                if bank not in r.digests:
                    raise ConfigError(f"{r.where}: PCR {pcr} record has no {bank} digest")
                digests.append(r.digests[bank])
            alts.append((digests, Path(v.path).name if len(comp.variants) > 1 else ""))
        options.append(alts)
    points = [i for i, c in enumerate(ordered) if start <= c.name < end]
    first = next((i for i, c in enumerate(ordered) if c.name >= start), len(ordered))
    cuts = sorted({first, *[i + 1 for i in points]})
    combos = 1
    for alts in options:
        combos *= len(alts)
        if combos > MAX_COMBINATIONS:
            raise ConfigError(
                f"the components' variants make more than {MAX_COMBINATIONS} combinations"
            )
    seen: dict[bytes, str] = {}
    for choice in itertools.product(*options):
        value = bytes(size)
        for i, (digests, _) in enumerate(choice):
            if i in cuts:
                seen.setdefault(value, _label(ordered, choice, i))
            for d in digests:
                value = _extend(bank, value, d)
        if len(ordered) in cuts:
            seen.setdefault(value, _label(ordered, choice, len(ordered)))
    return list(seen.items())


def _label(ordered: Sequence[Component], choice: Sequence[tuple[list[bytes], str]], n: int) -> str:
    parts = [
        c.name + (f" ({v})" if v else "") for c, (_, v) in zip(ordered[:n], choice[:n], strict=True)
    ]
    return "after " + (", ".join(parts) if parts else "nothing")
