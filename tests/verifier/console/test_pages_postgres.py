"""The console's policy pages and the pages the browser test clicks, as JSON and HTML,
on PostgreSQL (the browser test runs on SQLite): the same two swtpm attestations."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.verifier.service.conftest import (  # noqa: F401 (fixture)
    EkCa,
    Server,
    Service,
    make_home,
    pg_database,
    provision_tpm,
)

pytestmark = [pytest.mark.swtpm, pytest.mark.postgres]


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    ek_ca: EkCa,
    pg_database: Callable[[], str],  # noqa: F811
) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("home-console-pg")
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    admin, reader = make_home(home, ek_ca, nonce_lifetime_s=3)
    db_url = pg_database()
    server = Server(home, db_url).start()
    try:
        yield Service("postgres", home, db_url, admin, reader, server, ek_ca)
    finally:
        server.stop()


def test_pages_and_json_on_postgres(service: Service, fleet: dict[str, Any]) -> None:
    h = service.headers(service.reader)
    bad_id = fleet["bad"]["state"].attester_id

    def get(path: str, **params: str) -> Any:
        r = requests.get(f"{service.url}{path}", params=params, headers=h, timeout=30)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    listed = get("/console/api/policies")
    assert {(p["name"], p["attesters"]) for p in listed["policies"]} == {
        ("c-bad", 1),
        ("c-good", 1),
    }
    one = get("/console/api/policies/c-bad")
    assert [a["id"] for a in one["attesters"]] == [bad_id] and one["attesters_total"] == 1
    diff = get("/console/api/policies-diff", a="c-good", b="c-bad")
    assert diff["identical"] is False and {"+", "-"} <= {x["op"] for x in diff["lines"]}
    timeline = get(f"/console/api/attesters/{bad_id}/timeline")
    failed = [
        f["rule"]
        for p in timeline["phases"]
        for g in p["pcrs"]
        for e in g["events"]
        for f in e["failures"]
    ]
    assert failed == ["kernel_cmdline"] and timeline["proven"] is True
    # the HTML pages through a session
    http = requests.Session()
    r = http.post(f"{service.url}/console/login", data={"token": service.reader}, timeout=30)
    assert r.status_code == 200 and "<h1>Fleet</h1>" in r.text
    for path, needle in (
        ("/console/policies", 'href="/console/policies/c-bad"'),
        ("/console/policies/c-bad", f'href="/console/attesters/{bad_id}"'),
        ("/console/policies-diff?a=c-good&b=c-bad", 'class="diff-line diff-add"'),
        (f"/console/attesters/{bad_id}/timeline", "kernel_cmdline"),
    ):
        r = http.get(f"{service.url}{path}", timeout=30)
        assert r.status_code == 200 and needle in r.text, path
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert http.get(f"{service.url}/console/policies/nope", timeout=30).status_code == 404
