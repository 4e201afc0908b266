"""Re-appraisal and policy dry-run (issue 20): real swtpm evidence stored by the real service
(in-process app on a loopback port, pinned clock), re-appraised over HTTP with the admin token,
SQLite and PostgreSQL. A dry run writes nothing; ``apply`` records re-appraisals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import select

from tests.verifier.service import conftest as service_fixtures
from tests.verifier.service.conftest import EkCa, make_home, provision_tpm
from tests.verifier.service.test_state import (
    Clock,
    TpmFactory,
    Verifier,
    assign,
    attest,
    enrol,
    row,
    transitions,
)
from verifier.ear import verify_result
from verifier.service.models import (
    Assignment,
    Attester,
    AttesterTransition,
    LatestEvidence,
    Result,
    WebhookOutbox,
)
from vtpm_cli.main import cli

pytestmark = [pytest.mark.swtpm]

# the service tests' fixtures (their conftest is one directory down)
ek_ca = service_fixtures.ek_ca
tpm_factory = service_fixtures.tpm_factory
pg_database = service_fixtures.pg_database

NEVER = {"version": 1, "name": "never", "pcrs": {"sha256": {"7": "11" * 32}}}


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def verifier(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ek_ca: EkCa
) -> Iterator[Verifier]:
    backend = request.param
    home = tmp_path_factory.mktemp(f"reappraise-{backend}")
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    admin, reader = make_home(home, ek_ca, attest_cadence_s=60, stale_grace=3)
    db_url = request.getfixturevalue("pg_database")() if backend == "postgres" else None
    v = Verifier(home, db_url, Clock(), admin, reader).start()
    try:
        yield v
    finally:
        v.stop()


def put_policy(v: Verifier, doc: dict[str, Any]) -> None:
    r = v.call("PUT", f"/v1/policies/{doc['name']}", v.admin, json={"policy": doc})
    assert r.status_code == 200, r.text


def snapshot(v: Verifier) -> dict[str, list[tuple[Any, ...]]]:
    """Every row re-appraisal could touch."""
    with v.db.read() as s:
        return {
            "results": [(r.id, r.status, r.policy_name) for r in s.scalars(select(Result))],
            "attesters": [
                (a.id, a.state, a.state_since, a.deadline, a.latest_result_id, a.last_evidence_at)
                for a in s.scalars(select(Attester).order_by(Attester.id))
            ],
            "assignments": [
                (x.attester_id, x.policy_name)
                for x in s.scalars(select(Assignment).order_by(Assignment.attester_id))
            ],
            "transitions": [(t.id,) for t in s.scalars(select(AttesterTransition))],
            "evidence": [
                (e.attester_id, e.result_id)
                for e in s.scalars(select(LatestEvidence).order_by(LatestEvidence.attester_id))
            ],
        }


def test_dry_run_lists_changes_and_writes_nothing_apply_records_reappraisals(
    verifier: Verifier, tpm_factory: TpmFactory, tmp_path: Path
) -> None:
    v = verifier
    tpm_a, tpm_b = tpm_factory(), tpm_factory()
    a = enrol(v, tpm_a, "vm-reappraise-a")
    b = enrol(v, tpm_b, "vm-reappraise-b")
    t_evidence = v.clock.advance(1)
    first_a = attest(v, tpm_a, a)
    attest(v, tpm_b, b)
    assert first_a["status"] == "warning"  # no policy yet
    pcr7 = first_a["report"]["evidence"]  # the quote is kept for re-appraisal
    assert set(pcr7) == {"quote", "signature"}
    with v.db.read() as s:
        stored = s.get(LatestEvidence, a.attester_id)
        assert stored is not None
        actual7 = stored.pcrs["sha256"]["7"]
    put_policy(v, NEVER)
    match = {"version": 1, "name": "match", "pcrs": {"sha256": {"7": actual7}}}
    put_policy(v, match)
    t_now = v.clock.advance(30)

    # 1. dry run against the fleet: both would fail "never", with rule, expected and actual
    before = snapshot(v)
    r = v.call("POST", "/v1/policies/never/dry-run", v.admin, json={"against": "fleet"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert snapshot(v) == before  # nothing changed
    assert doc["applied"] is False and doc["freshness"] == "original-evidence"
    mine = {c["attester_id"]: c for c in doc["changed"]}
    assert {a.attester_id, b.attester_id} <= set(mine)
    change = mine[a.attester_id]
    assert (change["from"], change["to"]) == ("warning", "contraindicated")
    assert change["evidence_received_at"] == t_evidence.isoformat().replace("+00:00", "Z")
    [why] = change["failures"]
    assert why["rule"] == "pcrs.sha256.7"
    assert why["expected"] == "11" * 32 and why["actual"] == actual7
    assert doc["appraised_at"] == t_now.isoformat().replace("+00:00", "Z")

    # 2. against named attesters; "match" would turn warning into affirming
    r = v.call("POST", "/v1/policies/match/dry-run", v.admin, json={"against": [a.attester_id]})
    doc = r.json()
    assert doc["reappraised"] == 1 and doc["verdicts"] == {"affirming": 1}
    [change] = doc["changed"]
    assert (change["from"], change["to"], change["failures"]) == ("warning", "affirming", [])
    assert snapshot(v) == before

    # 3. apply "never" to A only: assignment, a re-appraisal result, EAR claim, transition,
    # and the transition's webhook delivery queued with it
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["trusted->failed"]}
    r = v.call("POST", "/v1/webhooks", v.admin, json=hook)
    assert r.status_code in (200, 201), r.text
    r = v.call("POST", "/v1/policies/never/apply", v.admin, json={"against": [a.attester_id]})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["applied"] is True
    [change] = doc["changed"]
    result_id = change["result_id"]
    after = snapshot(v)
    assert (a.attester_id, "never") in after["assignments"]
    assert len(after["results"]) == len(before["results"]) + 1
    row_a = row(v, a.attester_id)
    assert (row_a.state, row_a.state_since, row_a.latest_result_id) == (
        "failed",
        t_now,
        result_id,
    )
    assert row_a.last_evidence_at == t_evidence  # no new evidence: freshness unchanged
    with v.db.read() as s:
        result = s.get(Result, result_id)
        assert result is not None
        evidence = s.get(LatestEvidence, a.attester_id)
        assert evidence is not None and evidence.result_id == result_id
        assert evidence.received_at == t_evidence
    assert result.status == "contraindicated" and result.policy_name == "never"
    assert result.nonce == first_a["nonce"]  # the original challenge's
    marker = result.report["reappraisal"]
    assert marker["of_result"] == first_a["id"]
    assert marker["evidence_received_at"] == t_evidence.isoformat().replace("+00:00", "Z")
    assert marker["freshness"] == "original-evidence"
    jwks = requests.get(f"{v.url}/.well-known/jwks.json", timeout=10).json()
    ear = verify_result(result.ear, jwks, expected_nonce=bytes.fromhex(first_a["nonce"]))
    assert ear.claims["vtpm.reappraisal"] == marker
    assert [sub.status for sub in ear.submods.values()] == ["contraindicated"]
    tr = transitions(v, a.attester_id)[-1]
    assert (tr.from_state, tr.to_state, tr.result_id) == ("trusted", "failed", result_id)
    assert tr.cause["reappraisal"] == marker and tr.cause["failures"] == ["pcrs.sha256.7"]
    assert row(v, b.attester_id).state == "trusted"  # B was not named
    with v.db.read() as s:
        [queued] = [
            o.payload
            for o in s.scalars(select(WebhookOutbox))
            if o.payload["attester_id"] == a.attester_id
        ]
    assert queued["transition_id"] == tr.id and queued["cause"]["reappraisal"] == marker

    # 4. the results API serves it, marked; a re-appraisal is itself re-appraisable
    results = v.call("GET", f"/v1/attesters/{a.attester_id}/results", v.reader).json()
    assert results["results"][0]["report"]["reappraisal"] == marker
    r = v.call("POST", "/v1/policies/match/dry-run", v.admin, json={"against": [a.attester_id]})
    [change] = r.json()["changed"]
    assert (change["from"], change["to"], change["resolved"]) == (
        "contraindicated",
        "affirming",
        ["pcrs.sha256.7"],
    )

    # 5. the CLI: exit 1 when something would change, reasons printed
    token = tmp_path / "admin.token"
    token.write_text(v.admin)
    out = CliRunner().invoke(
        cli,
        ["policy", "dry-run", "match", "--against", a.attester_id, "--verifier", v.url,
         "--token-file", str(token)],
    )  # fmt: skip
    assert out.exit_code == 1, out.output
    assert f"{a.attester_id} (vm-reappraise-a): contraindicated -> affirming" in out.output
    assert "+ pcrs.sha256.7 now passes" in out.output
    out = CliRunner().invoke(
        cli,
        ["policy", "dry-run", "match", "--against", a.attester_id, "--apply", "--verifier",
         v.url, "--token-file", str(token)],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert row(v, a.attester_id).state == "trusted"

    # 6. fresh evidence after apply is appraised under the assigned policy
    v.clock.advance(5)
    assert attest(v, tpm_a, a)["status"] == "affirming"
    assign(v, a.attester_id, None)


def test_old_evidence_reappraised_trusted_stays_stale(
    verifier: Verifier, tpm_factory: TpmFactory
) -> None:
    """A trusted verdict on evidence older than its deadline does not make an attester
    trusted: re-appraisal brings no freshness."""
    v = verifier
    tpm = tpm_factory()
    a = enrol(v, tpm, "vm-reappraise-old")
    v.clock.advance(1)
    attest(v, tpm, a)
    put_policy(v, NEVER)
    r = v.call("POST", "/v1/policies/never/apply", v.admin, json={"against": [a.attester_id]})
    assert row(v, a.attester_id).state == "failed", r.text
    with v.db.read() as s:
        evidence = s.get(LatestEvidence, a.attester_id)
        assert evidence is not None
        pcr7 = evidence.pcrs["sha256"]["7"]
    put_policy(v, {"version": 1, "name": "ok7", "pcrs": {"sha256": {"7": pcr7}}})
    v.clock.advance(181)  # past cadence x grace since the evidence
    r = v.call("POST", "/v1/policies/ok7/apply", v.admin, json={"against": [a.attester_id]})
    [change] = r.json()["changed"]
    assert change["to"] == "affirming"
    got = row(v, a.attester_id)
    assert (got.state, got.deadline) == ("stale", None)
    assign(v, a.attester_id, None)


@pytest.mark.parametrize(
    ("path", "token", "body", "status", "detail"),
    [
        pytest.param("never", "admin", {"against": "all"}, 400, "against", id="fail/against"),
        pytest.param("never", "admin", {"against": []}, 400, "against", id="fail/empty"),
        pytest.param("never", "admin", {"x": 1}, 400, "x", id="fail/unknown-field"),
        pytest.param("nope", "admin", {"against": "fleet"}, 404, "nope", id="fail/policy"),
        pytest.param(
            "never", "admin", {"against": ["no-such-id"]}, 404, "no-such-id", id="fail/attester"
        ),
        pytest.param("never", "reader", {"against": "fleet"}, 403, "", id="fail/reader"),
    ],
)
def test_bad_requests_are_refused_by_name(
    verifier: Verifier, path: str, token: str, body: dict[str, Any], status: int, detail: str
) -> None:
    put_policy(verifier, NEVER)
    before = snapshot(verifier)
    for route in ("dry-run", "apply"):
        tok = verifier.admin if token == "admin" else verifier.reader
        r = verifier.call("POST", f"/v1/policies/{path}/{route}", tok, json=body)
        assert r.status_code == status, r.text
        assert detail in r.json().get("detail", "")
    assert snapshot(verifier) == before


def test_routes_are_in_the_openapi_document(verifier: Verifier) -> None:
    doc = requests.get(f"{verifier.url}/openapi.json", timeout=10).json()
    for route in ("dry-run", "apply"):
        op = doc["paths"][f"/v1/policies/{{name}}/{route}"]["post"]
        assert op["x-roles"] == ["admin"]
