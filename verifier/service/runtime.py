"""The runtime (IMA) part of an evidence's appraisal, incremental per attester and boot.

Issue 14 "Incremental appraisal". The evidence carries the IMA entries after
the ones already verified (``EvidenceRequest.ima``); the service keeps, per
attester, an :class:`~verifier.service.ports.ImaState` (table ``ima_state``).
Only a quote whose signature, nonce and PCR digest verified gets here, so
the PCR values it selects are the TPM's.

Steps (``appraise_runtime``):
  1. PCR 10 must be in the quote's selection: it is what binds the list to the
     TPM (every quoted bank is replayed);
  2. the boot: the quote's (resetCount, restartCount) equal to the stored
     ones continue the stored list; higher ones are a new boot whose list
     starts at entry 0 from zeros; lower ones are refused (a reverted
     snapshot or a cloned vTPM);
  3. the delta must start where the verified list stands (else ConflictError,
     a 409 naming the index to send from: nothing is recorded, the nonce is
     not used up);
  4. parse (ParseError: a 400 naming the entry index and byte offset; a
     forged template hash is a failure), extend onto the stored PCR 10 values
     until they equal the quoted ones (``verifier.ima.appraise.advance``: a
     gap, a reordering or a replayed suffix never gets there), appraise the
     proven entries under the runtime policy;
  5. the new state, to store only if every proven entry passed.

What it does not check: the boot part (verifier.appraisal) and the
single-use nonce and lineage marks (services.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from verifier.ear import Ar4si
from verifier.ima.appraise import BANK_SIZES, IMA_PCR, EntryFailure, ImaProgress, advance
from verifier.ima.boot_aggregate import boot_aggregates
from verifier.ima.limits import ImaLimits
from verifier.ima.parse import parse_list
from verifier.ima.policy import RuntimePolicy
from verifier.ima.replay import ExtendMode, extend_values
from verifier.policy.rules import EXECUTABLES
from verifier.service.messages import EvidenceRequest
from verifier.service.ports import ClockInfo, ImaState
from vtpm_core.errors import ConflictError, VerificationError
from vtpm_core.tpm import Attest, QuoteInfo

__all__ = ["MAX_NAMED_FAILURES", "RuntimeOutcome", "appraise_runtime"]

# Every failing entry is named up to here (each costs ~300 bytes in the result and
# the EAR); past it one more failure says how many were left out.
MAX_NAMED_FAILURES = 1000


@dataclass(slots=True)
class RuntimeOutcome:
    """The runtime part: failures and warnings for the result, its ``ima`` report
    section, the AR4SI executables code it implies (None: no change) and the state
    to store (None: keep the stored one)."""

    report: dict[str, Any]
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    executables: int | None = None
    state: ImaState | None = None


def _failure(check: str, message: str, expected: str, actual: str) -> dict[str, Any]:
    return {
        "rule": check,
        "claim": EXECUTABLES,
        "message": message,
        "expected": expected,
        "actual": actual,
        "event": None,
    }


def _entry_failure(f: EntryFailure) -> dict[str, Any]:
    return {
        "rule": "ima.entry",
        "claim": EXECUTABLES,
        "message": str(f),
        "expected": ", ".join(f.expected) if f.expected else None,
        "actual": f.actual,
        "event": None,
        "entry": f.to_json(),
    }


def _refused(report: dict[str, Any], failure: dict[str, Any], code: int) -> RuntimeOutcome:
    report["appraised"] = False
    report["failure"] = failure["message"]
    return RuntimeOutcome(report, [failure], executables=code)


def appraise_runtime(
    runtime: RuntimePolicy,
    attest: Attest,
    evidence: EvidenceRequest,
    clock: ClockInfo,
    stored: ImaState | None,
    limits: ImaLimits,
) -> RuntimeOutcome:
    """Steps 1-5 for one evidence whose quote verified (see the module docstring)."""
    assert isinstance(attest.attested, QuoteInfo)
    selected = attest.attested.pcr_select.as_sets()
    boot = (clock.reset_count, clock.restart_count)
    report: dict[str, Any] = {
        "runtime_policy_id": runtime.id,
        "boot": {"reset_count": boot[0], "restart_count": boot[1]},
    }
    # 1
    banks = sorted(b for b, pcrs in selected.items() if IMA_PCR in pcrs and b in BANK_SIZES)
    quoted = {b: evidence.pcrs.get(b, {}).get(IMA_PCR) for b in banks}
    if not banks or any(v is None for v in quoted.values()):
        shown = "+".join(
            f"{b}:{','.join(map(str, sorted(p)))}" for b, p in sorted(selected.items())
        )
        return _refused(
            report,
            _failure(
                "ima.pcr10",
                "the quote does not cover PCR 10: the IMA list cannot be bound to the TPM",
                "PCR 10 in the quote's selection",
                shown or "no PCRs",
            ),
            Ar4si.UNEXPECTED_EVIDENCE,
        )
    pcr10 = {b: v for b, v in quoted.items() if v is not None}
    # 2
    state: ImaProgress | None = None
    if stored is not None:
        old = (stored.reset_count, stored.restart_count)
        if boot < old:
            return _refused(
                report,
                _failure(
                    "ima.boot",
                    f"the quote's resetCount/restartCount {boot[0]}/{boot[1]} are below the "
                    f"{old[0]}/{old[1]} of the verified IMA list: a reverted snapshot "
                    "or a cloned vTPM",
                    f">= {old[0]}/{old[1]}",
                    f"{boot[0]}/{boot[1]}",
                ),
                Ar4si.CRYPTO_VALIDATION_FAILED,
            )
        if boot == old:
            state = ImaProgress.parse(stored.progress)
    report["new_boot"] = state is None
    expected = 0 if state is None else state.resume_index(boot[0], runtime, banks)
    # 3
    delta = evidence.ima
    start = expected if delta is None else delta.start_index
    if start != expected:
        why = (
            "this boot's list (or the runtime policy, or the PCR 10 banks) is new"
            if expected == 0
            else "the entries before it are verified"
        )
        raise ConflictError(
            f"ima.start_index: the IMA delta starts at entry {start}, the verified list "
            f"stands at entry {expected} ({why}): send the entries from {expected}"
        )
    # 4
    try:
        entries = (
            () if delta is None else parse_list(delta.entries, offset_index=start, limits=limits)
        )
    except VerificationError as exc:  # a template hash that does not match: forged
        return _refused(
            report,
            _failure(exc.check, exc.message, "entries as the kernel measured them", "forged"),
            Ar4si.CRYPTO_VALIDATION_FAILED,
        )
    mode = ExtendMode(delta.extend) if delta is not None else ExtendMode.PER_BANK
    quoted_all = {
        b: {i: evidence.pcrs[b][i] for i in pcrs if i in evidence.pcrs.get(b, {})}
        for b, pcrs in selected.items()
    }
    try:
        step = advance(
            state,
            reset_count=boot[0],
            start_index=start,
            entries=entries,
            quoted_pcr10=pcr10,
            policy=runtime,
            extend_values=extend_values(mode, banks),
            boot_aggregates=boot_aggregates(quoted_all),
        )
    except VerificationError as exc:
        report.update(start_index=start, received=len(entries), next_index=expected)
        return _refused(
            report,
            _failure(
                exc.check,
                exc.message,
                f"entries from {start} that extend PCR 10 to the quoted value",
                f"{len(entries)} entries that do not",
            ),
            Ar4si.CRYPTO_VALIDATION_FAILED,
        )
    appraisal = step.appraisal
    failures = [_entry_failure(f) for f in appraisal.failures[:MAX_NAMED_FAILURES]]
    left_out = len(appraisal.failures) - len(failures)
    if left_out > 0:
        failures.append(
            _failure(
                "ima.entry",
                f"{left_out} more entries fail (the first {MAX_NAMED_FAILURES} are named)",
                "entries the runtime policy allows",
                f"{len(appraisal.failures)} that it does not",
            )
        )
    # 5
    next_index = step.state.count if step.ok else expected
    report.update(
        appraised=True,
        start_index=start,
        received=len(entries),
        proven=step.proven,
        pending=step.pending,
        verified_count=next_index,
        next_index=next_index,
        pcr10={b: v.hex() for b, v in sorted(step.state.pcr10.items())} if step.ok else None,
        checked=appraisal.checked,
        by_digest=appraisal.by_digest,
        by_signature=appraisal.by_signature,
        excluded=appraisal.excluded,
        failures=[f["entry"] for f in failures if "entry" in f],
        failures_not_named=max(left_out, 0),
    )
    outcome = RuntimeOutcome(report, failures, [{"message": w} for w in appraisal.warnings])
    if not step.ok:
        outcome.executables = Ar4si.CONTRAINDICATED_RUNTIME
        return outcome
    outcome.executables = Ar4si.APPROVED_RUNTIME
    outcome.state = ImaState(
        reset_count=boot[0],
        restart_count=boot[1],
        entry_count=step.state.count,
        policy_digest=runtime.digest.hex(),
        progress=step.state.to_bytes(),
    )
    return outcome
