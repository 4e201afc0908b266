"""`vtpm agent`: the attester as one long-running process in the guest (issue 16).

It registers once (EK certificate from NV, the AK a primary key derived from
the endorsement seed, so the same AK comes back after any restart without a
key blob on disk; see :mod:`verifier.attester`), activates, keeps the attester
id and token in its state file, then attests on the cadence the verifier
answers with (``next_attestation_s``, 60 s until the first answer).

Faults:

- The verifier unreachable or answering 5xx/429: capped exponential backoff
  with jitter (``uniform(d/2, d)``, ``d = min(cap, base * 2**n)``, never below
  ``min_delay_s``), then the next round resumes with the same id and token:
  no re-registration.
- The TPM failing or the event log unreadable: the agent logs one line naming
  the fault and reports the first of a run of faults to the verifier
  (``POST /v1/attesters/{id}/faults``, kind ``tpm`` or ``event_log``), which
  marks the attester ``failed`` at once with the fault as the cause, instead
  of leaving it trusted until its deadline; after ``tpm_retries`` failed
  rounds in a row it exits 1 (systemd restarts it slowly, see
  contrib/systemd/vtpm-agent.service). A report that cannot be delivered is
  logged and not retried: the attester then goes ``stale`` at its deadline.
- A 4xx answer (token revoked, attester deleted, evidence refused) is not
  retried as an outage: the round counts as failed and is logged with the
  verifier's detail.

Where the evidence comes from is the agent's *backend* (:class:`AttesterBackend`):
:class:`TctiBackend`, a TPM through a TCTI (swtpm, ``/dev/tpmrm0``) with tpm2-pytss,
or :class:`verifier.guest_attester.GuestBackend`, a booted VM's TPM driven over its
serial channel (``vtpm vm boot --verifier URL --rounds N``). The loop above is the
same code for both.

The event log is sent on every round: the verifier appraises each evidence on
its own (the policy's boot-event rules need the log each time), so a
quote-only round would fail a policy. The IMA list (issue 14, ``ima_list``)
is not: :meth:`Agent.ima_delta` gives only the entries after those the
verifier has verified (the challenge's ``ima.next_index``), reading the list
from where the last round's delta began or ended (:class:`ImaListFile`). An
unreadable list is a fault of kind ``ima_list``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests

from verifier.attester import (
    AttesterState,
    ImaListError,
    ImaListFile,
    ImaSource,
    TpmAttester,
    VerifierError,
    attest_once,
    enroll,
)
from vtpm_core.errors import ConfigError, TpmError, VtpmTrustError

__all__ = [
    "Agent",
    "AgentConfig",
    "AttesterBackend",
    "AttesterSession",
    "Backoff",
    "RoundOutcome",
    "TctiBackend",
]

LOG = logging.getLogger("vtpm.agent")


class EventLogError(TpmError):
    """The firmware event log could not be read (reported as kind ``event_log``)."""


DEFAULT_CADENCE_S = 60.0
TRUSTED = frozenset({"affirming", "warning"})


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent needs (parsed by :mod:`verifier.agent_config`)."""

    url: str
    tcti: str
    state_file: Path | None  # None: the attester state lives in memory (a VM's boot)
    ca_bundle: Path | None = None
    token: str | None = None
    attester_id: str | None = None
    event_log: Path | None = None
    vm_id: str | None = None
    ima_list: Path | None = None  # the IMA list whose deltas go with evidence (None: none)
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    min_delay_s: float = 0.2
    tpm_retries: int = 3


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter; ``reset`` after a success."""

    base_s: float
    cap_s: float
    floor_s: float
    rng: random.Random
    failures: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        return max(self.floor_s, self.rng.uniform(ceiling / 2, ceiling))

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """One round: the verdict (``None`` when no evidence was appraised) and why not."""

    status: str | None
    state: str | None
    next_s: float
    fault: str | None = None  # "verifier" (retry with backoff), "tpm", "refused"
    fault_kind: str | None = None  # a "tpm" fault's: "tpm", "event_log" or "ima_list"
    detail: str | None = None

    @property
    def trusted(self) -> bool:
        return self.status in TRUSTED


class AttesterSession(Protocol):
    """One round's access to the attesting TPM (see :class:`AttesterBackend`)."""

    def enroll(
        self, http: requests.Session, verifier: str, *, vm_id: str | None = None
    ) -> AttesterState:
        """Register and activate; the new attester's state."""
        ...

    def attest(self, http: requests.Session, state: AttesterState) -> dict[str, Any]:
        """Challenge -> quote -> evidence (with the event log); the verifier's answer.

        Raises VerifierError for the verifier's refusals and outages, EventLogError
        for an unreadable log, TpmError (or the TSS's own exception) for the TPM."""
        ...


class AttesterBackend(Protocol):
    """Where evidence comes from: ``open()`` gives one round its :class:`AttesterSession`."""

    def open(self) -> AbstractContextManager[AttesterSession]: ...


class _TctiSession:
    def __init__(self, tpm: TpmAttester, event_log: Path | None, ima: ImaSource | None) -> None:
        self._tpm = tpm
        self._event_log = event_log
        self._ima = ima

    def enroll(
        self, http: requests.Session, verifier: str, *, vm_id: str | None = None
    ) -> AttesterState:
        return enroll(http, verifier, self._tpm, vm_id=vm_id)

    def attest(self, http: requests.Session, state: AttesterState) -> dict[str, Any]:
        log = None
        if self._event_log is not None:
            try:
                log = self._event_log.read_bytes()
            except OSError as exc:
                raise EventLogError(
                    f"event log {self._event_log} unreadable: {exc.strerror or exc}"
                ) from None
        return attest_once(http, state, self._tpm, log, self._ima)


@dataclass(frozen=True, slots=True)
class TctiBackend:
    """A TPM through a tpm2-tss TCTI, opened afresh each round (a TPM that went away and
    came back is picked up again), the firmware event log from a file, and ``ima``
    (``Agent.ima_delta``) for the IMA entries the verifier asks for."""

    tcti: str
    event_log: Path | None = None
    ima: ImaSource | None = None

    @contextmanager
    def open(self) -> Iterator[AttesterSession]:
        with TpmAttester.open(self.tcti) as tpm:
            yield _TctiSession(tpm, self.event_log, self.ima)


class Agent:
    """Register once, then rounds of challenge -> quote -> evidence."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        backend: AttesterBackend | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._ima = ImaListFile(config.ima_list) if config.ima_list is not None else None
        self.backend: AttesterBackend = backend or TctiBackend(
            config.tcti, config.event_log, self.ima_delta if self._ima is not None else None
        )
        self._sleep = sleep
        self._attester: AttesterState | None = None  # registered during this run
        self.backoff = Backoff(
            config.backoff_base_s, config.backoff_cap_s, config.min_delay_s, rng or random.Random()
        )
        self._http = requests.Session()
        self._http.verify = str(config.ca_bundle) if config.ca_bundle else True
        self._cadence = DEFAULT_CADENCE_S

    def close(self) -> None:
        self._http.close()

    @property
    def attester(self) -> AttesterState | None:
        """The attester this run registered as or resumed (None before the first round)."""
        return self._attester

    def _known(self) -> AttesterState | None:
        """The attester this agent is, if known: configured, registered in this run, or
        in the state file (for this verifier)."""
        url = self.config.url
        if self.config.token and self.config.attester_id:
            return AttesterState(url, self.config.attester_id, self.config.token)
        if self._attester is not None and self._attester.verifier == url:
            return self._attester
        if self.config.state_file is None:
            return None
        state = AttesterState.load(self.config.state_file)
        return state if state is not None and state.verifier == url else None

    def _state(self, session: AttesterSession) -> AttesterState:
        state = self._known()
        if state is None:
            state = session.enroll(self._http, self.config.url, vm_id=self.config.vm_id)
            if self.config.state_file is not None:
                state.save(self.config.state_file)
            LOG.info("registered and activated as attester %s", state.attester_id)
        self._attester = state
        return state

    def report_fault(self, kind: str, detail: str) -> bool:
        """Tell the verifier this attester cannot produce evidence; True when it heard.
        Needs the attester's id and token (none before the first registration)."""
        state = self._known()
        if state is None:
            return False
        try:
            resp = self._http.post(
                f"{self.config.url.rstrip('/')}/v1/attesters/{state.attester_id}/faults",
                json={"kind": kind, "detail": detail[:500]},
                headers={"Authorization": f"Bearer {state.token}"},
                timeout=10,
            )
        except requests.RequestException as exc:
            LOG.warning("fault not reported, verifier unreachable: %s", exc)
            return False
        if resp.status_code != 200:
            LOG.warning("fault not reported: verifier answered %d", resp.status_code)
            return False
        LOG.info("reported %s fault to the verifier (state failed)", kind)
        return True

    def ima_delta(self, start: int, boot: tuple[int, int]) -> bytes:
        """The IMA entries from ``start`` on (the verifier's ``next_index``) in the boot
        ``boot`` (the quote's resetCount, restartCount), read from the offsets of the
        last round's delta; b"" without an IMA list."""
        return b"" if self._ima is None else self._ima.delta(start, boot)

    def round(self) -> RoundOutcome:
        """One attestation; faults become an outcome, never an exception."""
        try:
            with self.backend.open() as session:
                state = self._state(session)
                result = session.attest(self._http, state)
        except VerifierError as exc:
            outage = exc.status == 0 or exc.status >= 500 or exc.status == 429
            LOG.warning("verifier %s: %s", self.config.url, exc.detail)
            return RoundOutcome(None, None, self._cadence, "verifier" if outage else "refused")
        except ConfigError:
            raise
        except EventLogError as exc:
            LOG.error("TPM fault, no evidence sent: %s", exc)
            return RoundOutcome(None, None, self._cadence, "tpm", "event_log", str(exc))
        except ImaListError as exc:
            LOG.error("IMA list fault, no evidence sent: %s", exc)
            return RoundOutcome(None, None, self._cadence, "tpm", "ima_list", str(exc))
        except VtpmTrustError as exc:  # TpmError, a malformed challenge
            LOG.error("TPM fault, no evidence sent: %s", exc)
            return RoundOutcome(None, None, self._cadence, "tpm", "tpm", str(exc))
        except Exception as exc:  # tpm2-pytss raises its own TSS2_Exception mid-command
            LOG.error("TPM fault, no evidence sent: %s", exc)
            return RoundOutcome(None, None, self._cadence, "tpm", "tpm", str(exc))
        self._cadence = _cadence(result)
        LOG.info(
            "attester %s: %s (state %s), next in %.0f s",
            state.attester_id,
            result.get("status"),
            result.get("state"),
            self._cadence,
        )
        return RoundOutcome(str(result.get("status")), _opt_str(result.get("state")), self._cadence)

    def once(self, *, outage_attempts: int = 5) -> RoundOutcome:
        """``--once``: one appraised round, riding out a short outage (bounded attempts);
        a TPM fault is reported to the verifier, as in :meth:`run`."""
        outcome = self.round()
        for _ in range(outage_attempts - 1):
            if outcome.fault != "verifier":
                break
            self._sleep(self.backoff.next_delay())
            outcome = self.round()
        if outcome.fault == "tpm":
            self.report_fault(outcome.fault_kind or "tpm", outcome.detail or "")
        return outcome

    def run(
        self,
        *,
        rounds: int | None = None,
        on_round: Callable[[RoundOutcome], None] | None = None,
    ) -> int:
        """Attest until stopped (or ``rounds`` appraised); the exit status on a TPM give-up.
        ``on_round`` sees every round's outcome (faults included). No sleep follows the
        last of ``rounds``."""
        tpm_faults = 0
        done = 0
        while rounds is None or done < rounds:
            outcome = self.round()
            if on_round is not None:
                on_round(outcome)
            if outcome.fault == "verifier":
                delay = self.backoff.next_delay()
                LOG.info("retrying in %.1f s (attempt %d)", delay, self.backoff.failures)
                self._sleep(delay)
                continue
            self.backoff.reset()
            if outcome.fault == "tpm":
                tpm_faults += 1
                if tpm_faults == 1:  # once per run of faults, not once per retry
                    self.report_fault(outcome.fault_kind or "tpm", outcome.detail or "")
                if tpm_faults >= self.config.tpm_retries:
                    LOG.error("giving up after %d TPM faults in a row", tpm_faults)
                    return 1
                self._sleep(max(self.config.min_delay_s, min(outcome.next_s, 30.0)))
                continue
            tpm_faults = 0
            done += 1
            if rounds is None or done < rounds:
                self._sleep(max(self.config.min_delay_s, outcome.next_s))
        return 0


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _cadence(result: dict[str, Any]) -> float:
    value = result.get("next_attestation_s")
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return DEFAULT_CADENCE_S
