"""A database that is gone or overloaded answers 503 problem+json with Retry-After (issue 18).

Against a real gunicorn service (2 workers) on its own PostgreSQL database,
with a real swtpm attester. The shared server is never restarted: the tests
cut the service off by refusing new connections to its database
(``ALLOW_CONNECTIONS false``, which binds superusers too) and terminating its
backends, or overload it by capping its role's connections (``CONNECTION
LIMIT``: PostgreSQL refuses the rest with SQLSTATE 53300, as it does at
``max_connections``). Every answer is then a success or a 503 with a problem
body, never a 500; once the database is back, the service recovers by itself.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
import sqlalchemy

from tests.verifier.service.conftest import EkCa, Server, make_home, provision_tpm
from verifier.attester import AttesterState, TpmAttester, VerifierError, attest_once, enroll
from vtpm_core.swtpm import SwtpmProcess

pytestmark = pytest.mark.postgres


@dataclass
class Cut:
    server: Server
    admin: sqlalchemy.Engine
    dbname: str
    role: str
    state: AttesterState
    tcti: str

    def sql(self, *statements: str) -> None:
        with self.admin.connect() as conn:
            for s in statements:
                conn.exec_driver_sql(s)

    def terminate(self) -> int:
        """Terminate every backend of the service's database; how many there were."""
        with self.admin.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": self.dbname},
            ).all()
        return len(rows)


@pytest.fixture(scope="module")
def cut(
    tmp_path_factory: pytest.TempPathFactory,
    ek_ca: EkCa,
    postgres_url: str,
    tpm_factory: Callable[[], SwtpmProcess],
) -> Iterator[Cut]:
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    home = tmp_path_factory.mktemp("home-unavailable")
    make_home(home, ek_ca, nonce_lifetime_s=30)
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    tag = secrets.token_hex(4)
    dbname, role = f"vtpm_unav_{tag}", f"vtpm_unav_{tag}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')  # not a superuser: limits bind it
        conn.exec_driver_sql(f'CREATE DATABASE "{dbname}" OWNER "{role}"')
    host = postgres_url.split("@", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql+psycopg://{role}@{host}/{dbname}"
    server = Server(home, url).start()
    try:
        tpm = tpm_factory()
        with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
            state = enroll(http, server.url, att, vm_id="unavailable-0")
        yield Cut(server, admin, dbname, role, state, tpm.endpoint.tcti)
    finally:
        server.stop()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        admin.dispose()


def _assert_unavailable(resp: requests.Response) -> None:
    assert resp.status_code == 503, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.headers["Retry-After"] == "1"
    body = resp.json()
    assert body["type"] == "urn:vtpm-trust:problem:unavailable"
    assert body["status"] == 503
    assert "retry" in body["detail"]
    assert "Traceback" not in resp.text and "psycopg" not in resp.text


def _attest(cut: Cut) -> dict[str, object]:
    with requests.Session() as http, TpmAttester.open(cut.tcti) as att:
        return attest_once(http, cut.state, att, None)


def _recovers(cut: Cut, within_s: float = 20.0) -> float:
    """Seconds until a whole attestation succeeds again (retrying on 503 as a client would)."""
    t0 = time.monotonic()
    while True:
        try:
            result = _attest(cut)
            assert result["status"], result
            return time.monotonic() - t0
        except VerifierError as exc:
            if exc.status != 503 or time.monotonic() - t0 > within_s:
                raise
            time.sleep(0.2)


def test_database_unreachable_is_503_with_retry_after_then_recovers(cut: Cut) -> None:
    assert _attest(cut)["status"]
    base = f"{cut.server.url}/v1/attesters/{cut.state.attester_id}"
    auth = {"Authorization": f"Bearer {cut.state.token}"}
    cut.sql(f'ALTER DATABASE "{cut.dbname}" ALLOW_CONNECTIONS false')
    try:
        assert cut.terminate() >= 1  # the service held connections
        # hot paths (fast path: one reconnect, refused), the ORM paths, health
        for _ in range(3):  # both workers, whichever answers
            _assert_unavailable(requests.post(f"{base}/challenges", headers=auth, timeout=30))
            _assert_unavailable(requests.get(f"{base}", headers=auth, timeout=30))
            _assert_unavailable(requests.get(f"{cut.server.url}/healthz", timeout=30))
        evidence = {"nonce": "AAAA", "quote": "AAAA", "signature": "AAAA", "pcrs": {}}
        resp = requests.post(f"{base}/evidence", headers=auth, json=evidence, timeout=30)
        _assert_unavailable(resp)
    finally:
        cut.sql(f'ALTER DATABASE "{cut.dbname}" ALLOW_CONNECTIONS true')
    took = _recovers(cut)
    print(f"recovered {took:.2f} s after connections were allowed again")
    assert requests.get(f"{cut.server.url}/healthz", timeout=30).status_code == 200
    log = cut.server.log.read_text()
    # one line per 503; no request ended as an internal error (SQLAlchemy's pool may
    # still log the failed reset of a connection the server terminated)
    assert "database unavailable while serving" in log
    assert "internal error while serving" not in log


def test_terminated_backends_mid_load_cost_no_500(cut: Cut) -> None:
    """Terminating the service's backends while clients attest: successes and at most
    503s; the fast path's one reconnect hides most terminations entirely."""
    statuses: list[int] = []

    def client(_i: int) -> None:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                _attest(cut)
                statuses.append(200)
            except Exception as exc:
                statuses.append(int(getattr(exc, "status", -1)))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client, i) for i in range(3)]
        terminated = 0
        for _ in range(8):
            time.sleep(0.4)
            terminated += cut.terminate()
        for f in futures:
            f.result()
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"terminated {terminated} backends; answers {counts}")
    assert set(statuses) <= {200, 503}, counts
    assert counts.get(200, 0) > 0
    assert _recovers(cut) < 20


def test_connection_limit_overload_is_503_then_recovers(cut: Cut) -> None:
    """Capped at one connection for the role, the two workers' connections cannot all
    open: concurrent challenges get 201 or 503 (never 500) until the cap is lifted."""
    cut.sql(f'ALTER ROLE "{cut.role}" CONNECTION LIMIT 1')
    try:
        cut.terminate()
        base = f"{cut.server.url}/v1/attesters/{cut.state.attester_id}"
        auth = {"Authorization": f"Bearer {cut.state.token}"}

        def one(_i: int) -> requests.Response:
            return requests.post(f"{base}/challenges", headers=auth, timeout=30)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(one, range(60)))
        codes = [r.status_code for r in answers]
        counts = {s: codes.count(s) for s in set(codes)}
        print(f"under a 1-connection cap: {counts}")
        assert set(codes) <= {201, 503}, counts
        assert counts.get(503, 0) > 0, "the cap was never hit"
        for r in answers:
            if r.status_code == 503:
                _assert_unavailable(r)
    finally:
        cut.sql(f'ALTER ROLE "{cut.role}" CONNECTION LIMIT -1')
    assert _recovers(cut) < 20
