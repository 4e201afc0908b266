"""Reference-value policy, schema version 1: parsed once into frozen values.

The document (YAML or JSON; issue 5 "Policies and results")::

    version: 1                       # required; only 1 is known
    name: web-fleet                  # optional label
    secure_boot: true                # SecureBoot variable (PFP v1.05 §3.3.4.8, PCR 7)
    boot_applications:               # EV_EFI_BOOT_SERVICES_APPLICATION digests (PCR 4)
      - {name: shim, sha256: <hex>}  #   Authenticode digests, any bank
      - {name: vmlinuz-6.8, sha256: <hex>, valid_until: "2027-01-31T00:00:00Z",
         note: "predicted from vmlinuz-6.8.efi, replaces event 27"}
    kernel_cmdlines:                 # EV_IPL kernel command lines (PCR 8, 9, 12)
      - {exact: "root=/dev/sda1 ro"}
      - {exact: "root=/dev/sda1 ro quiet", valid_until: "2027-01-31T00:00:00Z"}
      - {pattern: "root=UUID=[0-9a-f-]+ ro( quiet)?"}   # fullmatch
    firmware:
      scrtm_versions: ["GCE Virtual Firmware v1"]      # EV_S_CRTM_VERSION (PCR 0)
      pcr0: {sha256: [<hex>, ...]}
    db:  {require: [<hex>, ...]}     # db entries: SHA-256 of a cert, or a hash entry itself
    dbx: {forbid: [<hex>, ...], min_entries: 100,
          require: [<hex>, ...]}     # dbx currency (issue 20): entries a dbx update added
    sbat: {min_level: {shim: 4, grub: 3}}   # SBAT currency (issue 20): the measured
                                     #   SbatLevel (PCR 7) holds these generations
    pcrs: {sha256: {"7": <hex> | [<hex>, ...],        # literal values from the quote
                    "11": [{value: <hex>, valid_until: "2027-01-31T00:00:00Z",
                            note: "UKI vmlinuz-a.efi, phase ...:ready"}, <hex>]}}
    runtime:                         # optional: an IMA runtime policy (issue 14), the
      version: 1                     #   verifier.ima.policy document embedded as-is
      digests: {/usr/bin/bash: ["sha256:<hex>"]}

``valid_until`` and ``note`` (issue 20) may be given on any boot application, command
line or literal PCR value (a value then is a mapping ``{value, valid_until, note}``).
They were added for updates: a policy revision allows the new kernel's values
*beside* the old ones, and the old (or predicted) ones must stop being accepted at a
stated time rather than linger forever. ``valid_until`` is an ISO 8601 time with a
zone (a YAML timestamp without one is UTC, as YAML says); a value is accepted while
the appraisal time is before it. ``note`` says why the value is there (which
artefact, which event it replaces); it is part of the policy's id like every key.

``runtime`` (issue 14) combines this boot policy with a runtime policy for the IMA
measurement list (docs/ima-policy.md): the evidence must then bring the IMA delta and
its quote must cover PCR 10. It is checked by ``RuntimePolicy.from_dict``; its errors
are re-pathed under ``policy.runtime``. It does not count as a boot rule: a policy
still needs at least one of the keys above (the boot part is never left unchecked).

Guarantees after :meth:`Policy.load`: every key known, every type right,
digests the size of their bank, patterns compile, at least one boot rule
(an empty policy would pass anything: refused). A malformed document is a
ParseError whose field is the path, e.g. ``policy.boot_applications[2].sha256``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from verifier.ima.policy import RuntimePolicy, RuntimePolicyParseError
from vtpm_core.errors import ParseError

__all__ = [
    "BANK_SIZES",
    "MAX_POLICY_BYTES",
    "BootApplication",
    "CmdlinePattern",
    "DbPolicy",
    "DbxPolicy",
    "FirmwarePolicy",
    "PcrWindow",
    "Policy",
    "PolicyParseError",
    "SbatPolicy",
]

SCHEMA_VERSION = 1
MAX_POLICY_BYTES = 1 << 20
BANK_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}
_STRUCT = "policy"


def _window_dict(until: datetime | None, note: str | None) -> dict[str, str]:
    out = {} if until is None else {"valid_until": format_time(until)}
    return out if note is None else out | {"note": note}


class PolicyParseError(ParseError):
    """A malformed policy document; ``field`` is the path, e.g. ``policy.pcrs.sha256.7``.

    YAML has no byte offsets worth quoting after loading, so the message names the path.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(_STRUCT, path, 0, message)
        self.args = (f"{path}: {message}",)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _err(path: str, message: str) -> ParseError:
    return PolicyParseError(path, message)


@dataclass(frozen=True, slots=True)
class BootApplication:
    """An allowed boot application: its Authenticode digest in one or more banks,
    accepted until ``valid_until`` (None: no end); ``note``: why it is allowed."""

    name: str | None
    digests: Mapping[str, bytes]
    valid_until: datetime | None = None
    note: str | None = None

    def expired(self, now: datetime) -> bool:
        return self.valid_until is not None and now >= self.valid_until


@dataclass(frozen=True, slots=True)
class CmdlinePattern:
    """An allowed kernel command line: ``exact`` text, or a regex that must fullmatch."""

    exact: str | None
    pattern: str | None
    compiled: re.Pattern[str] | None
    valid_until: datetime | None = None
    note: str | None = None

    def expired(self, now: datetime) -> bool:
        return self.valid_until is not None and now >= self.valid_until

    def matches(self, text: str) -> bool:
        if self.exact is not None:
            return text == self.exact
        assert self.compiled is not None
        return self.compiled.fullmatch(text) is not None

    def describe(self) -> str:
        return repr(self.exact) if self.exact is not None else f"/{self.pattern}/"


@dataclass(frozen=True, slots=True)
class SbatPolicy:
    """SBAT currency (issue 20): the minimum generation per component the SbatLevel shim
    measured must hold (what an SBAT revocation's level says)."""

    min_level: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class PcrWindow:
    """The window of one literal PCR value (issue 20: e.g. a UKI's predicted PCR 11):
    accepted until ``valid_until`` (None: no end); ``note``: why it is allowed."""

    valid_until: datetime | None
    note: str | None

    def expired(self, now: datetime) -> bool:
        return self.valid_until is not None and now >= self.valid_until


@dataclass(frozen=True, slots=True)
class FirmwarePolicy:
    scrtm_versions: tuple[str, ...] | None
    pcr0: Mapping[str, tuple[bytes, ...]] | None


@dataclass(frozen=True, slots=True)
class DbPolicy:
    require: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class DbxPolicy:
    forbid: tuple[bytes, ...]
    min_entries: int | None
    # dbx currency (issue 20): the measured dbx holds every one of these (a dbx update's)
    require: tuple[bytes, ...] = ()


# -- a small typed reader over the loaded document ---------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases (no billion-laughs expansion) and with bounded nesting
    (no RecursionError from ``[[[[...``): a version-1 policy is at most 5 levels deep."""

    max_depth = 16

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise _err("policy", f"YAML aliases are not allowed (line {event.start_mark.line + 1})")
        depth = getattr(self, "_depth", 0)
        if depth >= self.max_depth:
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise _err(
                "policy",
                f"nested deeper than {self.max_depth} levels (line {event.start_mark.line + 1})",
            )
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


def _mapping(obj: Any, path: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _err(path, f"expected a mapping, got {type(obj).__name__}")
    for key in obj:
        if not isinstance(key, str):
            raise _err(f"{path}.{key!r}", "keys must be strings")
        if key not in allowed:
            raise _err(f"{path}.{key}", f"unknown key (known: {', '.join(sorted(allowed))})")
    return obj


def _list(obj: Any, path: str) -> list[Any]:
    if not isinstance(obj, list):
        raise _err(path, f"expected a list, got {type(obj).__name__}")
    return obj


def _str(obj: Any, path: str) -> str:
    if not isinstance(obj, str):
        raise _err(path, f"expected a string, got {type(obj).__name__}")
    return obj


def _bool(obj: Any, path: str) -> bool:
    if not isinstance(obj, bool):
        raise _err(path, f"expected true or false, got {obj!r}")
    return obj


def _int(obj: Any, path: str, minimum: int = 0) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int) or obj < minimum:
        raise _err(path, f"expected an integer >= {minimum}, got {obj!r}")
    return obj


def _hex(obj: Any, path: str, size: int | None = None) -> bytes:
    text = _str(obj, path).strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise _err(path, "not a hex string") from None
    if not value:
        raise _err(path, "empty digest")
    if size is not None and len(value) != size:
        raise _err(path, f"{len(value)} bytes, expected {size}")
    return value


def _bank(name: Any, path: str) -> str:
    if name not in BANK_SIZES:
        raise _err(path, f"unknown bank {name!r} (known: {', '.join(BANK_SIZES)})")
    return str(name)


def _hex_list(obj: Any, path: str, size: int | None = None) -> tuple[bytes, ...]:
    if isinstance(obj, str):
        return (_hex(obj, path, size),)
    items = _list(obj, path)
    if not items:
        raise _err(path, "empty list: nothing would match")
    return tuple(_hex(v, f"{path}[{i}]", size) for i, v in enumerate(items))


def _time(obj: Any, path: str) -> datetime:
    """An aware datetime from a YAML timestamp (naive means UTC there) or ISO 8601 text."""
    if isinstance(obj, datetime):
        return obj if obj.tzinfo is not None else obj.replace(tzinfo=UTC)
    text = _str(obj, path)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _err(path, f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise _err(path, f"{text!r} has no time zone (write e.g. 2027-01-31T00:00:00Z)")
    return value


def _window(m: dict[str, Any], p: str) -> tuple[datetime | None, str | None]:
    until = _time(m["valid_until"], f"{p}.valid_until") if "valid_until" in m else None
    note = _str(m["note"], f"{p}.note") if "note" in m else None
    return until, note


def format_time(value: datetime) -> str:
    """``2027-01-31T00:00:00Z``: how policies and findings write a time (UTC)."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


_WINDOW_KEYS = frozenset({"valid_until", "note"})
_SBAT_COMPONENT = re.compile(r"[A-Za-z0-9_.+-]+")


def _boot_apps(obj: Any, path: str) -> tuple[BootApplication, ...]:
    out = []
    for i, item in enumerate(_list(obj, path)):
        p = f"{path}[{i}]"
        m = _mapping(item, p, frozenset({"name", *BANK_SIZES, *_WINDOW_KEYS}))
        name = _str(m["name"], f"{p}.name") if "name" in m else None
        digests = {b: _hex(m[b], f"{p}.{b}", BANK_SIZES[b]) for b in BANK_SIZES if b in m}
        if not digests:
            raise _err(p, "names no digest (give sha256: <hex> or another bank)")
        out.append(BootApplication(name, MappingProxyType(digests), *_window(m, p)))
    return tuple(out)


def _cmdlines(obj: Any, path: str) -> tuple[CmdlinePattern, ...]:
    out = []
    items = _list(obj, path)
    if not items:
        raise _err(path, "empty list: no command line would be allowed")
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        if isinstance(item, str):
            item = {"exact": item}
        m = _mapping(item, p, frozenset({"exact", "pattern", *_WINDOW_KEYS}))
        if ("exact" in m) == ("pattern" in m):
            raise _err(p, "give exactly one of exact or pattern")
        window = _window(m, p)
        if "exact" in m:
            out.append(CmdlinePattern(_str(m["exact"], f"{p}.exact"), None, None, *window))
        else:
            source = _str(m["pattern"], f"{p}.pattern")
            try:
                compiled = re.compile(source)
            except re.error as exc:
                raise _err(f"{p}.pattern", f"bad regular expression: {exc}") from None
            out.append(CmdlinePattern(None, source, compiled, *window))
    return tuple(out)


_PcrValues = Mapping[str, Mapping[int, tuple[bytes, ...]]]
_PcrWindows = Mapping[tuple[str, int, bytes], PcrWindow]


def _pcr_values(obj: Any, path: str) -> tuple[_PcrValues, _PcrWindows]:
    """The literal values per bank and PCR, and the windows of those given as mappings."""
    banks = _mapping(obj, path, frozenset(BANK_SIZES))
    out: dict[str, Mapping[int, tuple[bytes, ...]]] = {}
    windows: dict[tuple[str, int, bytes], PcrWindow] = {}
    for bank, pcrs in banks.items():
        bp = f"{path}.{bank}"
        if not isinstance(pcrs, dict) or not pcrs:
            raise _err(bp, "expected a non-empty mapping of PCR index to value(s)")
        values: dict[int, tuple[bytes, ...]] = {}
        for key, val in pcrs.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise _err(f"{bp}.{key}", "PCR index is not an integer") from None
            if not 0 <= index <= 23:
                raise _err(f"{bp}.{key}", "PCR index out of range 0..23")
            items = val if isinstance(val, list) else [val]
            if not items:
                raise _err(f"{bp}.{key}", "empty list: nothing would match")
            got: list[bytes] = []
            for i, item in enumerate(items):
                p = f"{bp}.{key}" if not isinstance(val, list) else f"{bp}.{key}[{i}]"
                if isinstance(item, dict):
                    m = _mapping(item, p, frozenset({"value", *_WINDOW_KEYS}))
                    if "value" not in m:
                        raise _err(f"{p}.value", "missing")
                    value = _hex(m["value"], f"{p}.value", BANK_SIZES[bank])
                    window = PcrWindow(*_window(m, p))
                    if window.valid_until is not None or window.note is not None:
                        windows[(bank, index, value)] = window
                else:
                    value = _hex(item, p, BANK_SIZES[bank])
                got.append(value)
            values[index] = tuple(got)
        out[bank] = MappingProxyType(dict(sorted(values.items())))
    return MappingProxyType(out), MappingProxyType(windows)


def _runtime(obj: Any) -> RuntimePolicy:
    """The embedded runtime policy; its errors named under ``policy.runtime``."""
    try:
        return RuntimePolicy.from_dict(obj)
    except RuntimePolicyParseError as exc:
        where = str(exc.field)
        rest = where[len("runtime_policy") :] if where.startswith("runtime_policy") else ""
        raise _err(f"policy.runtime{rest}", exc.message) from None


_TOP = frozenset(
    {
        "version",
        "name",
        "secure_boot",
        "boot_applications",
        "kernel_cmdlines",
        "firmware",
        "db",
        "dbx",
        "sbat",
        "pcrs",
        "runtime",
    }
)
_RULE_KEYS = _TOP - {"version", "name", "runtime"}


@dataclass(frozen=True, slots=True)
class Policy:
    """A checked, frozen reference-value policy. ``None`` means "no rule on this"."""

    version: int
    name: str | None
    secure_boot: bool | None
    boot_applications: tuple[BootApplication, ...] | None
    kernel_cmdlines: tuple[CmdlinePattern, ...] | None
    firmware: FirmwarePolicy | None
    db: DbPolicy | None
    dbx: DbxPolicy | None
    pcrs: Mapping[str, Mapping[int, tuple[bytes, ...]]] | None
    sbat: SbatPolicy | None = None
    # windows of literal PCR values, by (bank, index, value); values absent here have none
    pcr_windows: Mapping[tuple[str, int, bytes], PcrWindow] = field(
        default_factory=lambda: MappingProxyType({})
    )
    runtime: RuntimePolicy | None = None  # IMA (issue 14); None: no runtime part
    _digest: bytes = field(init=False, repr=False, compare=False)
    _expiries: tuple[datetime, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values: list[BootApplication | CmdlinePattern] = [
            *(self.boot_applications or ()),
            *(self.kernel_cmdlines or ()),
        ]
        ends = {v.valid_until for v in values if v.valid_until is not None}
        ends |= {w.valid_until for w in self.pcr_windows.values() if w.valid_until is not None}
        object.__setattr__(self, "_expiries", tuple(sorted(ends)))
        # the policy's identity, worked out once: every appraisal reports its id
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "_digest", hashlib.sha256(canonical.encode()).digest())

    # -- parsing -------------------------------------------------------------------------

    @classmethod
    def load(cls, source: bytes | str | Path) -> Policy:
        """Parse a YAML or JSON policy from bytes, text, or a file path."""
        if isinstance(source, Path):
            with source.open("rb") as fh:
                source = fh.read(MAX_POLICY_BYTES + 1)
        if isinstance(source, str):
            source = source.encode("utf-8")
        if len(source) > MAX_POLICY_BYTES:
            raise _err("policy", f"larger than the {MAX_POLICY_BYTES}-byte limit")
        try:
            doc = yaml.load(source, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise _err("policy", f"not valid YAML/JSON{where}: {problem}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> Policy:
        m = _mapping(doc, "policy", _TOP)
        if "version" not in m:
            raise _err("policy.version", "missing (this reader knows version 1)")
        version = _int(m["version"], "policy.version", 1)
        if version != SCHEMA_VERSION:
            raise _err("policy.version", f"unsupported version {version} (known: 1)")
        if not _RULE_KEYS & m.keys():
            # an empty all-of would pass any machine: never a silent pass
            if "runtime" in m:
                raise _err(
                    "policy",
                    "has only a runtime part: give at least one boot rule beside it "
                    "(e.g. the learned boot policy's pcrs or boot_applications)",
                )
            raise _err("policy", "has no rules (an empty policy would accept anything)")
        firmware = None
        if "firmware" in m:
            f = _mapping(m["firmware"], "policy.firmware", frozenset({"scrtm_versions", "pcr0"}))
            if not f:
                raise _err("policy.firmware", "empty: give scrtm_versions and/or pcr0")
            scrtm = None
            if "scrtm_versions" in f:
                items = _list(f["scrtm_versions"], "policy.firmware.scrtm_versions")
                if not items:
                    raise _err("policy.firmware.scrtm_versions", "empty list: nothing would match")
                scrtm = tuple(
                    _str(v, f"policy.firmware.scrtm_versions[{i}]") for i, v in enumerate(items)
                )
            pcr0 = None
            if "pcr0" in f:
                banks = _mapping(f["pcr0"], "policy.firmware.pcr0", frozenset(BANK_SIZES))
                if not banks:
                    raise _err("policy.firmware.pcr0", "empty: give a bank, e.g. sha256")
                pcr0 = MappingProxyType(
                    {
                        _bank(b, f"policy.firmware.pcr0.{b}"): _hex_list(
                            v, f"policy.firmware.pcr0.{b}", BANK_SIZES[b]
                        )
                        for b, v in banks.items()
                    }
                )
            firmware = FirmwarePolicy(scrtm, pcr0)
        db = None
        if "db" in m:
            d = _mapping(m["db"], "policy.db", frozenset({"require"}))
            if "require" not in d:
                raise _err("policy.db.require", "missing")
            db = DbPolicy(_hex_list(d["require"], "policy.db.require"))
        dbx = None
        if "dbx" in m:
            d = _mapping(m["dbx"], "policy.dbx", frozenset({"forbid", "min_entries", "require"}))
            if not d:
                raise _err("policy.dbx", "empty: give forbid, min_entries and/or require")
            forbid = _hex_list(d["forbid"], "policy.dbx.forbid") if "forbid" in d else ()
            min_entries = (
                _int(d["min_entries"], "policy.dbx.min_entries") if "min_entries" in d else None
            )
            require = _hex_list(d["require"], "policy.dbx.require") if "require" in d else ()
            dbx = DbxPolicy(forbid, min_entries, require)
        pcrs, windows = _pcr_values(m["pcrs"], "policy.pcrs") if "pcrs" in m else (None, {})
        sbat = None
        if "sbat" in m:
            d = _mapping(m["sbat"], "policy.sbat", frozenset({"min_level"}))
            if "min_level" not in d:
                raise _err("policy.sbat.min_level", "missing")
            levels = d["min_level"]
            if not isinstance(levels, dict) or not levels:
                raise _err(
                    "policy.sbat.min_level",
                    "expected a non-empty mapping of component to generation",
                )
            gens: dict[str, int] = {}
            for comp, gen in levels.items():
                path = f"policy.sbat.min_level.{comp}"
                if not isinstance(comp, str) or not _SBAT_COMPONENT.fullmatch(comp):
                    raise _err(path, "not an SBAT component name")
                gens[comp] = _int(gen, path)
            sbat = SbatPolicy(MappingProxyType(gens))
        return cls(
            version=version,
            name=_str(m["name"], "policy.name") if "name" in m else None,
            secure_boot=_bool(m["secure_boot"], "policy.secure_boot")
            if "secure_boot" in m
            else None,
            boot_applications=(
                _boot_apps(m["boot_applications"], "policy.boot_applications")
                if "boot_applications" in m
                else None
            ),
            kernel_cmdlines=(
                _cmdlines(m["kernel_cmdlines"], "policy.kernel_cmdlines")
                if "kernel_cmdlines" in m
                else None
            ),
            firmware=firmware,
            db=db,
            dbx=dbx,
            pcrs=pcrs,
            sbat=sbat,
            pcr_windows=MappingProxyType(dict(windows)),
            runtime=_runtime(m["runtime"]) if "runtime" in m else None,
        )

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The canonical document (what :meth:`to_yaml` writes and ``id`` hashes)."""
        out: dict[str, Any] = {"version": self.version}
        if self.name is not None:
            out["name"] = self.name
        if self.secure_boot is not None:
            out["secure_boot"] = self.secure_boot
        if self.firmware is not None:
            fw: dict[str, Any] = {}
            if self.firmware.scrtm_versions is not None:
                fw["scrtm_versions"] = list(self.firmware.scrtm_versions)
            if self.firmware.pcr0 is not None:
                fw["pcr0"] = {b: [v.hex() for v in vs] for b, vs in self.firmware.pcr0.items()}
            out["firmware"] = fw
        if self.boot_applications is not None:
            apps = []
            for app in self.boot_applications:
                entry: dict[str, str] = {} if app.name is None else {"name": app.name}
                entry.update({b: d.hex() for b, d in app.digests.items()})
                apps.append(entry | _window_dict(app.valid_until, app.note))
            out["boot_applications"] = apps
        if self.kernel_cmdlines is not None:
            out["kernel_cmdlines"] = [
                ({"exact": c.exact} if c.exact is not None else {"pattern": c.pattern})
                | _window_dict(c.valid_until, c.note)
                for c in self.kernel_cmdlines
            ]
        if self.db is not None:
            out["db"] = {"require": [v.hex() for v in self.db.require]}
        if self.dbx is not None:
            dbx: dict[str, Any] = {}
            if self.dbx.forbid:
                dbx["forbid"] = [v.hex() for v in self.dbx.forbid]
            if self.dbx.min_entries is not None:
                dbx["min_entries"] = self.dbx.min_entries
            if self.dbx.require:
                dbx["require"] = [v.hex() for v in self.dbx.require]
            out["dbx"] = dbx
        if self.sbat is not None:
            out["sbat"] = {"min_level": dict(self.sbat.min_level)}
        if self.pcrs is not None:
            out["pcrs"] = {
                b: {str(i): [self._pcr_value(b, i, v) for v in vs] for i, vs in p.items()}
                for b, p in self.pcrs.items()
            }
        if self.runtime is not None:
            out["runtime"] = self.runtime.to_dict()
        return out

    def _pcr_value(self, bank: str, index: int, value: bytes) -> str | dict[str, str]:
        window = self.pcr_windows.get((bank, index, value))
        if window is None:
            return value.hex()
        return {"value": value.hex()} | _window_dict(window.valid_until, window.note)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100, allow_unicode=True)

    @property
    def expiries(self) -> tuple[datetime, ...]:
        """Every distinct ``valid_until``, sorted: an appraisal's outcome depends on the
        time only through how many of them have passed (what a cache key needs)."""
        return self._expiries

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON form: two policies with equal rules share it."""
        return self._digest

    @property
    def id(self) -> str:
        """``ear.appraisal-policy-id``: ``policy:<name>@sha256:<hex>`` (or without a name)."""
        ref = f"sha256:{self.digest.hex()}"
        return f"policy:{self.name}@{ref}" if self.name else f"policy:{ref}"
