"""Faults of continuous attestation (issue 16), each short, with real components: a real
`vtpm agent` (own swtpm) at a 1 s cadence against `vtpm verifier serve` (gunicorn, 2
workers) on a private PostgreSQL database.

- the verifier's processes SIGKILLed with the agent's request in flight, restarted on
  the same port: the agent recovers by itself (same attester, no re-registration) and
  the history holds exactly the transitions that happened, once each;
- the service's PostgreSQL backends terminated (``pg_terminate_backend``, not a restart
  of the shared server): clients see 200 or a retriable 503 problem, never a 500, and
  the service and the agent carry on.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy

from tests.verifier.service.conftest import EkCa, Server, Service, make_home, provision_tpm
from tests.verifier.service.test_agent import AgentProc, once, verdicts, wait_for
from vtpm_core.swtpm import SwtpmProcess

pytestmark = [pytest.mark.swtpm, pytest.mark.postgres]


@pytest.fixture(scope="module")
def pg_service(
    tmp_path_factory: pytest.TempPathFactory, ek_ca: EkCa, pg_database: Any
) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("home-faults")
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    # deadline 1 s x 10: the outages below do not make the attester stale
    admin, reader = make_home(home, ek_ca, attest_cadence_s=1, stale_grace=10, sweep_interval_s=1)
    url = pg_database()
    server = Server(home, url, workers=2).start()
    try:
        yield Service("postgres", home, url, admin, reader, server, ek_ca)
    finally:
        server.stop()


@pytest.fixture
def agent(pg_service: Service, ek_ca: EkCa, tmp_path: Path) -> Iterator[AgentProc]:
    tpm = SwtpmProcess(provision_tpm(ek_ca, tmp_path / "tpm"))
    tpm.start()
    a = AgentProc(tmp_path, tpm, pg_service.url)
    try:
        yield a
    finally:
        a.stop()
        tpm.stop()


def children(pid: int) -> list[int]:
    """The gunicorn workers: processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def history(s: Service, aid: str) -> list[tuple[str, str]]:
    r = s.call("GET", f"/v1/attesters/{aid}/history?limit=1000", s.reader)
    assert r.status_code == 200, r.text
    return [(t["from_state"], t["to_state"]) for t in reversed(r.json()["transitions"])]


def results(s: Service, aid: str) -> int:
    r = s.call("GET", f"/v1/attesters/{aid}/results?limit=1000", s.reader)
    assert r.status_code == 200, r.text
    return len(r.json()["results"])


def test_verifier_sigkilled_mid_request_agent_recovers_history_exact(
    pg_service: Service, agent: AgentProc
) -> None:
    agent.start()
    wait_for(lambda: verdicts(agent) >= 2, 30, "two verdicts")
    aid = json.loads(agent.state_file.read_text())["attester_id"]
    server = pg_service.server
    assert server.proc is not None
    master = server.proc.pid
    workers = children(master)
    assert len(workers) == 2, workers
    # freeze every process so the agent's next round is accepted and left in flight,
    # then SIGKILL them all: no graceful shutdown, no response, open transactions cut
    for pid in (master, *workers):
        os.kill(pid, signal.SIGSTOP)
    time.sleep(1.5)
    for pid in (master, *workers):
        os.kill(pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    server.proc = None
    before = verdicts(agent)
    server.start(port=server.port)
    wait_for(lambda: verdicts(agent) >= before + 2, 40, "verdicts after the restart")
    assert agent.proc is not None and agent.proc.poll() is None  # never gave up
    assert agent.count(r"^registered") <= 1 and agent.state_file.exists()
    assert json.loads(agent.state_file.read_text())["attester_id"] == aid
    # trusted throughout (deadline 10 s): exactly the first transition, once
    assert history(pg_service, aid) == [("unknown", "trusted")]
    # every verdict the agent logged is a stored result; at most the one cut off
    # between commit and answer is stored without the agent hearing of it
    agent.stop()
    logged, stored = verdicts(agent), results(pg_service, aid)
    assert logged <= stored <= logged + 1, (logged, stored)


def terminate_backends(s: Service, *, allow: bool | None = None) -> int:
    """Cut the service's connections; ``allow``: first let it (not) connect again."""
    assert s.db_url is not None
    name = s.db_url.rsplit("/", 1)[1]
    admin = sqlalchemy.create_engine(
        s.db_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            if allow is not None:
                conn.exec_driver_sql(
                    f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}'
                )
            n = conn.execute(
                sqlalchemy.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": name},
            ).scalar_one()
    finally:
        admin.dispose()
    return int(n)


_READS = ("/v1/attesters?state=trusted", "/v1/attesters/{aid}", "/v1/attesters/{aid}/history")


def check_unavailable(r: requests.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "1"
    assert r.json()["type"] == "urn:vtpm-trust:problem:unavailable", r.text
    assert "terminat" not in r.text and "psycopg" not in r.text


def test_postgres_backends_terminated_clients_see_retriable_errors(
    pg_service: Service, agent: AgentProc
) -> None:
    agent.start()
    wait_for(lambda: verdicts(agent) >= 1, 30, "the first verdict")
    aid = json.loads(agent.state_file.read_text())["attester_id"]
    # 1. connections cut: the next request reconnects (pool pre-ping, the hot
    # path's one retry) and is answered; at worst a retriable 503, never a 500
    statuses: list[int] = []
    killed = 0
    for _ in range(5):
        killed += terminate_backends(pg_service)
        for path in (*_READS, "/metrics", "/healthz"):
            r = pg_service.call("GET", path.format(aid=aid), pg_service.reader)
            statuses.append(r.status_code)
            if r.status_code == 503:
                check_unavailable(r)
        time.sleep(0.3)
    assert killed >= 5, killed  # there were connections to cut each time
    assert set(statuses) <= {200, 503}, statuses
    # 2. the database refuses connections for a while: every route that needs it is a
    # 503 problem (no internals), the agent rides it out as an outage
    try:
        terminate_backends(pg_service, allow=False)
        for path in (*_READS, "/healthz"):
            check_unavailable(pg_service.call("GET", path.format(aid=aid), pg_service.reader))
        time.sleep(1.5)
    finally:
        terminate_backends(pg_service, allow=True)
    before = verdicts(agent)
    wait_for(lambda: verdicts(agent) >= before + 2, 30, "verdicts after the cuts")
    r = pg_service.call("GET", f"/v1/attesters/{aid}", pg_service.reader)
    assert r.status_code == 200 and r.json()["state"] == "trusted"
    # the fleet gauges under gunicorn's multiprocess metrics, beside the workers' own
    text = pg_service.call("GET", "/metrics").text
    assert 'vtpm_verifier_attesters{state="trusted"}' in text, text[-2000:]
    assert "vtpm_verifier_evidence_age_seconds_count" in text
    assert "vtpm_verifier_http_requests_total" in text
    log = pg_service.server.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_tpm_killed_agent_reports_the_fault_once_and_stops(
    pg_service: Service, agent: AgentProc
) -> None:
    agent.start()
    wait_for(lambda: verdicts(agent) >= 1, 30, "the first verdict")
    aid = json.loads(agent.state_file.read_text())["attester_id"]
    assert agent.tpm.pid is not None
    os.kill(agent.tpm.pid, signal.SIGKILL)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=30) == 1  # bounded: tpm_retries faults, then exit
    assert agent.count(r"^TPM fault, no evidence sent") == 3
    assert agent.count(r"^reported tpm fault to the verifier") == 1  # once, not per retry
    r = pg_service.call("GET", f"/v1/attesters/{aid}", pg_service.reader)
    assert r.json()["state"] == "failed" and r.json()["deadline"] is None
    r = pg_service.call("GET", f"/v1/attesters/{aid}/history", pg_service.reader)
    last = r.json()["transitions"][0]
    assert (last["from_state"], last["to_state"], last["cause"]["fault"]) == (
        "trusted",
        "failed",
        "tpm",
    )
    assert last["cause"]["detail"] and last["result_id"] is None
    assert history(pg_service, aid) == [("unknown", "trusted"), ("trusted", "failed")]


def test_fault_reports_are_the_attesters_own(pg_service: Service, agent: AgentProc) -> None:
    agent.start()
    wait_for(lambda: verdicts(agent) >= 1, 30, "the first verdict")
    agent.stop()
    state = json.loads(agent.state_file.read_text())
    aid, token = state["attester_id"], state["token"]
    path = f"/v1/attesters/{aid}/faults"
    body = {"kind": "tpm", "detail": "x"}
    assert pg_service.call("POST", path, pg_service.admin, json=body).status_code == 403
    assert pg_service.call("POST", path, "not-a-token", json=body).status_code == 401
    r = pg_service.call("POST", path, token, json={"kind": "cpu"})
    assert r.status_code == 400 and r.json()["detail"].startswith("FaultReport.kind"), r.text
    r = pg_service.call("POST", path, token, json={"kind": "event_log", "detail": "y" * 501})
    assert r.status_code == 400 and r.json()["detail"].startswith("FaultReport.detail")
    assert history(pg_service, aid) == [("unknown", "trusted")]  # none of those counted
    first = pg_service.call("POST", path, token, json={"kind": "event_log", "detail": "gone"})
    again = pg_service.call("POST", path, token, json={"kind": "event_log", "detail": "gone"})
    assert first.json()["recorded"] is True and again.json()["recorded"] is False
    assert history(pg_service, aid) == [("unknown", "trusted"), ("trusted", "failed")]


def test_once_with_a_dead_tpm_reports_it(pg_service: Service, agent: AgentProc) -> None:
    done = once(agent)
    assert done.returncode == 0, done.stderr
    aid = json.loads(agent.state_file.read_text())["attester_id"]
    assert agent.tpm.pid is not None
    os.kill(agent.tpm.pid, signal.SIGKILL)
    failed = once(agent, "-v")
    assert failed.returncode == 1
    assert "reported tpm fault to the verifier" in failed.stderr, failed.stderr
    assert history(pg_service, aid) == [("unknown", "trusted"), ("trusted", "failed")]
