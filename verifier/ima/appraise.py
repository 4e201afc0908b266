"""Appraise IMA measurement-list entries against a runtime policy, incrementally.

Two layers (issue 14 "Runtime policies", "Incremental appraisal"):

1. :func:`appraise_entries`: the policy decision for each entry. It names
   every entry that fails: index, path, template, expected digests, actual
   digest, signature state. It trusts the entries it is given: the caller
   must have checked each entry's template hash against its template data
   (the parser does) and proven the entries with the quote (layer 2).
2. :func:`advance`: the incremental step. The verifier keeps, per attester,
   an :class:`ImaProgress` (a few hundred bytes: the TPM's resetCount, how
   many entries are verified, the running PCR 10 value per bank, the
   policy's digest). The attester sends only the entries after those; they
   are extended onto the stored values and must reach the quoted PCR 10 in
   every quoted bank. Only the entries up to the point that matches the
   quote are appraised (IMA appends to the list before it extends the PCR,
   and the quote is read separately, so a list may run ahead of its quote;
   the rest is sent again next time). The state advances only when the
   step passes.

What the stored state cannot let through (each is a test):

- a gap or a replayed suffix: the delta must start at the stored count
  (``start_index``); and whatever indices it claims, its entries must
  extend the stored PCR values to the quoted ones (the hash chain binds
  order and content);
- a reboot: a higher resetCount means a new list, which must start at
  entry 0 from the all-zero PCR; a lower one (a reverted snapshot or a
  cloned vTPM) is refused;
- a policy change: entries verified under another policy are not
  re-used; the list is appraised again from entry 0.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from verifier.ima import parse
from verifier.ima.entries import Extender, ExtendMode
from verifier.ima.parse import _DNG_PREFIXES, WALKED_TEMPLATES, ImaList
from verifier.ima.policy import (
    Digest,
    RuntimePolicy,
    ViolationMode,
    canonical_algorithm,
    format_digest,
    is_kernel_module,
)
from verifier.ima.signature import SignatureCheck, SignatureState, verify_ima_signature
from vtpm_core.errors import ParseError, VerificationError

__all__ = [
    "IMA_PCR",
    "AppraisedEntry",
    "EntryFailure",
    "ImaProgress",
    "ImaStep",
    "RuntimeAppraisal",
    "advance",
    "appraise_entries",
]

IMA_PCR = 10
BOOT_AGGREGATE = "boot_aggregate"
FILE_TEMPLATES = frozenset({"ima", "ima-ng", "ima-sig", "ima-modsig", "evm-sig"})
SIGNED_TEMPLATES = frozenset({"ima-sig", "ima-modsig", "evm-sig"})
BANK_SIZES = MappingProxyType({"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32})


class AppraisedEntry(Protocol):
    """What appraisal reads from one entry (``verifier.ima.entries.ImaEntry`` has it)."""

    @property
    def pcr(self) -> int: ...
    @property
    def template_name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def digest_algo(self) -> str: ...
    @property
    def digest(self) -> bytes: ...
    @property
    def signature(self) -> bytes | None: ...
    @property
    def buf(self) -> bytes | None: ...
    @property
    def is_violation(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class EntryFailure:
    """One entry the policy does not allow, with everything needed to fix the policy."""

    index: int
    path: str
    template: str
    reason: str
    actual: str | None = None
    expected: tuple[str, ...] = ()
    signature: str | None = None

    def __str__(self) -> str:
        text = f"entry {self.index} {self.template} {self.path!r}: {self.reason}"
        if self.actual is not None:
            text += f" (got {self.actual}"
            text += f"; expected {', '.join(self.expected)})" if self.expected else ")"
        if self.signature is not None:
            text += f"; {self.signature}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "template": self.template,
            "reason": self.reason,
            "actual": self.actual,
            "expected": list(self.expected),
            "signature": self.signature,
        }


@dataclass(frozen=True, slots=True)
class RuntimeAppraisal:
    """The outcome over a run of entries: every failure, every warning, and counts."""

    checked: int
    by_digest: int
    by_signature: int
    excluded: int
    failures: tuple[EntryFailure, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "by_digest": self.by_digest,
            "by_signature": self.by_signature,
            "excluded": self.excluded,
            "failures": [f.to_json() for f in self.failures],
            "warnings": list(self.warnings),
        }


def _is_key(buf: bytes) -> bool:
    """Whether an ima-buf buffer is a key: an X.509 certificate or a public key, DER or PEM
    (what Keylime's ``file_signatures.get_pubkey`` recognises, private keys aside)."""
    loaders = (
        x509.load_der_x509_certificate,
        x509.load_pem_x509_certificate,
        serialization.load_der_public_key,
        serialization.load_pem_public_key,
    )
    for load in loaders:
        try:
            load(buf)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return True
    return False


class _Counter:
    __slots__ = ("by_digest", "by_signature", "excluded")

    def __init__(self) -> None:
        self.by_digest = 0
        self.by_signature = 0
        self.excluded = 0


def appraise_entries(
    entries: Iterable[AppraisedEntry],
    policy: RuntimePolicy,
    *,
    first_index: int = 0,
    boot_aggregates: Collection[Digest] = (),
) -> RuntimeAppraisal:
    """Check each entry against ``policy``; never stops at the first failure.

    Per entry, in order:
    1. it must extend PCR 10 (the PCR the quote proves);
    2. a violation entry fails, or with ``ignore-with-flag`` passes with a warning;
    3. ``boot_aggregate`` passes when its digest is one of ``boot_aggregates``
       (worked out from the quoted PCRs 0-9 by the caller) or is listed in the
       policy; else it fails: it is never passed unchecked;
    4. an excluded path passes (``re.match``, as Keylime);
    5. file entries: a signature that verifies with a trusted key passes;
       otherwise the digest must be allowed for the path (or be an allowed
       kernel-module digest on a module path);
    6. ``ima-buf``: a key buffer passes in an ignored keyring or when its
       digest is allowed for that keyring; other buffers when allowed in ``ima_buf``;
    7. any other template fails (it is not appraised, so it cannot pass).

    ``first_index`` is the list index of the first entry, for the reports.
    """
    failures: list[EntryFailure] = []
    warnings: list[str] = []
    count = _Counter()
    checked = 0
    allowed_aggregates = {(canonical_algorithm(a), d) for a, d in boot_aggregates}
    has_keys = bool(policy.signing_keys)
    ignore_all_keyrings = "*" in policy.ignored_keyrings
    if (
        parse.NATIVE
        and isinstance(entries, ImaList)
        and (len(entries) >= FAST_LOOKUP_MIN or policy.digest in _FILE_KEYS)
    ):
        # The walked entries whose (digest, path) the policy lists pass by digest:
        # _appraise_one's decision for them (see _file_keys). Only the others are
        # made into entries and go through every rule, in list order.
        eligible = bytes(
            (2 if t in SIGNED_TEMPLATES and has_keys else 1) if t in FILE_TEMPLATES else 0
            for t in WALKED_TEMPLATES
        )
        rest = entries.unmatched(eligible, _file_keys(policy))
        checked = len(entries)
        count.by_digest = checked - len(rest)
        pairs: Iterable[tuple[int, AppraisedEntry]] = ((i, entries[i]) for i in rest)
    else:
        pairs = enumerate(entries)
    for i, entry in pairs:
        if not isinstance(entries, ImaList):
            checked += 1
        failure = _appraise_one(
            first_index + i, entry, policy, allowed_aggregates, has_keys, ignore_all_keyrings,
            count, warnings,
        )  # fmt: skip
        if failure is not None:
            failures.append(failure)
    if isinstance(entries, ImaList):
        checked = len(entries)
    return RuntimeAppraisal(
        checked=checked,
        by_digest=count.by_digest,
        by_signature=count.by_signature,
        excluded=count.excluded,
        failures=tuple(failures),
        warnings=tuple(warnings),
    )


def _appraise_one(
    index: int,
    entry: AppraisedEntry,
    policy: RuntimePolicy,
    allowed_aggregates: set[Digest],
    has_keys: bool,
    ignore_all_keyrings: bool,
    count: _Counter,
    warnings: list[str],
) -> EntryFailure | None:
    template = entry.template_name
    path = entry.path
    # 1
    if entry.pcr != IMA_PCR:
        return EntryFailure(
            index,
            path,
            template,
            f"extends PCR {entry.pcr}, not PCR {IMA_PCR}: the quote does not prove it",
        )
    # 2
    if entry.is_violation:
        if policy.violations is ViolationMode.IGNORE_WITH_FLAG:
            warnings.append(
                f"entry {index} {template} {path!r}: violation (ToMToU or open-writers) ignored"
            )
            return None
        return EntryFailure(
            index, path, template,
            "violation (ToMToU or open-writers): the kernel could not measure what was read",
        )  # fmt: skip
    algo = canonical_algorithm(entry.digest_algo)
    digest: Digest = (algo, entry.digest)
    # 3
    if path == BOOT_AGGREGATE and template in FILE_TEMPLATES:
        if digest in allowed_aggregates or digest in policy.digests.get(BOOT_AGGREGATE, ()):
            count.by_digest += 1
            return None
        expected = sorted(
            format_digest(d)
            for d in allowed_aggregates | set(policy.digests.get(BOOT_AGGREGATE, ()))
        )
        reason = (
            "boot_aggregate does not match the quoted PCRs 0-9"
            if expected
            else "boot_aggregate not checked: no quoted PCRs 0-9 given and none in the policy"
        )
        return EntryFailure(index, path, template, reason, format_digest(digest), tuple(expected))
    # 4
    if policy.excludes and policy.excludes.match(path) is not None:
        count.excluded += 1
        return None
    # 5
    if template in FILE_TEMPLATES:
        check: SignatureCheck | None = None
        if template in SIGNED_TEMPLATES and entry.signature:
            check = verify_ima_signature(entry.signature, algo, entry.digest, policy.signing_keys)
            if check.valid:
                count.by_signature += 1
                return None
        if policy.allows_file(path, algo, entry.digest):
            count.by_digest += 1
            return None
        listed = policy.expected_for_file(path)
        if path in policy.digests:
            reason = "digest not allowed for this path"
        elif is_kernel_module(path):
            reason = "kernel module not in the policy"
        else:
            reason = "path not in the policy"
        if check is None and template in SIGNED_TEMPLATES and has_keys:
            check = SignatureCheck(SignatureState.ABSENT)
        return EntryFailure(
            index, path, template, reason, format_digest(digest), listed,
            check.describe() if check is not None else None,
        )  # fmt: skip
    # 6
    if template == "ima-buf":
        buf = entry.buf or b""
        if _is_key(buf):
            if ignore_all_keyrings or path in policy.ignored_keyrings:
                count.by_digest += 1
                return None
            allowed = policy.keyrings.get(path)
            if allowed is not None and digest in allowed:
                count.by_digest += 1
                return None
            return EntryFailure(
                index, path, template,
                "key not allowed in this keyring" if allowed else "keyring not in the policy",
                format_digest(digest), tuple(sorted(format_digest(d) for d in allowed or ())),
            )  # fmt: skip
        allowed = policy.ima_buf.get(path)
        if allowed is not None and digest in allowed:
            count.by_digest += 1
            return None
        return EntryFailure(
            index, path, template,
            "buffer not allowed" if allowed else "buffer name not in the policy",
            format_digest(digest), tuple(sorted(format_digest(d) for d in allowed or ())),
        )  # fmt: skip
    # 7
    return EntryFailure(
        index, path, template, f"template {template!r} is not appraised", format_digest(digest)
    )


# -- the fast lookup for walked binary lists ------------------------------------------

FAST_LOOKUP_MIN = 1000
"""From this many entries (or once the policy's keys are built) appraise_entries looks
walked entries up by their bytes; a short delta is cheaper through the rules alone
than building the keys of a large policy (~1 us a digest)."""
_FILE_KEYS: OrderedDict[bytes, frozenset[bytes]] = OrderedDict()  # by policy digest
_FILE_KEYS_MAX = 8
_FILE_KEYS_LOCK = threading.Lock()
_U32 = struct.Struct("<I")


def _file_keys(policy: RuntimePolicy) -> frozenset[bytes]:
    """The (d-ng, n-ng) head bytes (u32 length, "<algo>:\\0" digest, u32 length, path NUL:
    how ima-ng and its kin store them) of every entry that _appraise_one passes by its
    digest alone: a path of ``policy.digests`` that is not ``boot_aggregate`` and no
    exclude matches, with each digest listed for it under each d-ng prefix the parser
    reads as that algorithm. A path that does not survive the parser's UTF-8
    (surrogateescape) round trip is left out, so a key never matches an entry whose
    path is another string. Entries not found here go through every rule."""
    keys = _FILE_KEYS.get(policy.digest)
    if keys is not None:
        return keys
    prefixes: dict[tuple[str, int], list[bytes]] = {}
    for prefix, known in _DNG_PREFIXES.items():
        prefixes.setdefault(known, []).append(prefix + b":\0")
    out = set()
    pack = _U32.pack
    excludes = policy.excludes
    for path, digests in policy.digests.items():
        if path == BOOT_AGGREGATE or (excludes and excludes.match(path) is not None):
            continue
        try:
            raw = path.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            continue
        if b"\0" in raw or raw.decode("utf-8", "surrogateescape") != path:
            continue
        name = pack(len(raw) + 1) + raw + b"\0"
        for algo, digest in digests:
            for prefix in prefixes.get((algo, len(digest)), ()):
                out.add(pack(len(prefix) + len(digest)) + prefix + digest + name)
    keys = frozenset(out)
    with _FILE_KEYS_LOCK:
        _FILE_KEYS[policy.digest] = keys
        while len(_FILE_KEYS) > _FILE_KEYS_MAX:
            _FILE_KEYS.popitem(last=False)
    return keys


# -- incremental state -----------------------------------------------------------------

_STATE_MAGIC = b"IMA1"
_BANK_IDS = {"sha1": 1, "sha256": 2, "sha384": 3, "sha512": 4, "sm3_256": 5}
_BANK_NAMES = {v: k for k, v in _BANK_IDS.items()}
_STRUCT = "ima_progress"


@dataclass(frozen=True, slots=True)
class ImaProgress:
    """Per attester: which list (resetCount), how far it is verified, and PCR 10 there.

    ``pcr10`` maps a bank ("sha256") to the PCR 10 value after ``count``
    entries; ``policy_digest`` is the runtime policy they passed under.
    ``to_bytes`` is what the verifier stores (about 40 bytes plus one PCR
    value per bank).
    """

    reset_count: int
    count: int
    pcr10: Mapping[str, bytes]
    policy_digest: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "pcr10", MappingProxyType(dict(sorted(self.pcr10.items()))))
        for bank, value in self.pcr10.items():
            if BANK_SIZES.get(bank) != len(value):
                raise ValueError(f"PCR 10 value for bank {bank!r} has {len(value)} bytes")

    @classmethod
    def start(cls, reset_count: int, banks: Iterable[str], policy: RuntimePolicy) -> ImaProgress:
        """The state before entry 0 of a new list: PCR 10 is all zeros after a reset."""
        return cls(reset_count, 0, {b: bytes(BANK_SIZES[b]) for b in banks}, policy.digest)

    def resume_index(
        self, reset_count: int, policy: RuntimePolicy, banks: Iterable[str] | None = None
    ) -> int:
        """The entry the attester should send from: 0 after a reboot, a policy change,
        or when the quote is to cover other PCR 10 banks than the stored ones."""
        if reset_count != self.reset_count or not hmac.compare_digest(
            self.policy_digest, policy.digest
        ):
            return 0
        if banks is not None and set(banks) != set(self.pcr10):
            return 0
        return self.count

    def to_bytes(self) -> bytes:
        out = [_STATE_MAGIC, struct.pack(">QQB", self.reset_count, self.count, len(self.pcr10))]
        for bank, value in self.pcr10.items():
            out.append(struct.pack(">B", _BANK_IDS[bank]) + value)
        out.append(self.policy_digest)
        return b"".join(out)

    @classmethod
    def parse(cls, data: bytes) -> ImaProgress:
        if data[:4] != _STATE_MAGIC:
            raise ParseError(_STRUCT, "magic", 0, f"expected {_STATE_MAGIC!r}")
        if len(data) < 21:
            raise ParseError(_STRUCT, "header", len(data), "truncated")
        reset_count, count, nbanks = struct.unpack_from(">QQB", data, 4)
        offset = 21
        pcr10 = {}
        for _ in range(nbanks):
            if offset >= len(data):
                raise ParseError(_STRUCT, "bank", offset, "truncated")
            bank = _BANK_NAMES.get(data[offset])
            if bank is None or bank in pcr10:
                raise ParseError(_STRUCT, "bank", offset, f"bad bank id {data[offset]}")
            size = BANK_SIZES[bank]
            value = data[offset + 1 : offset + 1 + size]
            if len(value) != size:
                raise ParseError(_STRUCT, f"pcr10.{bank}", offset + 1, "truncated")
            pcr10[bank] = value
            offset += 1 + size
        policy_digest = data[offset:]
        if len(policy_digest) != 32:
            raise ParseError(
                _STRUCT, "policy_digest", offset, f"{len(policy_digest)} bytes, expected 32"
            )
        return cls(reset_count, count, pcr10, policy_digest)


@dataclass(frozen=True, slots=True)
class ImaStep:
    """One incremental step: the appraisal of the proven entries and the state after it.

    ``state`` is the state to store when ``ok``; on failure keep the old one
    (the failing entries stay in the list and fail again next time).
    ``pending`` entries came after the quoted PCR value: not proven, not
    appraised, to be sent again.
    """

    appraisal: RuntimeAppraisal
    state: ImaProgress
    proven: int
    pending: int

    @property
    def ok(self) -> bool:
        return self.appraisal.ok


ExtendValues = Callable[[Any], Mapping[str, bytes]]


def advance(
    state: ImaProgress | None,
    *,
    reset_count: int,
    start_index: int,
    entries: Sequence[AppraisedEntry],
    quoted_pcr10: Mapping[str, bytes],
    policy: RuntimePolicy,
    extend_values: ExtendValues,
    boot_aggregates: Collection[Digest] = (),
) -> ImaStep:
    """Extend the stored PCR 10 values by a delta, prove it with the quote, appraise it.

    ``extend_values(entry)`` gives, per bank, the digest the kernel extended
    PCR 10 with for that entry (its template digest in that bank; all ones
    for a violation). Raises VerificationError naming the check when the
    delta cannot be proven: wrong start, resetCount gone down, no prefix of
    the delta reaching the quoted value in every bank.

    Steps:
    1. the list this delta belongs to: same resetCount, policy and banks
       continue the stored state; a higher resetCount (or no state, another
       policy, other banks) starts at entry 0 from zeros; a lower one is refused;
    2. ``start_index`` must be where that list stands;
    3. extend entry by entry; the first point where every bank equals the
       quote ends the proven part (it may be before the first entry);
    4. appraise the proven entries; the new state is that point.
    """
    banks = sorted(quoted_pcr10)
    if not banks:
        raise VerificationError("ima.pcr10", "the quote covers no PCR 10 bank")
    for bank in banks:
        if BANK_SIZES.get(bank) != len(quoted_pcr10[bank]):
            raise VerificationError(
                "ima.pcr10", f"quoted PCR 10 {bank} value has {len(quoted_pcr10[bank])} bytes"
            )
    # 1
    if state is not None and reset_count < state.reset_count:
        raise VerificationError(
            "ima.reset_count",
            f"resetCount went down ({state.reset_count} -> {reset_count}): "
            "a reverted snapshot or a cloned vTPM",
        )
    if state is None or state.resume_index(reset_count, policy, banks) == 0:
        base = ImaProgress.start(reset_count, banks, policy)
    else:
        base = state
    # 2
    if start_index != base.count:
        why = (
            "a new boot, policy or bank set: send the list from entry 0"
            if base.count == 0
            else "send from there"
        )
        raise VerificationError(
            "ima.start_index",
            f"delta starts at entry {start_index}, "
            f"the verified list stands at {base.count} ({why})",
        )
    # 3
    running = dict(base.pcr10)
    plan = tuple((b, BANK_SIZES[b], _hasher(b)) for b in banks)
    proven: int | None = 0 if _equal(running, quoted_pcr10) else None
    first, target = banks[0], quoted_pcr10[banks[0]]
    if proven is None and _walkable(entries, extend_values, banks):
        assert isinstance(entries, ImaList) and isinstance(extend_values, Extender)
        taken, walked = entries.extend_pcr10(
            banks,
            extend_values.mode is ExtendMode.SHA1_PADDED,
            [running[b] for b in banks],
            [quoted_pcr10[b] for b in banks],
        )
        running = dict(zip(banks, walked, strict=True))
        proven = taken
    elif proven is None:
        for n, entry in enumerate(entries, start=1):
            values = extend_values(entry)
            for bank, size, hasher in plan:
                value = values.get(bank)
                if value is None or len(value) != size:
                    raise VerificationError(
                        "ima.extend", f"entry {base.count + n - 1}: no {bank} template digest"
                    )
                running[bank] = hasher(running[bank] + value)
            # PCR values are public: a plain == finds the candidate, _equal confirms it
            if running[first] == target and _equal(running, quoted_pcr10):
                proven = n
                break
    if proven is None:
        raise VerificationError(
            "ima.pcr10",
            f"no prefix of the {len(entries)} entries from entry {start_index} extends "
            f"the verified PCR 10 to the quoted value ({', '.join(banks)}): "
            "the list is not the one the TPM measured",
        )
    # 4
    appraisal = appraise_entries(
        entries[:proven], policy, first_index=start_index, boot_aggregates=boot_aggregates
    )
    new_state = ImaProgress(reset_count, base.count + proven, running, policy.digest)
    return ImaStep(appraisal, new_state, proven, len(entries) - proven)


_C_BANKS = frozenset({"sha1", "sha256", "sha384", "sha512"})


def _walkable(entries: Sequence[AppraisedEntry], extend: ExtendValues, banks: list[str]) -> bool:
    """Whether the C replay gives what the loop would: a parsed binary list, the standard
    extender, every bank it computes one OpenSSL has (as hashlib does) and every quoted
    bank among them (else the loop raises, naming the bank)."""
    return (
        parse.NATIVE
        and isinstance(entries, ImaList)
        and isinstance(extend, Extender)
        and set(extend.banks) <= _C_BANKS
        and set(banks) <= set(extend.banks)
    )


def _equal(running: Mapping[str, bytes], quoted: Mapping[str, bytes]) -> bool:
    return all(hmac.compare_digest(running[b], quoted[b]) for b in quoted)


def _hasher(bank: str) -> Callable[[bytes], bytes]:
    name = "sm3" if bank == "sm3_256" else bank
    try:
        hashlib.new(name)
    except ValueError:
        raise VerificationError("ima.banks", f"cannot compute the {bank} bank here") from None
    constructor = getattr(hashlib, name, None)
    if constructor is not None:
        return lambda data: constructor(data).digest()
    return lambda data: hashlib.new(name, data).digest()
