"""Appraise evidence: quote, event log replay, then policy (issue 5; DESIGN "Flows" 3).

Three layers, in order, each only reading what the previous one proved:

1. Quote (``verifier.quote.verify_quote``): AK attributes, signature over the
   received bytes, magic, type, nonce, pcrSelect, pcrDigest. A failure here
   stops the appraisal: nothing below is proven.
2. Replay (``EventLog.verify``): the log replays to the quoted PCR values it
   covers. A failure stops the appraisal: no event may be trusted.
3. Policy (``verifier.policy.rules``): every rule runs over the replayed,
   digest-checked events and the quoted values; EVERY failure is reported
   with its rule, claim, event (index, PCR, type), expected and actual.

The result carries an AR4SI trustworthiness vector (draft-ietf-rats-ar4si
§2.3) and the EAR status derived from it (worst tier). Not done here: nonce
single-use/expiry, clock monotonicity across quotes, AK-to-EK binding: the
caller (the attestation service) owns that state.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from verifier.ear import Ar4si, TrustVector
from verifier.eventlog import EventLog, ReplayedLog
from verifier.eventlog.replay import ReplayMismatchError
from verifier.policy.rules import (
    CONFIGURATION,
    EXECUTABLES,
    AllOf,
    BootEvidence,
    EventRef,
    Failure,
    rules_for,
)
from verifier.policy.schema import Policy
from verifier.quote import PcrValues, Public, Signature, VerifiedQuote, verify_quote
from vtpm_core.errors import ConfigError, VerificationError

__all__ = ["AppraisalResult", "Appraiser", "Evidence", "QuoteSummary", "appraise", "appraise_log"]

INSTANCE_IDENTITY = "instance-identity"


@dataclass(frozen=True, slots=True)
class Evidence:
    """What an attester sends: TPMS_ATTEST bytes, TPMT_SIGNATURE, the PCR values, the log."""

    attest: bytes
    signature: bytes | Signature
    pcrs: PcrValues
    eventlog: bytes | EventLog | None = None


@dataclass(frozen=True, slots=True)
class QuoteSummary:
    """What the verified quote says about the TPM (TPMS_ATTEST clockInfo, firmwareVersion)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    qualified_signer: bytes

    @classmethod
    def of(cls, q: VerifiedQuote) -> QuoteSummary:
        c = q.clock_info
        return cls(
            c.clock, c.reset_count, c.restart_count, c.safe, q.firmware_version, q.qualified_signer
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "clock": self.clock,
            "reset_count": self.reset_count,
            "restart_count": self.restart_count,
            "safe": self.safe,
            "firmware_version": f"{self.firmware_version:016x}",
            "qualified_signer": self.qualified_signer.hex(),
        }


@dataclass(frozen=True, slots=True)
class AppraisalResult:
    """The verdict: ``status`` (EAR), the AR4SI vector, every failure, warnings, the quote."""

    status: str
    trust_vector: TrustVector
    failures: tuple[Failure, ...]
    warnings: tuple[str, ...]
    quote: QuoteSummary | None
    policy_id: str
    replayed: ReplayedLog | None = field(default=None, repr=False, compare=False)

    @property
    def affirming(self) -> bool:
        return self.status == "affirming"

    @property
    def failure_summaries(self) -> tuple[dict[str, str], ...]:
        return tuple({"rule": f.rule, "claim": f.claim, "message": str(f)} for f in self.failures)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "trust_vector": self.trust_vector.to_json(),
            "policy_id": self.policy_id,
            "failures": [f.to_json() for f in self.failures],
            "warnings": list(self.warnings),
            "quote": None if self.quote is None else self.quote.to_json(),
        }


def _vector(
    policy_claims: frozenset[str], failures: tuple[Failure, ...], identity: int
) -> TrustVector:
    failed = {f.claim for f in failures}
    config = 0
    if CONFIGURATION in policy_claims:
        config = Ar4si.UNSUPPORTABLE_CONFIG if CONFIGURATION in failed else Ar4si.APPROVED_CONFIG
    exe = 0
    if EXECUTABLES in policy_claims:
        exe = Ar4si.CONTRAINDICATED_RUNTIME if EXECUTABLES in failed else Ar4si.APPROVED_BOOT
    return TrustVector(instance_identity=identity, configuration=config, executables=exe)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A policy turned into its rule tree once, with its id and the claims it bears on."""

    policy: Policy
    rules: AllOf
    claims: frozenset[str]
    policy_id: str

    @classmethod
    def of(cls, policy: Policy) -> _Compiled:
        rules = rules_for(policy)
        return cls(policy, rules, frozenset([r.claim for r in rules.children]), policy.id)


def _result(
    policy: _Compiled,
    vector: TrustVector,
    failures: tuple[Failure, ...],
    warnings: tuple[str, ...],
    quote: QuoteSummary | None,
    replayed: ReplayedLog | None,
) -> AppraisalResult:
    return AppraisalResult(
        vector.status, vector, failures, warnings, quote, policy.policy_id, replayed
    )


def _evaluate(
    policy: _Compiled,
    evidence: BootEvidence,
    identity: int,
    warnings: list[str],
    quote: QuoteSummary | None,
    replayed: ReplayedLog | None,
) -> AppraisalResult:
    failures = tuple(policy.rules.failures(evidence))  # (what check() would raise)
    for e in evidence.data_mismatches:
        warnings.append(f"{EventRef.of(e)}: data does not match its digest (not trusted)")
    vector = _vector(policy.claims, failures, identity)
    return _result(policy, vector, failures, tuple(dict.fromkeys(warnings)), quote, replayed)


def _failed_before_policy(
    policy: _Compiled,
    check: str,
    message: str,
    claim: str,
    quote: QuoteSummary | None,
    *,
    expected: str = "a valid check",
    event: EventRef | None = None,
) -> AppraisalResult:
    failure = Failure(check, claim, message, expected, "failed", event)
    if claim == INSTANCE_IDENTITY:
        vector = TrustVector(instance_identity=Ar4si.CRYPTO_VALIDATION_FAILED)
    else:  # the quote is good, the log is not: nothing it says about the boot holds
        vector = TrustVector(
            instance_identity=Ar4si.TRUSTWORTHY_INSTANCE,
            configuration=Ar4si.CRYPTO_VALIDATION_FAILED,
            executables=Ar4si.CRYPTO_VALIDATION_FAILED,
        )
    return _result(policy, vector, (failure,), (), quote, None)


def appraise(
    evidence: Evidence,
    policy: Policy,
    *,
    nonce: bytes,
    ak: Public,
    require_ak_attributes: bool = True,
    now: datetime | None = None,
) -> AppraisalResult:
    """Steps 1-3 above. Returns a result for every well-formed evidence, failing or not.

    ``now``: the appraisal time the policy's ``valid_until`` values are held against
    (the wall clock when None; a re-appraisal passes its own).

    Raises ParseError for malformed evidence (attest, signature, event log),
    ConfigError for an empty nonce or a policy without rules. A failed check
    is a contraindicated result, never an exception, so the caller can sign
    and record it. Stateless; :class:`Appraiser` adds caches.
    """
    return _appraise(
        evidence,
        _Compiled.of(policy),
        nonce,
        ak,
        require_ak_attributes,
        _replay_uncached,
        _now(now),
    )


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ConfigError("appraisal time: now must be an aware datetime (UTC)")
    return now


def _replay_uncached(
    log: bytes | EventLog, quoted: Mapping[str, Mapping[int, bytes]]
) -> ReplayedLog:
    parsed = log if isinstance(log, EventLog) else EventLog.parse(log)
    return parsed.verify(quoted)


_Replayer = Callable[[bytes | EventLog, Mapping[str, Mapping[int, bytes]]], ReplayedLog]


def _step1(
    evidence: Evidence, policy: _Compiled, nonce: bytes, ak: Public, require_ak_attributes: bool
) -> VerifiedQuote | AppraisalResult:
    try:
        return verify_quote(
            ak,
            evidence.attest,
            evidence.signature,
            evidence.pcrs,
            nonce,
            require_ak_attributes=require_ak_attributes,
        )
    except VerificationError as exc:
        return _failed_before_policy(policy, exc.check, str(exc), INSTANCE_IDENTITY, None)


_PHASED_PCR = 11


def _replayed_pcrs(
    policy: Policy, quoted: Mapping[str, Mapping[int, bytes]]
) -> Mapping[str, Mapping[int, bytes]]:
    """The quoted PCRs the log must replay to. PCR 11 (issue 20): systemd-pcrphase extends
    it after ExitBootServices(), so the firmware log holds only the stub's part and never
    replays to a quote of a booted machine. A policy that pins PCR 11 in a bank by literal
    values (a UKI's predicted phases) appraises it from the quote alone: it is left out of
    that bank's replay, so none of its events is trusted (no rule reads them)."""
    pinned = [b for b, p in (policy.pcrs or {}).items() if _PHASED_PCR in p]
    if not pinned:
        return quoted
    return {
        bank: ({i: v for i, v in values.items() if i != _PHASED_PCR} if bank in pinned else values)
        for bank, values in quoted.items()
    }


def _steps_2_3(
    log: bytes | EventLog | None,
    policy: _Compiled,
    quoted: Mapping[str, Mapping[int, bytes]],
    summary: QuoteSummary,
    replay: _Replayer,
    now: datetime,
) -> AppraisalResult:
    covered: Mapping[str, frozenset[int]] = {}
    events: ReplayedLog | tuple[()] = ()
    warnings: list[str] = []
    replayed: ReplayedLog | None = None
    # step 2
    if log is not None:
        try:
            replayed = replay(log, _replayed_pcrs(policy.policy, quoted))
        except ReplayMismatchError as exc:  # its own finding: incomplete log or forged event
            where = None if exc.event is None else EventRef(*exc.event)
            return _failed_before_policy(
                policy,
                exc.finding,
                f"{exc.explanation}: {exc.message}",
                EXECUTABLES,
                summary,
                expected="a log that replays to the quoted PCRs",
                event=where,
            )
        except VerificationError as exc:
            return _failed_before_policy(policy, exc.check, str(exc), EXECUTABLES, summary)
        events = replayed
        covered = replayed.verified
        warnings.extend(replayed.warnings)
    else:
        warnings.append("no event log: only literal PCR rules can pass")
    # step 3
    return _evaluate(
        policy,
        BootEvidence(events, quoted, covered, now),
        Ar4si.TRUSTWORTHY_INSTANCE,
        warnings,
        summary,
        replayed,
    )


def _appraise(
    evidence: Evidence,
    policy: _Compiled,
    nonce: bytes,
    ak: Public,
    require_ak_attributes: bool,
    replay: _Replayer,
    now: datetime,
) -> AppraisalResult:
    quote = _step1(evidence, policy, nonce, ak, require_ak_attributes)
    if isinstance(quote, AppraisalResult):
        return quote
    summary = QuoteSummary.of(quote)
    return _steps_2_3(evidence.eventlog, policy, quote.pcrs.values, summary, replay, now)


def _log_key(log: bytes | EventLog | None, quoted: Mapping[str, Mapping[int, bytes]]) -> bytes:
    """SHA-256 over the log bytes and the quoted PCR values: what steps 2-3 depend on."""
    h = hashlib.sha256(b"none" if log is None else log.raw if isinstance(log, EventLog) else log)
    for bank in sorted(quoted):
        for index, value in sorted(quoted[bank].items()):
            h.update(f"|{bank}:{index}=".encode())
            h.update(value)
    return h.digest()


class Appraiser:
    """:func:`appraise` with two bounded caches, for a verifier that sees the same boots.

    1. Replayed logs keyed by SHA-256 over (log bytes, quoted PCR values):
       ``EventLog.verify`` is a pure function of those, so a hit returns the
       very ReplayedLog a fresh parse would give. A fleet booting one image
       sends byte-identical logs; the quote (signature, nonce, PCR digest)
       is still verified on every call.
    2. Compiled policies (rule tree, id) per Policy object (held, so its id stays unique).
    3. The outcome of steps 2-3 keyed by (log key, policy id, window): replay and
       rules are pure functions of the log bytes, the quoted PCR values, the policy
       and, through ``valid_until``, the time; "window" is how many of the policy's
       expiries have passed at ``now``, all the time changes about the outcome. The
       result is returned with this quote's clock/firmware. Step 1 (AK attributes,
       signature, magic, type, nonce, pcrSelect, pcrDigest) runs on every call.

    Thread-safe; no state is shared between instances.
    """

    def __init__(self, *, log_cache_size: int = 256, policy_cache_size: int = 64) -> None:
        self._logs: OrderedDict[bytes, ReplayedLog] = OrderedDict()
        self._outcomes: OrderedDict[tuple[bytes, str, int], AppraisalResult] = OrderedDict()
        self._policies: dict[int, _Compiled] = {}
        self._log_cache_size = log_cache_size
        self._policy_cache_size = policy_cache_size
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _compiled(self, policy: Policy) -> _Compiled:
        key = id(policy)
        with self._lock:
            hit = self._policies.get(key)
        if hit is not None and hit.policy is policy:
            return hit
        compiled = _Compiled.of(policy)
        with self._lock:
            if len(self._policies) >= self._policy_cache_size:
                self._policies.clear()
            self._policies[key] = compiled
        return compiled

    def _replay(
        self, log: bytes | EventLog, quoted: Mapping[str, Mapping[int, bytes]]
    ) -> ReplayedLog:
        key = _log_key(log, quoted)
        with self._lock:
            hit = self._logs.get(key)
            if hit is not None:
                self._logs.move_to_end(key)
                return hit
        replayed = _replay_uncached(log, quoted)  # raises on mismatch: failures are not cached
        with self._lock:
            self._logs[key] = replayed
            while len(self._logs) > self._log_cache_size:
                self._logs.popitem(last=False)
        return replayed

    def appraise(
        self,
        evidence: Evidence,
        policy: Policy,
        *,
        nonce: bytes,
        ak: Public,
        require_ak_attributes: bool = True,
        now: datetime | None = None,
    ) -> AppraisalResult:
        """As :func:`appraise`; the same result, from the caches where they hold it."""
        at = _now(now)
        compiled = self._compiled(policy)
        quote = _step1(evidence, compiled, nonce, ak, require_ak_attributes)
        if isinstance(quote, AppraisalResult):
            return quote
        summary = QuoteSummary.of(quote)
        quoted = quote.pcrs.values
        window = bisect.bisect_right(policy.expiries, at)
        key = (_log_key(evidence.eventlog, quoted), compiled.policy_id, window)
        with self._lock:
            hit = self._outcomes.get(key)
            if hit is not None:
                self._outcomes.move_to_end(key)
                self.hits += 1
        if hit is not None:
            return dataclasses.replace(hit, quote=summary)
        result = _steps_2_3(evidence.eventlog, compiled, quoted, summary, self._replay, at)
        with self._lock:
            self.misses += 1
            self._outcomes[key] = result
            while len(self._outcomes) > self._log_cache_size:
                self._outcomes.popitem(last=False)
        return result


def appraise_log(
    log: bytes | EventLog, policy: Policy, *, now: datetime | None = None
) -> AppraisalResult:
    """Policy over a log alone (`vtpm policy check`): the log is replayed to itself.

    Proves nothing about any machine (no quote): it answers "would this boot
    satisfy the policy?". Literal PCR rules compare with the replayed values.
    ``instance-identity`` is left without a claim.
    """
    parsed = log if isinstance(log, EventLog) else EventLog.parse(log)
    replayed = parsed.verify(parsed.replay())
    warnings = ["offline check: no quote proves this log came from a TPM", *replayed.warnings]
    evidence = BootEvidence(replayed, replayed.pcrs, replayed.verified, _now(now))
    return _evaluate(_Compiled.of(policy), evidence, Ar4si.NO_CLAIM, warnings, None, replayed)
