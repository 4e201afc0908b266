"""Runtime policies for IMA measurement lists (issue 14 "Runtime policies").

The document (JSON, ``version: 1``)::

    {
      "version": 1,
      "name": "web-fleet",                                  # optional label
      "digests": {"/usr/bin/bash": ["sha256:<hex>", ...]},  # several per path (updates)
      "excludes": ["/tmp/.*", "/var/log/.*"],               # Python regexes, re.match
      "kernel_modules": ["sha256:<hex>", ...],              # any *.ko[.gz|.xz|.zst] path
      "keyrings": {".ima": ["sha256:<hex>"]},               # ima-buf keys loaded into keyrings
      "ignored_keyrings": [".builtin_trusted_keys"],        # keyring entries not checked
      "ima_buf": {"kexec-cmdline": ["sha256:<hex>"]},       # other ima-buf buffers
      "signing_keys": [{"keyid": "<8 hex>", "public_key": "<base64 SPKI DER>", "name": "..."}],
      "violations": "fail",                                 # or "ignore-with-flag"
      "log_hash_alg": "sha1"                                # template-hash algorithm (Keylime's)
    }

Digests are ``algorithm:hex`` as IMA's ``d-ng`` field prints them
(``sha256:…``); a digest matches an entry only under the same algorithm.

Excludes: each pattern is matched with :func:`re.match` against the entry's
path (anchored at the start, not the end), as Keylime matches its
``excludes``, so a policy means the same after ``vtpm ima policy convert``.
An excluded entry passes whatever its digest: exclude only what changes and
cannot run (logs, caches).

Kernel modules are allowed by digest on any module path, because the same
module is measured under ``/lib/modules/<version>/…`` or ``/usr/lib/…``.

Guarantees after :meth:`RuntimePolicy.load`: every key known, every type
right, every digest the size of its algorithm, every pattern compiled, every
key loaded, and at least one rule (a policy that allows nothing would fail
every list; an empty one that allowed everything is not expressible). A
malformed document is a :class:`RuntimePolicyParseError` whose field is the
path, e.g. ``runtime_policy.digests["/usr/bin/bash"][1]``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from verifier.ima.signature import TrustedKey, TrustedKeys
from vtpm_core.errors import ConfigError, ParseError

__all__ = [
    "DIGEST_SIZES",
    "LOG_HASH_ALGS",
    "MAX_RUNTIME_POLICY_BYTES",
    "Digest",
    "ExcludeList",
    "RuntimePolicy",
    "RuntimePolicyParseError",
    "ViolationMode",
    "format_digest",
    "is_kernel_module",
    "load_json",
    "parse_digest",
]

SCHEMA_VERSION = 1
MAX_RUNTIME_POLICY_BYTES = 256 << 20  # a whole distribution's files fit in tens of MiB
MAX_EXCLUDES = 4096
MAX_PATTERN_CHARS = 4096
_STRUCT = "runtime_policy"

# The file-data hash algorithms IMA prints (crypto/hash_info.c) and their sizes.
DIGEST_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "md5": 16,
        "sha1": 20,
        "sha224": 28,
        "sha256": 32,
        "sha384": 48,
        "sha512": 64,
        "sm3": 32,
        "streebog256": 32,
        "streebog512": 64,
        "sha3-256": 32,
        "sha3-384": 48,
        "sha3-512": 64,
    }
)
_ALGO_ALIASES = {"sm3-256": "sm3", "sm3_256": "sm3"}
LOG_HASH_ALGS = ("sha1", "sha256", "sha384", "sha512")

# A kernel module file as kmod installs it (compressed or not).
_MODULE_RE = re.compile(r".*\.ko(\.gz|\.xz|\.zst)?")

# (algorithm, raw digest): how a digest is compared.
Digest = tuple[str, bytes]


class ViolationMode(enum.Enum):
    """What a ToMToU / open-writers violation entry does to the appraisal.

    ``fail``: the list is contraindicated (the kernel could not measure what
    ran). ``ignore-with-flag``: it passes and the appraisal reports it as a
    warning, naming the entry.
    """

    FAIL = "fail"
    IGNORE_WITH_FLAG = "ignore-with-flag"


class RuntimePolicyParseError(ParseError):
    """A malformed runtime policy; ``field`` is the path, e.g. ``runtime_policy.excludes[3]``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(_STRUCT, path, 0, message)
        self.args = (f"{path}: {message}",)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _err(path: str, message: str) -> RuntimePolicyParseError:
    return RuntimePolicyParseError(path, message)


def canonical_algorithm(name: str) -> str:
    """IMA's current name for a hash algorithm ("sm3-256" -> "sm3")."""
    return _ALGO_ALIASES.get(name, name)


def parse_digest(text: Any, path: str) -> Digest:
    """``"sha256:<hex>"`` -> ("sha256", bytes); the size must be the algorithm's."""
    if not isinstance(text, str):
        raise _err(path, f"expected an 'algorithm:hex' string, got {type(text).__name__}")
    algo, sep, hexpart = text.partition(":")
    if not sep:
        raise _err(path, f"{text[:80]!r} has no algorithm (write e.g. 'sha256:<hex>')")
    algo = canonical_algorithm(algo.lower())
    size = DIGEST_SIZES.get(algo)
    if size is None:
        raise _err(path, f"unknown algorithm {algo!r} (known: {', '.join(DIGEST_SIZES)})")
    try:
        value = bytes.fromhex(hexpart)
    except ValueError:
        raise _err(path, "not a hex string after the algorithm") from None
    if len(value) != size:
        raise _err(path, f"{algo} digest of {len(value)} bytes, expected {size}")
    return (algo, value)


def format_digest(digest: Digest) -> str:
    return f"{digest[0]}:{digest[1].hex()}"


def is_kernel_module(path: str) -> bool:
    """True for a path that names a kernel module file (``.ko``, ``.ko.xz``, ...)."""
    return _MODULE_RE.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class ExcludeList:
    """Exclude patterns, compiled once. :meth:`match` says whether a path is excluded.

    Each pattern is compiled on its own (so an error names it). When no
    pattern has groups, they are also joined into one alternation, which
    matches the same paths in one call; a pattern with groups could change
    meaning there (numbered backreferences), so then each is tried in turn.
    """

    patterns: tuple[str, ...] = ()
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _combined: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = []
        for i, source in enumerate(self.patterns):
            try:
                compiled.append(re.compile(source))
            except re.error as exc:
                raise ConfigError(
                    f"excludes[{i}] {source!r}: bad regular expression: {exc}"
                ) from None
        combined = None
        if compiled and all(c.groups == 0 for c in compiled):
            try:
                combined = re.compile("|".join(f"(?:{p})" for p in self.patterns))
            except re.error:  # e.g. a global flag "(?i)" inside the alternation
                combined = None
        object.__setattr__(self, "_compiled", tuple(compiled))
        object.__setattr__(self, "_combined", combined)

    def match(self, path: str) -> str | None:
        """The first pattern that matches ``path`` (re.match), or None."""
        if not self._compiled:
            return None
        if self._combined is not None and self._combined.match(path) is None:
            return None
        for source, pattern in zip(self.patterns, self._compiled, strict=True):
            if pattern.match(path) is not None:
                return source
        return None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __len__(self) -> int:
        return len(self.patterns)


def _frozen_digests(items: Mapping[str, Iterable[Digest]]) -> Mapping[str, frozenset[Digest]]:
    return MappingProxyType({k: frozenset(v) for k, v in items.items()})


@dataclass(frozen=True, slots=True)
class RuntimePolicy:
    """A checked, frozen runtime policy (see the module docstring for the document).

    ``digests``, ``keyrings`` and ``ima_buf`` map a path or buffer name to
    the (algorithm, digest) pairs allowed for it; ``kernel_modules`` is the
    set allowed on any module path.
    """

    digests: Mapping[str, frozenset[Digest]] = field(default_factory=lambda: MappingProxyType({}))
    excludes: ExcludeList = field(default_factory=ExcludeList)
    kernel_modules: frozenset[Digest] = frozenset()
    keyrings: Mapping[str, frozenset[Digest]] = field(default_factory=lambda: MappingProxyType({}))
    ignored_keyrings: frozenset[str] = frozenset()
    ima_buf: Mapping[str, frozenset[Digest]] = field(default_factory=lambda: MappingProxyType({}))
    signing_keys: TrustedKeys = field(default_factory=TrustedKeys)
    violations: ViolationMode = ViolationMode.FAIL
    log_hash_alg: str = "sha1"
    name: str | None = None
    version: int = SCHEMA_VERSION
    _digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Values built in code get the same guarantees as loaded ones.
        # Copied, never wrapped: a caller's dict must not change the policy later.
        for attr in ("digests", "keyrings", "ima_buf"):
            object.__setattr__(self, attr, _frozen_digests(getattr(self, attr)))
        object.__setattr__(self, "kernel_modules", frozenset(self.kernel_modules))
        object.__setattr__(self, "ignored_keyrings", frozenset(self.ignored_keyrings))
        if self.log_hash_alg not in LOG_HASH_ALGS:
            raise ConfigError(f"log_hash_alg {self.log_hash_alg!r} is not one of {LOG_HASH_ALGS}")
        if not self.has_rules:
            raise ConfigError(
                "runtime policy has no rules: no digests, modules, keyrings, buffers, "
                "excludes or signing keys (it would fail every list)"
            )
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "_digest", hashlib.sha256(canonical.encode()).digest())

    @property
    def has_rules(self) -> bool:
        return bool(
            self.digests
            or self.excludes
            or self.kernel_modules
            or self.keyrings
            or self.ima_buf
            or self.signing_keys
            or self.ignored_keyrings
        )

    # -- lookups (what appraisal asks) ---------------------------------------------------

    def allows_file(self, path: str, algo: str, digest: bytes) -> bool:
        """True when ``digest`` (under ``algo``) is listed for ``path``, or for any
        module when ``path`` is a kernel module. Excludes are not applied here."""
        key = (canonical_algorithm(algo), digest)
        allowed = self.digests.get(path)
        if allowed is not None and key in allowed:
            return True
        return bool(self.kernel_modules) and key in self.kernel_modules and is_kernel_module(path)

    def expected_for_file(self, path: str) -> tuple[str, ...]:
        """The digests the policy lists for ``path`` (for failure reports)."""
        out = sorted(format_digest(d) for d in self.digests.get(path, ()))
        if is_kernel_module(path) and self.kernel_modules:
            out.append(f"any of {len(self.kernel_modules)} kernel-module digests")
        return tuple(out)

    # -- parsing -------------------------------------------------------------------------

    @classmethod
    def load(
        cls, source: bytes | str | Path, *, max_bytes: int = MAX_RUNTIME_POLICY_BYTES
    ) -> RuntimePolicy:
        """Parse a JSON runtime policy from bytes, text, or a file path.

        Duplicate keys are refused (a second entry for one path must not
        silently replace the first).
        """
        if isinstance(source, Path):
            with source.open("rb") as fh:
                source = fh.read(max_bytes + 1)
        if isinstance(source, str):
            source = source.encode("utf-8")
        if len(source) > max_bytes:
            raise _err(_STRUCT, f"larger than the {max_bytes}-byte limit")
        return cls.from_dict(load_json(source, _STRUCT))

    @classmethod
    def from_dict(cls, doc: Any) -> RuntimePolicy:
        root = _STRUCT
        m = _mapping(doc, root, _TOP)
        if "meta" in m or "verification-keys" in m:
            raise _err(root, "this is a Keylime runtime policy: import it with "
                       "`vtpm ima policy convert --from keylime`")  # fmt: skip
        if "version" not in m:
            raise _err(f"{root}.version", "missing (this reader knows version 1)")
        version = m["version"]
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            raise _err(f"{root}.version", f"unsupported version {version!r} (known: 1)")
        name = _str(m["name"], f"{root}.name") if "name" in m else None
        excludes_src = tuple(_patterns(m.get("excludes", []), f"{root}.excludes"))
        keys = _signing_keys(m.get("signing_keys", []), f"{root}.signing_keys")
        violations_raw = m.get("violations", ViolationMode.FAIL.value)
        try:
            violations = ViolationMode(violations_raw)
        except ValueError:
            raise _err(
                f"{root}.violations",
                f"{violations_raw!r} is not one of {', '.join(v.value for v in ViolationMode)}",
            ) from None
        log_hash_alg = m.get("log_hash_alg", "sha1")
        if log_hash_alg not in LOG_HASH_ALGS:
            raise _err(f"{root}.log_hash_alg", f"{log_hash_alg!r} is not one of {LOG_HASH_ALGS}")
        try:
            return cls(
                digests=_digest_map(m.get("digests", {}), f"{root}.digests"),
                excludes=ExcludeList(excludes_src),
                kernel_modules=frozenset(
                    _digest_list(
                        m.get("kernel_modules", []), f"{root}.kernel_modules", empty_ok=True
                    )
                ),
                keyrings=_digest_map(m.get("keyrings", {}), f"{root}.keyrings"),
                ignored_keyrings=frozenset(
                    _str(v, f"{root}.ignored_keyrings[{i}]")
                    for i, v in enumerate(
                        _list(m.get("ignored_keyrings", []), f"{root}.ignored_keyrings")
                    )
                ),
                ima_buf=_digest_map(m.get("ima_buf", {}), f"{root}.ima_buf"),
                signing_keys=keys,
                violations=violations,
                log_hash_alg=log_hash_alg,
                name=name,
            )
        except ConfigError as exc:
            raise _err(root, str(exc)) from None

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The canonical document (sorted paths and digests), what :meth:`to_json` writes."""
        out: dict[str, Any] = {"version": self.version}
        if self.name is not None:
            out["name"] = self.name
        out["digests"] = _digest_map_json(self.digests)
        out["excludes"] = list(self.excludes.patterns)
        out["kernel_modules"] = sorted(format_digest(d) for d in self.kernel_modules)
        out["keyrings"] = _digest_map_json(self.keyrings)
        out["ignored_keyrings"] = sorted(self.ignored_keyrings)
        out["ima_buf"] = _digest_map_json(self.ima_buf)
        out["signing_keys"] = [k.to_json() for k in self.signing_keys.keys]
        out["violations"] = self.violations.value
        out["log_hash_alg"] = self.log_hash_alg
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON form: equal policies share it."""
        return self._digest

    @property
    def id(self) -> str:
        """``runtime-policy:<name>@sha256:<hex>`` (or without a name), for results."""
        ref = f"sha256:{self.digest.hex()}"
        return f"runtime-policy:{self.name}@{ref}" if self.name else f"runtime-policy:{ref}"

    @property
    def digest_count(self) -> int:
        return sum(len(v) for v in self.digests.values()) + len(self.kernel_modules)


# -- a small typed reader over the loaded document ---------------------------------------

_TOP = frozenset(
    {
        "version",
        "name",
        "digests",
        "excludes",
        "kernel_modules",
        "keyrings",
        "ignored_keyrings",
        "ima_buf",
        "signing_keys",
        "violations",
        "log_hash_alg",
        # recognised only to point at `convert` (Keylime's keys)
        "meta",
        "verification-keys",
    }
)


def load_json(data: bytes, root: str) -> Any:
    """``json.loads`` that refuses duplicate keys, NaN/Infinity, and names the position."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise _err(root, f"duplicate key {key[:200]!r}")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise _err(root, f"{name} is not JSON")

    try:
        return json.loads(data, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise _err(
            root, f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError as exc:
        raise _err(root, f"not UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise _err(root, "nested too deeply") from None


def _mapping(obj: Any, path: str, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _err(path, f"expected an object, got {type(obj).__name__}")
    if allowed is not None:
        for key in obj:
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


def _key_path(path: str, key: str) -> str:
    return f"{path}[{json.dumps(key)[:200]}]"


def _digest_list(obj: Any, path: str, *, empty_ok: bool = False) -> list[Digest]:
    items = _list(obj, path)
    if not items and not empty_ok:
        raise _err(path, "empty list: nothing would match (leave the entry out)")
    return [parse_digest(v, f"{path}[{i}]") for i, v in enumerate(items)]


def _digest_map(obj: Any, path: str) -> dict[str, frozenset[Digest]]:
    m = _mapping(obj, path)
    out = {}
    for key, value in m.items():
        if not key:
            raise _err(path, "empty path or name")
        if "\0" in key:
            raise _err(_key_path(path, key), "contains a NUL character")
        out[key] = frozenset(_digest_list(value, _key_path(path, key)))
    return out


def _digest_map_json(m: Mapping[str, frozenset[Digest]]) -> dict[str, list[str]]:
    return {k: sorted(format_digest(d) for d in m[k]) for k in sorted(m)}


def _patterns(obj: Any, path: str) -> list[str]:
    items = _list(obj, path)
    if len(items) > MAX_EXCLUDES:
        raise _err(path, f"{len(items)} patterns, the limit is {MAX_EXCLUDES}")
    out = []
    for i, item in enumerate(items):
        source = _str(item, f"{path}[{i}]")
        if not source:
            raise _err(f"{path}[{i}]", "empty pattern (it would exclude every path)")
        if len(source) > MAX_PATTERN_CHARS:
            raise _err(f"{path}[{i}]", f"longer than {MAX_PATTERN_CHARS} characters")
        try:
            re.compile(source)
        except re.error as exc:
            raise _err(f"{path}[{i}]", f"bad regular expression {source!r}: {exc}") from None
        out.append(source)
    return out


def _signing_keys(obj: Any, path: str) -> TrustedKeys:
    keys = []
    for i, item in enumerate(_list(obj, path)):
        p = f"{path}[{i}]"
        k = _mapping(item, p, frozenset({"keyid", "public_key", "name"}))
        for required in ("keyid", "public_key"):
            if required not in k:
                raise _err(f"{p}.{required}", "missing")
        keyid_text = _str(k["keyid"], f"{p}.keyid")
        try:
            keyid = bytes.fromhex(keyid_text)
        except ValueError:
            raise _err(f"{p}.keyid", "not a hex string") from None
        if len(keyid) != 4:
            raise _err(f"{p}.keyid", f"{len(keyid)} bytes, expected 4 (8 hex digits)")
        try:
            spki = base64.b64decode(_str(k["public_key"], f"{p}.public_key"), validate=True)
        except binascii.Error:
            raise _err(f"{p}.public_key", "not base64") from None
        name = _str(k["name"], f"{p}.name") if "name" in k else None
        try:
            keys.append(TrustedKey(keyid, spki, name))
        except ConfigError as exc:
            raise _err(f"{p}.public_key", str(exc)) from None
    return TrustedKeys.of(keys)
