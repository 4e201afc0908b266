"""What the soak proves afterwards, from the database and the clients' logs.

Each check returns counts (printed) and problems (each a sentence; the soak
fails on any):

- :func:`check_answers`: every answer was a success, a 4xx problem body to a
  bad request, or a clear retriable error (503 ``unavailable`` with
  ``Retry-After``, a refused or dropped connection) while a fault was on (a
  dropped connection with no fault on is counted apart: keep-alive's race);
  never a 500, another 5xx, a timeout, a traceback, a 4xx to a good request or
  a success to a bad one. Each fault's recovery: the first accepted evidence
  through every verifier it hit, after it ended.
- :func:`check_database`: every used nonce has exactly one result and no nonce
  two; every result is one a client sent evidence for (answered 200 with that
  result's id, or cut off by a fault); the history (``attester_transitions``)
  holds exactly the state changes the results and the sweeper's transitions
  make, once each; each attester's state, latest result and latest evidence
  are its last.
- :func:`check_server_logs`: no traceback and no internal error in any
  verifier's log.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy

from tests.soak._clients import Answer

__all__ = [
    "Fault",
    "Findings",
    "check_answers",
    "check_database",
    "check_server_logs",
    "retriable",
]

# how long after a fault's recovery a late retriable answer still belongs to it
GRACE_S = 2.0
# a fault must be over (first accepted evidence through each verifier it hit) within this
RECOVERY_LIMIT_S = 20.0
_TRUSTED = frozenset({"affirming", "warning"})


@dataclass
class Fault:
    """One injected fault: ``targets`` are the verifier indices it hit; ``t_end`` when the
    driver's action was over (the worker killed, the verifier serving again, PostgreSQL
    accepting connections, the disk freed). ``recovered``: seconds from ``t_end`` to the
    first accepted evidence through each target (filled by :func:`check_answers`)."""

    kind: str
    targets: tuple[int, ...]
    t_start: float
    t_end: float
    detail: str = ""
    recovered: dict[int, float] = field(default_factory=dict)

    def window_end(self) -> float:
        return self.t_end + max(self.recovered.values(), default=RECOVERY_LIMIT_S) + GRACE_S


@dataclass
class Findings:
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def problem(self, text: str, limit: int = 25) -> None:
        if len(self.problems) < limit:
            self.problems.append(text)
        elif len(self.problems) == limit:
            self.problems.append("... more problems left out")

    def merge(self, other: Findings, prefix: str = "") -> None:
        for k, v in other.counts.items():
            self.add(prefix + k, v)
        for p in other.problems:
            self.problem(prefix + p)


def retriable(a: Answer) -> bool:
    """A clear retriable error: 503 unavailable with Retry-After, or the connection."""
    if a.outcome in ("refused", "dropped"):
        return True
    return (
        a.outcome == "503"
        and a.problem == "unavailable"
        and a.retry_after is not None
        and a.content_type == "application/problem+json"
        and not a.traceback
    )


def _in_fault(a: Answer, faults: Sequence[Fault]) -> bool:
    return any(a.t1 >= f.t_start and a.t0 <= f.window_end() for f in faults)


def _recoveries(answers: Sequence[Answer], faults: Sequence[Fault], out: Findings) -> None:
    accepted = sorted(
        (a for a in answers if a.kind == "good" and a.case == "evidence" and a.outcome == "200"),
        key=lambda a: a.t0,
    )
    for f in faults:
        for v in f.targets:
            first = next((a for a in accepted if a.verifier == v and a.t0 >= f.t_end), None)
            took = None if first is None else first.t1 - f.t_end
            if took is None or took > RECOVERY_LIMIT_S:
                out.problem(
                    f"{f.kind} ({f.detail}) at {f.t_start:.1f} s: verifier {v} accepted no "
                    f"evidence within {RECOVERY_LIMIT_S:.0f} s after it ended"
                )
            else:
                f.recovered[v] = took


def _group(a: Answer) -> str:
    """The counts' key: a good client's by route (reads together), a bad one's by kind."""
    if a.kind != "good":
        return a.kind
    return "good " + ("read" if a.case.startswith("read") else a.case)


def check_answers(answers: Sequence[Answer], faults: Sequence[Fault]) -> Findings:
    """See the module docstring. Fills each fault's ``recovered``. Problems of one kind
    (client kind, case, what went wrong) are reported once, with their number."""
    out = Findings()
    _recoveries(answers, faults, out)
    seen: dict[str, int] = {}
    wrong: dict[tuple[str, str, str], list[str]] = collections.defaultdict(list)
    for a in answers:
        group = _group(a)
        out.add(f"{group} requests")
        status = a.status
        where = f"{a.client} -> verifier {a.verifier} at {a.t0:.2f} s"
        if status is not None and 200 <= status < 300:
            out.add(f"{group} {status}")
            if a.expect != "success":
                wrong[(a.kind, a.case, f"a bad request accepted ({status})")].append(where)
            if a.kind == "good" and a.case == "evidence" and a.nonce is not None:
                if a.nonce in seen:
                    out.problem(f"{where}: nonce {a.nonce[:16]} accepted twice")
                seen[a.nonce] = a.result_id or 0
        elif status is not None and 400 <= status < 500 and a.expect == "4xx":
            out.add(f"{group} {status}")
            if a.content_type != "application/problem+json" or not a.problem or a.traceback:
                wrong[(a.kind, a.case, f"{status} without a problem body")].append(where)
        elif retriable(a):
            key = "503" if a.outcome == "503" else a.outcome
            out.add(f"{group} retriable {key}")
            if _in_fault(a, faults):
                pass
            elif a.outcome == "dropped":
                # HTTP/1.1's keep-alive race (RFC 9112, 9.3.1): the client reused an idle
                # connection just as the server's keep-alive timer (gunicorn: 2 s) closed
                # it. Retriable, the service's fault only in timing: counted, not failed
                out.add(f"{group} dropped with no fault on (keep-alive race)")
            else:
                wrong[(a.kind, a.case, f"{key} with no fault on")].append(f"{where}: {a.detail}")
        else:
            out.add(f"{group} BAD {a.outcome}")
            what = f"{a.outcome} {a.problem or ''}".rstrip()
            wrong[(a.kind, a.case, what)].append(f"{where}: {a.detail}")
    for (kind, case, what), examples in sorted(wrong.items()):
        out.problem(f"{len(examples)} x {kind} {case}: {what}; first: {examples[0]}")
    for f in faults:
        out.add(f"faults {f.kind}")
    return out


def _rows(conn: sqlalchemy.Connection, sql: str) -> list[Any]:
    return list(conn.execute(sqlalchemy.text(sql)).all())


def _at(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=None) if value.tzinfo is None else value


def check_database(url: str, answers: Sequence[Answer]) -> Findings:
    """See the module docstring; ``answers``: every client's, of this database's run."""
    out = Findings()
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            results = _rows(conn, "SELECT id, attester_id, nonce, status, created_at FROM results")
            nonces = _rows(conn, "SELECT nonce, attester_id, used FROM nonces")
            transitions = _rows(
                conn,
                "SELECT id, attester_id, from_state, to_state, at, result_id FROM"
                " attester_transitions",
            )
            attesters = _rows(
                conn,
                "SELECT id, state, latest_result_id FROM attesters WHERE activated_at IS NOT NULL",
            )
            latest = dict(_rows(conn, "SELECT attester_id, result_id FROM latest_evidence"))
    finally:
        engine.dispose()
    out.add("results", len(results))
    out.add("nonces issued (not purged)", len(nonces))
    out.add("nonces used", sum(1 for n in nonces if n.used))
    out.add("transitions", len(transitions))
    out.add("attesters", len(attesters))

    # 1. a nonce accepted once at most; every used nonce has its one result
    by_nonce: dict[str, list[Any]] = collections.defaultdict(list)
    for r in results:
        by_nonce[r.nonce].append(r)
    for nonce, rows in by_nonce.items():
        if len(rows) > 1:
            out.problem(f"nonce {nonce[:16]} has {len(rows)} results: {[r.id for r in rows]}")
    for n in nonces:
        rows = by_nonce.get(n.nonce, [])
        if n.used and len(rows) != 1:
            out.problem(f"used nonce {n.nonce[:16]} has {len(rows)} results")
        if not n.used and rows:
            out.problem(f"nonce {n.nonce[:16]} is unused but has result {rows[0].id}")
        if rows and rows[0].attester_id != n.attester_id:
            out.problem(f"result {rows[0].id} belongs to another attester than its nonce")

    # 2. every result answers evidence a client sent; every 200 is a stored result
    sent: dict[str, list[Answer]] = collections.defaultdict(list)
    for a in answers:
        if a.case in ("evidence", "accepted-again") and a.nonce is not None:
            sent[a.nonce].append(a)
    for r in results:
        tries = [a for a in sent.get(r.nonce, []) if a.kind == "good"]
        ok = [a for a in tries if a.outcome == "200"]
        if ok:
            if ok[0].result_id != r.id:
                out.problem(f"result {r.id}: the client was told {ok[0].result_id}")
            continue
        if any(a.outcome in ("refused", "dropped", "503", "timeout") for a in tries):
            out.add("results committed, answer lost to a fault")
        else:
            out.problem(f"result {r.id} (nonce {r.nonce[:16]}) answers no evidence a client sent")
    stored = {r.id: r for r in results}
    for a in answers:
        if a.kind == "good" and a.case == "evidence" and a.outcome == "200":
            r = stored.get(a.result_id or -1)
            if r is None or r.nonce != a.nonce or r.attester_id != a.attester_id:
                out.problem(f"{a.client}: accepted result {a.result_id} is not stored as answered")

    # 3. the history: exactly the state changes, once each
    _check_history(results, transitions, attesters, latest, out)
    return out


def _check_history(
    results: Iterable[Any],
    transitions: Iterable[Any],
    attesters: Iterable[Any],
    latest: dict[str, int],
    out: Findings,
) -> None:
    by_result: dict[int, list[Any]] = collections.defaultdict(list)
    events: dict[str, list[tuple[datetime, int, int, Any]]] = collections.defaultdict(list)
    for t in transitions:
        if t.result_id is not None:
            by_result[int(t.result_id)].append(t)
        else:  # the sweeper's (stale) or a fault report's: ordered among the results by time
            events[t.attester_id].append((_at(t.at), 1, int(t.id), t))
    for r in results:
        events[r.attester_id].append((_at(r.created_at), 0, int(r.id), r))
    for rid, ts in by_result.items():
        if len(ts) > 1:
            out.problem(f"result {rid} has {len(ts)} transitions")
    result_ids = {int(r.id) for r in results}
    for rid in by_result:
        if rid not in result_ids:
            out.problem(f"transition for result {rid}, which does not exist")
    for a in attesters:
        state, last = "unknown", None
        for _when, kind, _id, row in sorted(events.get(a.id, [])):
            if kind == 1:
                if row.from_state != state:
                    out.problem(f"{a.id}: transition {row.id} from {row.from_state}, was {state}")
                state = row.to_state
                continue
            last = int(row.id)
            new = "trusted" if row.status in _TRUSTED else "failed"
            made = by_result.get(last, [])
            if new != state:
                if not made:
                    out.problem(f"{a.id}: result {last} changed {state} -> {new}, not recorded")
                elif (made[0].from_state, made[0].to_state) != (state, new):
                    out.problem(f"{a.id}: result {last} recorded as another transition")
                else:
                    out.add("transitions checked")
                state = new
            elif made:
                out.problem(f"{a.id}: result {last} changed nothing but has a transition")
        if a.state != state:
            out.problem(f"{a.id}: state {a.state}, its history says {state}")
        if last is not None and (a.latest_result_id != last or latest.get(a.id) != last):
            out.problem(
                f"{a.id}: latest result {a.latest_result_id}, latest evidence "
                f"{latest.get(a.id)}, its last result {last}"
            )


def check_server_logs(paths: Iterable[Path]) -> Findings:
    out = Findings()
    for path in paths:
        text = path.read_text(errors="replace")
        out.add("server log lines", text.count("\n"))
        out.add("server 503 lines", text.count("database unavailable while serving"))
        for needle in ("Traceback", "internal error while serving"):
            n = text.count(needle)
            if n:
                out.add(f"server {needle}", n)
                at = text.index(needle)
                out.problem(f"{path.name}: {n} x {needle!r}: {text[at : at + 1500]}")
    return out
