"""The fleet view (issue 16): GET /v1/attesters?state=&after=&limit= (keyset pages),
GET /v1/attesters/{id}/history, and the fleet gauges of GET /metrics. SQLite and
PostgreSQL; the app in-process, attesters and transitions seeded into the database."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import delete, text

from verifier.service import create_app, init_home, load_config
from verifier.service.config import add_reader_token
from verifier.service.db import Database
from verifier.service.models import Attester, AttesterTransition

NOW = datetime.now(UTC).replace(microsecond=0)
# (state, count, evidence age in seconds or None)
FLEET = (("trusted", 23, 20.0), ("failed", 5, 100.0), ("stale", 4, 700.0), ("unknown", 3, None))


@dataclass
class Fleet:
    app: Flask
    db: Database
    reader: str
    ids: dict[str, list[str]]

    @property
    def client(self) -> FlaskClient:
        return self.app.test_client()

    def get(self, path: str, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token or self.reader}"}
        return self.client.get(path, headers=headers)


def seed(db: Database, state: str, n: int, age_s: float | None) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    seen = None if age_s is None else NOW - timedelta(seconds=age_s)
    with db.transaction() as s:
        for aid in ids:
            s.add(
                Attester(
                    id=aid,
                    ek_fingerprint=aid.replace("-", "").ljust(64, "0"),
                    ek_public=b"ek",
                    identity={},
                    ak_public=b"ak",
                    ak_name="00",
                    status="active",
                    flags=[],
                    created_at=NOW - timedelta(days=1),
                    state=state,
                    state_since=seen,
                    deadline=NOW + timedelta(seconds=60) if state == "trusted" else None,
                    last_evidence_at=seen,
                    cadence_s=60 if seen else None,
                )
            )
    return ids


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp(f"fleet-{request.param}")
    init_home(home, verifier_id="t")
    (home / "verifier.yaml").write_text(
        (home / "verifier.yaml").read_text() + "sweep_interval_s: 1\n"
    )
    reader = add_reader_token(home)
    url = request.getfixturevalue("pg_database")() if request.param == "postgres" else None
    app = create_app(load_config(home, database_url=url), migrate=True, clock=lambda: NOW)
    db: Database = app.extensions["vtpm_verifier"]["db"]
    ids = {state: sorted(seed(db, state, n, age)) for state, n, age in FLEET}
    try:
        yield Fleet(app, db, reader, ids)
    finally:
        ext = app.extensions["vtpm_verifier"]
        for worker in ("pruner", "sweeper", "deliverer"):
            if worker in ext:
                ext[worker].stop()
        db.dispose()


def pages(f: Fleet, query: str, limit: int) -> list[list[dict[str, Any]]]:
    got: list[list[dict[str, Any]]] = []
    after = ""
    while True:
        r = f.get(f"/v1/attesters?{query}&limit={limit}{after}")
        assert r.status_code == 200, r.get_data(as_text=True)
        body = r.get_json()
        got.append(body["attesters"])
        if body["next"] is None:
            return got
        assert body["next"] == body["attesters"][-1]["id"]
        after = f"&after={body['next']}"


@pytest.mark.parametrize("state", ["trusted", "failed", "stale", "unknown"])
def test_pages_of_one_state_cover_it_once_in_id_order(fleet: Fleet, state: str) -> None:
    got = pages(fleet, f"state={state}", limit=4)
    ids = [a["id"] for page in got for a in page]
    assert ids == fleet.ids[state]
    assert all(len(p) == 4 for p in got[:-1]) and 1 <= len(got[-1]) <= 4
    row = got[0][0]
    assert row["state"] == state
    assert set(row) >= {"id", "vm_id", "status", "state_since", "deadline", "last_evidence_at"}


def test_unfiltered_pages_cover_the_fleet(fleet: Fleet) -> None:
    ids = [a["id"] for page in pages(fleet, "", limit=10) for a in page]
    assert ids == sorted(i for group in fleet.ids.values() for i in group)
    one = fleet.get("/v1/attesters").get_json()  # default limit 100: all 35, no next
    assert len(one["attesters"]) == 35 and one["next"] is None


@pytest.mark.parametrize(
    ("query", "param"),
    [
        pytest.param("state=trusty", "query.state", id="state/unknown"),
        pytest.param("state=", "query.state", id="state/empty"),
        pytest.param("limit=0", "query.limit", id="limit/zero"),
        pytest.param("limit=1001", "query.limit", id="limit/too-big"),
        pytest.param("limit=-3", "query.limit", id="limit/negative"),
        pytest.param("limit=ten", "query.limit", id="limit/not-a-number"),
        pytest.param("after=%27%20or%201=1", "query.after", id="after/not-a-cursor"),
        pytest.param("after=" + "a" * 65, "query.after", id="after/too-long"),
    ],
)
def test_bad_parameters_are_400_naming_them(fleet: Fleet, query: str, param: str) -> None:
    r = fleet.get(f"/v1/attesters?{query}")
    assert r.status_code == 400 and r.content_type == "application/problem+json"
    assert r.get_json()["detail"].startswith(param), r.get_json()


def test_listing_needs_a_reader(fleet: Fleet) -> None:
    assert fleet.client.get("/v1/attesters?state=trusted").status_code == 401


def test_history_pages_newest_first(fleet: Fleet) -> None:
    aid = fleet.ids["trusted"][0]
    steps = ["unknown", "trusted", "failed", "trusted", "stale", "trusted", "failed", "trusted"]
    with fleet.db.transaction() as s:
        s.execute(delete(AttesterTransition).where(AttesterTransition.attester_id == aid))
        for i, (a, b) in enumerate(itertools.pairwise(steps)):
            cause: dict[str, Any] = (
                {"missed_deadline": "x", "last_evidence_at": "y", "cadence_s": 60}
                if b == "stale"
                else {"verdict": "affirming" if b == "trusted" else "contraindicated"}
            )
            s.add(
                AttesterTransition(
                    attester_id=aid,
                    from_state=a,
                    to_state=b,
                    at=NOW + timedelta(seconds=i),
                    cause=cause,
                    result_id=None if b == "stale" else i,
                )
            )
    seen: list[dict[str, Any]] = []
    after = ""
    while True:
        r = fleet.get(f"/v1/attesters/{aid}/history?limit=3{after}")
        assert r.status_code == 200, r.get_data(as_text=True)
        body = r.get_json()
        assert body["attester_id"] == aid and len(body["transitions"]) <= 3
        seen += body["transitions"]
        if body["next"] is None:
            break
        after = f"&after={body['next']}"
    assert [(t["from_state"], t["to_state"]) for t in reversed(seen)] == list(
        itertools.pairwise(steps)
    )
    assert [t["id"] for t in seen] == sorted((t["id"] for t in seen), reverse=True)
    stale = next(t for t in seen if t["to_state"] == "stale")
    assert stale["cause"]["missed_deadline"] == "x" and stale["result_id"] is None
    assert seen[0]["at"] == (NOW + timedelta(seconds=6)).isoformat().replace("+00:00", "Z")


def test_history_errors(fleet: Fleet) -> None:
    aid = fleet.ids["failed"][0]
    r = fleet.get(f"/v1/attesters/{aid}/history?after=abc")
    assert r.status_code == 400 and r.get_json()["detail"].startswith("query.after")
    r = fleet.get(f"/v1/attesters/{aid}/history?limit=5000")
    assert r.status_code == 400 and r.get_json()["detail"].startswith("query.limit")
    r = fleet.get(f"/v1/attesters/{uuid.uuid4()}/history")
    assert r.status_code == 404
    assert fleet.client.get(f"/v1/attesters/{aid}/history").status_code == 401
    empty = fleet.get(f"/v1/attesters/{aid}/history").get_json()
    assert empty["transitions"] == [] and empty["next"] is None


def metric(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_states_and_evidence_age_cached_per_sweep(fleet: Fleet) -> None:
    body = fleet.client.get("/metrics").get_data(as_text=True)
    for state, n, _age in FLEET:
        assert metric(body, f'vtpm_verifier_attesters{{state="{state}"}}') == n
    age = "vtpm_verifier_evidence_age_seconds"
    assert metric(body, f'{age}_bucket{{le="15.0"}}') == 0
    assert metric(body, f'{age}_bucket{{le="30.0"}}') == 23
    assert metric(body, f'{age}_bucket{{le="120.0"}}') == 28
    assert metric(body, f'{age}_bucket{{le="600.0"}}') == 28
    assert metric(body, f'{age}_bucket{{le="1800.0"}}') == 32
    assert metric(body, f'{age}_bucket{{le="+Inf"}}') == 32
    assert metric(body, f"{age}_count") == 32
    assert metric(body, f"{age}_sum") == pytest.approx(23 * 20 + 5 * 100 + 4 * 700, abs=0.5)
    # cached: three more attesters are not counted until the sweep interval (1 s) passed
    extra = seed(fleet.db, "unknown", 3, None)
    again = fleet.client.get("/metrics").get_data(as_text=True)
    assert metric(again, 'vtpm_verifier_attesters{state="unknown"}') == 3
    time.sleep(1.05)
    later = fleet.client.get("/metrics").get_data(as_text=True)
    assert metric(later, 'vtpm_verifier_attesters{state="unknown"}') == 6
    with fleet.db.transaction() as s:
        s.execute(delete(Attester).where(Attester.id.in_(extra)))


_LISTING = (
    "SELECT id, state FROM attesters WHERE state = 'trusted' AND id > '0' ORDER BY id LIMIT 101"
)
_HISTORY = (
    "SELECT * FROM attester_transitions WHERE attester_id = 'x' AND id < 99"
    " ORDER BY id DESC LIMIT 101"
)


def test_pages_come_from_the_indexes_without_a_sort(fleet: Fleet) -> None:
    with fleet.db.engine.connect() as conn:
        if fleet.db.sqlite:
            explain, sort = "EXPLAIN QUERY PLAN ", "TEMP B-TREE"
        else:
            conn.execute(text("SET enable_seqscan = off"))  # 35 rows: let size not matter
            explain, sort = "EXPLAIN ", "Sort"
        for sql, index in (
            (_LISTING, "ix_attesters_state_id"),
            (_HISTORY, "ix_attester_transitions_attester_id"),
        ):
            rows = conn.execute(text(explain + sql)).all()
            plan = "\n".join(str(r[-1]) for r in rows)
            assert index in plan and sort not in plan, plan
