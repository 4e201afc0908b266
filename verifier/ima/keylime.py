"""Keylime runtime policies (format version 1) to and from :class:`RuntimePolicy`.

Keylime's document (``keylime/ima/ima.py`` ``RUNTIME_POLICY_SCHEMA``, as
``keylime-policy create runtime`` writes it)::

    {"meta": {"version": 1, "generator": 3, "timestamp": "..."},
     "release": 0,
     "digests": {"/usr/bin/bash": ["<hex>", ...]},     # no algorithm: any digest with these bytes
     "excludes": ["<regex>", ...],                      # joined as (a)|(b), re.match on the path
     "keyrings": {".ima": ["<hex>"]},                   # ima-buf entries that carry a key
     "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": null},
     "ima-buf": {"<name>": ["<hex>"]},
     "verification-keys": "<JSON string: {\"keyids\": [int], \"pubkeys\": [base64 SPKI DER]}>"}

Import is at least as strict as Keylime's schema, and stricter where
Keylime would accept something that can only be a mistake (each case is a
test in tests/verifier/ima/test_keylime.py):

- unknown top-level keys are refused (Keylime ignores them, so a misspelt
  ``"exclude"`` silently excludes nothing);
- a digest must have the length of a hash IMA uses (Keylime's pattern
  accepts any 40 to 128 hex digits);
- ``dm_policy`` must be null (Keylime's schema says so too; device-mapper
  policies are not supported here).

Keylime digests carry no algorithm: Keylime compares hex strings whatever
the entry's algorithm. Import gives each the algorithm of its size
(:data:`DEFAULT_ALGORITHMS`: 64 hex digits read as sha256; pass
``algorithms`` to read them as sm3 instead). Export drops the algorithm.

What has no Keylime equivalent is reported in ``notes``, never dropped in
silence, and a loss is only ever one that makes the exported policy
stricter (kernel-module digests, the violation mode). A Keylime policy whose
``meta.generator`` is 0 or 1 is one Keylime does not appraise IMA lists with
at all (``TPMEngine.expects_ima_log``); the import says so in a note and
imports it as a policy that does.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from verifier.ima.policy import (
    LOG_HASH_ALGS,
    Digest,
    ExcludeList,
    RuntimePolicy,
    RuntimePolicyParseError,
    ViolationMode,
    load_json,
)
from verifier.ima.signature import TrustedKey, TrustedKeys, keyid_of_public_key
from vtpm_core.errors import ConfigError

__all__ = [
    "DEFAULT_ALGORITHMS",
    "KEYLIME_GENERATOR_LEGACY_ALLOWLIST",
    "KeylimeExport",
    "KeylimeImport",
    "from_keylime",
    "load_keylime",
    "to_keylime",
]

_ROOT = "keylime"
KEYLIME_POLICY_VERSION = 1
KEYLIME_GENERATOR_LEGACY_ALLOWLIST = 3  # what keylime-policy create writes
_GENERATOR_RANGE = range(0, 4)  # RUNTIME_POLICY_GENERATOR: Unknown .. LegacyAllowList
_HEX = re.compile(r"[0-9a-f]{40,128}")
_BACKREF = re.compile(r"\\[1-9]|\(\?P=")

# hex digits -> algorithm for digests that carry none
DEFAULT_ALGORITHMS: Mapping[int, str] = MappingProxyType(
    {40: "sha1", 56: "sha224", 64: "sha256", 96: "sha384", 128: "sha512"}
)
_TOP = frozenset(
    {"meta", "release", "digests", "excludes", "keyrings", "ima", "ima-buf", "verification-keys"}
)


@dataclass(frozen=True, slots=True)
class KeylimeImport:
    """An imported policy and what the import could not carry over exactly."""

    policy: RuntimePolicy
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KeylimeExport:
    """A Keylime document (``doc``, JSON-ready) and what it could not express."""

    doc: dict[str, Any]
    notes: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(self.doc, indent=2) + "\n"


def _err(path: str, message: str) -> RuntimePolicyParseError:
    return RuntimePolicyParseError(path, message)


def load_keylime(
    source: bytes | str | Path,
    *,
    name: str | None = None,
    algorithms: Mapping[int, str] = DEFAULT_ALGORITHMS,
    max_bytes: int = 256 << 20,
) -> KeylimeImport:
    """Read a Keylime runtime policy (JSON bytes, text or a file path)."""
    if isinstance(source, Path):
        with source.open("rb") as fh:
            source = fh.read(max_bytes + 1)
    if isinstance(source, str):
        source = source.encode("utf-8")
    if len(source) > max_bytes:
        raise _err(_ROOT, f"larger than the {max_bytes}-byte limit")
    return from_keylime(load_json(source, _ROOT), name=name, algorithms=algorithms)


def from_keylime(
    doc: Any, *, name: str | None = None, algorithms: Mapping[int, str] = DEFAULT_ALGORITHMS
) -> KeylimeImport:
    """Check a loaded Keylime document and convert it. ParseError names the field."""
    if isinstance(doc, dict) and "payload" in doc and "signatures" in doc:
        raise _err(
            _ROOT,
            "a DSSE-signed Keylime policy: verify its signature with Keylime "
            "(keylime-policy verify runtime) and convert the payload",
        )
    if isinstance(doc, dict) and "version" in doc and "meta" not in doc:
        raise _err(_ROOT, "this looks like a vtpm runtime policy, not a Keylime one")
    m = _mapping(doc, _ROOT)
    for key in m:
        if key not in _TOP:
            raise _err(f"{_ROOT}.{key}", f"unknown key (known: {', '.join(sorted(_TOP))})")
    for key in sorted(_TOP):
        if key not in m:
            raise _err(f"{_ROOT}.{key}", "missing (Keylime's schema requires it)")
    notes: list[str] = []

    meta = _mapping(m["meta"], f"{_ROOT}.meta")
    for key in ("version", "generator"):
        if key not in meta:
            raise _err(f"{_ROOT}.meta.{key}", "missing")
    version = _int(meta["version"], f"{_ROOT}.meta.version")
    if version != KEYLIME_POLICY_VERSION:
        raise _err(f"{_ROOT}.meta.version", f"unsupported version {version} (known: 1)")
    generator = _int(meta["generator"], f"{_ROOT}.meta.generator")
    if generator not in _GENERATOR_RANGE:
        raise _err(f"{_ROOT}.meta.generator", f"{generator} is not 0..3")
    if generator <= 1:
        notes.append(
            f"meta.generator is {generator}: Keylime does not appraise IMA lists under this "
            "policy; it is imported as a policy that does"
        )
    if "timestamp" in meta:
        _str(meta["timestamp"], f"{_ROOT}.meta.timestamp")
    _int(m["release"], f"{_ROOT}.release")

    ima = _mapping(m["ima"], f"{_ROOT}.ima")
    for key in ("ignored_keyrings", "log_hash_alg", "dm_policy"):
        if key not in ima:
            raise _err(f"{_ROOT}.ima.{key}", "missing (Keylime's schema requires it)")
    ignored = [
        _str(v, f"{_ROOT}.ima.ignored_keyrings[{i}]")
        for i, v in enumerate(_list(ima["ignored_keyrings"], f"{_ROOT}.ima.ignored_keyrings"))
    ]
    log_hash_alg = ima["log_hash_alg"]
    if log_hash_alg not in LOG_HASH_ALGS:
        raise _err(f"{_ROOT}.ima.log_hash_alg", f"{log_hash_alg!r} is not one of {LOG_HASH_ALGS}")
    if ima["dm_policy"] is not None:
        raise _err(f"{_ROOT}.ima.dm_policy", "device-mapper policies are not supported (give null)")

    excludes = []
    for i, item in enumerate(_list(m["excludes"], f"{_ROOT}.excludes")):
        source = _str(item, f"{_ROOT}.excludes[{i}]")
        try:
            re.compile(source)
        except re.error as exc:
            raise _err(
                f"{_ROOT}.excludes[{i}]", f"bad regular expression {source!r}: {exc}"
            ) from None
        if not source:
            raise _err(f"{_ROOT}.excludes[{i}]", "empty pattern (it would exclude every path)")
        excludes.append(source)

    keys = _verification_keys(m["verification-keys"], f"{_ROOT}.verification-keys")
    try:
        policy = RuntimePolicy(
            digests=_digests(m["digests"], f"{_ROOT}.digests", algorithms),
            excludes=ExcludeList(tuple(excludes)),
            keyrings=_digests(m["keyrings"], f"{_ROOT}.keyrings", algorithms),
            ignored_keyrings=frozenset(ignored),
            ima_buf=_digests(m["ima-buf"], f"{_ROOT}.ima-buf", algorithms),
            signing_keys=keys,
            # Keylime takes this from the verifier's ignore_tomtou_errors setting
            # (default: ignore); the strict choice is the policy's default here.
            violations=ViolationMode.FAIL,
            log_hash_alg=log_hash_alg,
            name=name,
        )
    except ConfigError as exc:
        raise _err(_ROOT, str(exc)) from None
    return KeylimeImport(policy, tuple(notes))


def to_keylime(policy: RuntimePolicy) -> KeylimeExport:
    """Write ``policy`` as a Keylime runtime policy. ConfigError when it cannot mean the same.

    Refused: excludes with backreferences (Keylime joins the patterns into
    one regex, which renumbers groups). Reported in ``notes``: kernel-module
    digests (no Keylime equivalent: left out, so Keylime fails those
    entries), the violation mode (a Keylime verifier setting), digests whose
    algorithm is not the one import would read back, a key id Keylime would
    recompute.
    """
    notes: list[str] = []
    patterns = list(policy.excludes.patterns)
    for i, source in enumerate(patterns):
        if _BACKREF.search(source):
            raise ConfigError(
                f"excludes[{i}] {source!r} has a backreference: Keylime joins excludes into "
                "one regex, where group numbers change"
            )
    if patterns:
        try:
            re.compile("(" + ")|(".join(patterns) + ")")
        except re.error as exc:
            raise ConfigError(
                f"excludes cannot be joined into one regex as Keylime does: {exc}"
            ) from None
    if policy.kernel_modules:
        notes.append(
            f"kernel_modules ({len(policy.kernel_modules)} digests) have no Keylime equivalent "
            "and are left out: Keylime fails module entries whose path is not in digests"
        )
    notes.append(
        f"violations: {policy.violations.value} is not part of a Keylime policy; Keylime "
        "uses the verifier's [verifier] ignore_tomtou_errors setting"
    )
    readback = {v: k for k, v in DEFAULT_ALGORITHMS.items()}
    odd = sorted(
        {
            algo
            for table in (policy.digests, policy.keyrings, policy.ima_buf)
            for digests in table.values()
            for algo, _ in digests
            if algo not in readback
        }
        | {algo for algo, _ in policy.kernel_modules if algo not in readback}
    )
    if odd:
        notes.append(
            f"digests under {', '.join(odd)} lose their algorithm in Keylime's format "
            "(importing them back reads them by size, e.g. 64 hex digits as sha256)"
        )
    keyids: list[int] = []
    pubkeys: list[str] = []
    for key in policy.signing_keys.keys:
        keyid = int.from_bytes(key.keyid, "big")
        if keyid == 0 and keyid_of_public_key(key.key) != key.keyid:
            notes.append(
                f"signing key {key.name or ''} has key id 00000000, which Keylime replaces by "
                "the key's SHA-1 id"
            )
        keyids.append(keyid)
        pubkeys.append(base64.b64encode(key.spki).decode("ascii"))
    verification_keys = json.dumps({"pubkeys": pubkeys, "keyids": keyids}) if pubkeys else ""
    doc: dict[str, Any] = {
        "meta": {
            "version": KEYLIME_POLICY_VERSION,
            "generator": KEYLIME_GENERATOR_LEGACY_ALLOWLIST,
        },
        "release": 0,
        "digests": _hex_map(policy.digests),
        "excludes": patterns,
        "keyrings": _hex_map(policy.keyrings),
        "ima": {
            "ignored_keyrings": sorted(policy.ignored_keyrings),
            "log_hash_alg": policy.log_hash_alg,
            "dm_policy": None,
        },
        "ima-buf": _hex_map(policy.ima_buf),
        "verification-keys": verification_keys,
    }
    return KeylimeExport(doc, tuple(notes))


# -- readers ---------------------------------------------------------------------------


def _mapping(obj: Any, path: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _err(path, f"expected an object, got {type(obj).__name__}")
    return obj


def _list(obj: Any, path: str) -> list[Any]:
    if not isinstance(obj, list):
        raise _err(path, f"expected a list, got {type(obj).__name__}")
    return obj


def _str(obj: Any, path: str) -> str:
    if not isinstance(obj, str):
        raise _err(path, f"expected a string, got {type(obj).__name__}")
    return obj


def _int(obj: Any, path: str) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int) or obj < 0:
        raise _err(path, f"expected an integer >= 0, got {obj!r}")
    return obj


def _key_path(path: str, key: str) -> str:
    return f"{path}[{json.dumps(key)[:200]}]"


def _digests(obj: Any, path: str, algorithms: Mapping[int, str]) -> dict[str, frozenset[Digest]]:
    out: dict[str, frozenset[Digest]] = {}
    for key, value in _mapping(obj, path).items():
        kp = _key_path(path, key)
        if not key:
            raise _err(path, "empty path or name")
        if "\0" in key:
            raise _err(kp, "contains a NUL character")
        items = _list(value, kp)
        if not items:
            raise _err(kp, "empty list (Keylime's schema requires at least one digest)")
        digests = set()
        for i, item in enumerate(items):
            text = _str(item, f"{kp}[{i}]")
            if _HEX.fullmatch(text) is None:
                raise _err(f"{kp}[{i}]", "not 40 to 128 lower-case hex digits (Keylime's pattern)")
            algo = algorithms.get(len(text))
            if algo is None:
                raise _err(
                    f"{kp}[{i}]",
                    f"{len(text)} hex digits is no hash IMA uses "
                    f"(known: {', '.join(str(n) for n in sorted(algorithms))})",
                )
            digests.add((algo, bytes.fromhex(text)))
        out[key] = frozenset(digests)
    return out


def _hex_map(table: Mapping[str, frozenset[Digest]]) -> dict[str, list[str]]:
    return {k: sorted({d.hex() for _, d in table[k]}) for k in sorted(table)}


def _verification_keys(obj: Any, path: str) -> TrustedKeys:
    text = _str(obj, path)
    if not text:
        return TrustedKeys()
    try:
        ring = json.loads(text)
        if isinstance(ring, str):  # Keylime accepts a doubly encoded string too
            ring = json.loads(ring)
    except json.JSONDecodeError as exc:
        raise _err(path, f"not a JSON keyring: {exc.msg} at column {exc.colno}") from None
    ring = _mapping(ring, path)
    for key in ("keyids", "pubkeys"):
        if key not in ring:
            raise _err(f"{path}.{key}", "missing")
    keyids = [
        _int(v, f"{path}.keyids[{i}]")
        for i, v in enumerate(_list(ring["keyids"], f"{path}.keyids"))
    ]
    pubkeys = _list(ring["pubkeys"], f"{path}.pubkeys")
    out = []
    for i, item in enumerate(pubkeys):
        p = f"{path}.pubkeys[{i}]"
        try:
            spki = base64.b64decode(_str(item, p), validate=True)
        except binascii.Error:
            raise _err(p, "not base64") from None
        try:
            probe = TrustedKey(b"\0\0\0\0", spki)
        except ConfigError as exc:
            raise _err(p, str(exc)) from None
        # ImaKeyring._base64_to_der_keylist: a missing (or zero) id is the key's SHA-1 id
        given = keyids[i] if i < len(keyids) else 0
        if given >= 1 << 32:
            raise _err(f"{path}.keyids[{i}]", f"{given} does not fit in 32 bits")
        keyid = given.to_bytes(4, "big") if given else keyid_of_public_key(probe.key)
        out.append(TrustedKey(keyid, spki))
    return TrustedKeys.of(out)
