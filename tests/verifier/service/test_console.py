"""The web console (issue 17) against the real service: gunicorn, SQLite and PostgreSQL,
swtpm attestations; a hostile kernel command line is shown escaped."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.verifier.service.conftest import Service
from tests.verifier.service.test_http import attest, register
from verifier.eventlog import EventLog
from verifier.policy import learn_policy
from vtpm_core.measured_boot import BootDescription, build_boot_log, extend_pcrs, uefi
from vtpm_core.measured_boot.tcg_log import EventLogWriter, EventType
from vtpm_core.swtpm import SwtpmProcess

pytestmark = [pytest.mark.swtpm]

HOSTILE = "root=/dev/vda <script>alert(1)</script>"
HOSTILE_VAR = "Boot<script>alert(2)</script>"
CLAIM = b"Calling EFI Application from Boot Option"
MEASURED = b"something else was measured"


def _bad_boot(log: EventLogWriter) -> None:
    """The hostile VM's extra events: a boot variable whose name is markup, and a forged
    EV_EFI_ACTION (its data says CLAIM, its digest is of MEASURED)."""
    log.add(
        1,
        EventType.EV_EFI_VARIABLE_BOOT,
        uefi.variable_data(uefi.EFI_GLOBAL_VARIABLE, HOSTILE_VAR, b"\x00\x00"),
    )
    log.add_digests(
        4, EventType.EV_EFI_ACTION, CLAIM, {"sha256": hashlib.sha256(MEASURED).digest()}
    )


@pytest.fixture(scope="module")
def fleet(service: Service, tpm_factory: Callable[[], SwtpmProcess]) -> dict[str, Any]:
    """Two attested VMs: one affirming (its own learned policy), one contraindicated (a policy
    wanting another command line) whose log carries a hostile kernel command line."""
    out: dict[str, Any] = {}
    for name, cmdline in (("good", "root=/dev/vda ro"), ("bad", HOSTILE)):
        tpm = tpm_factory()
        esapi = tpm.esapi()
        writer = build_boot_log(BootDescription(kernel_cmdline=cmdline), ["sha256"])
        if name == "bad":
            _bad_boot(writer)
        boot = extend_pcrs(esapi, writer)
        esapi.close()
        state = register(service, tpm, vm_id=f"vm-console-{name}")
        log = EventLog.parse(boot.eventlog)
        policy = learn_policy(log.verify(log.replay()), name=f"c-{name}").to_yaml()
        if name == "bad":
            policy = policy.replace(HOSTILE, "root=/dev/vda ro")
        r = requests.put(
            f"{service.url}/v1/policies/c-{name}",
            data=policy.encode(),
            headers={**service.headers(service.admin), "Content-Type": "application/yaml"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        r = service.call(
            "PUT",
            f"/v1/attesters/{state.attester_id}/policy",
            service.admin,
            json={"policy": f"c-{name}"},
        )
        assert r.status_code == 200, r.text
        out[name] = {"state": state, "result": attest(service, tpm, state, boot.eventlog)}
    assert out["good"]["result"]["status"] == "affirming"
    assert out["bad"]["result"]["status"] == "contraindicated"
    return out


def _login(service: Service, token: str) -> requests.Session:
    http = requests.Session()
    r = http.post(f"{service.url}/console/login", data={"token": token}, timeout=30)
    assert r.status_code == 200 and "<h1>Fleet</h1>" in r.text, r.text
    return http


def test_login_sets_a_strict_httponly_cookie(service: Service) -> None:
    r = requests.post(
        f"{service.url}/console/login",
        data={"token": service.reader},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 303 and r.headers["Location"].endswith("/console/")
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    for bad in ("", "not-a-token"):
        r = requests.post(f"{service.url}/console/login", data={"token": bad}, timeout=30)
        assert r.status_code == 401 and "not a reader or admin token" in r.text
    # a cross-site form post is refused even with a good token
    r = requests.post(
        f"{service.url}/console/login",
        data={"token": service.reader},
        headers={"Origin": "https://evil.example"},
        timeout=30,
    )
    assert r.status_code == 403
    # no session: pages go to the login page, JSON says 401
    r = requests.get(f"{service.url}/console/", allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["Location"].endswith("/console/login")
    assert requests.get(f"{service.url}/console/api/fleet", timeout=30).status_code == 401
    # a forged cookie is no session
    r = requests.get(
        f"{service.url}/console/",
        cookies={"vtpm_console": "eyJyIjoiYWRtaW4ifQ.forged.sig"},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 303


def test_fleet_page_and_json(service: Service, fleet: dict[str, Any]) -> None:
    http = _login(service, service.reader)
    r = http.get(f"{service.url}/console/", params={"q": "vm-console-"}, timeout=30)
    assert r.status_code == 200
    for header, value in (
        ("Content-Security-Policy", "default-src 'none'"),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
    ):
        assert value in r.headers[header]
    bad_id = fleet["bad"]["state"].attester_id
    rows = re.findall(
        r"<tr>\s*<td>(vm-console-\w+)</td>.*?class=\"state state-(\w+)\">.*?"
        r"class=\"verdict-(\w+)\"",
        r.text,
        re.S,
    )
    assert sorted(rows) == [
        ("vm-console-bad", "failed", "contraindicated"),
        ("vm-console-good", "trusted", "affirming"),
    ]
    assert f'href="/console/attesters/{bad_id}"' in r.text
    # the JSON it renders, by bearer token too
    j = requests.get(
        f"{service.url}/console/api/fleet",
        params={"q": "vm-console-b", "sort": "vm_id", "order": "asc", "size": "25"},
        headers=service.headers(service.reader),
        timeout=30,
    ).json()
    assert j["total"] == 1 and j["attesters"][0]["id"] == bad_id
    assert j["attesters"][0]["last_verdict"] == "contraindicated"
    assert j["attesters"][0]["policy"] == "c-bad"
    assert j["attesters"][0]["state"] == "failed"
    assert j["attesters"][0]["evidence_age_s"] is not None
    assert j["attesters"][0]["ek_issuer"] and j["attesters"][0]["flags"] == []
    # counts by state (issue 16's), every state named even at zero
    assert set(j["counts"]) == {"unknown", "trusted", "failed", "stale"}
    assert j["counts"]["failed"] >= 1 and j["counts"]["trusted"] >= 1
    assert j["total"] <= sum(j["counts"].values())
    r = http.get(f"{service.url}/console/", params={"q": "vm-console-"}, timeout=30)
    for state in ("trusted", "failed"):
        shown = re.search(rf'id="count-{state}">(\d+)<', r.text)
        assert shown is not None and int(shown.group(1)) == j["counts"][state]
    # the state filter and the evidence-age sort
    failed = http.get(
        f"{service.url}/console/api/fleet",
        params={"q": "vm-console-", "state": "failed", "sort": "evidence"},
        timeout=30,
    ).json()
    assert [a["vm_id"] for a in failed["attesters"]] == ["vm-console-bad"]
    assert failed["total"] == 1
    # paging: one per page, sorted by VM id
    pages = [
        http.get(
            f"{service.url}/console/api/fleet",
            params={"q": "vm-console-", "sort": "vm_id", "order": "asc", "size": 25, "page": p},
            timeout=30,
        ).json()
        for p in (1, 2)
    ]
    assert [a["vm_id"] for a in pages[0]["attesters"]] == ["vm-console-bad", "vm-console-good"]
    assert pages[1]["attesters"] == [] and pages[1]["pages"] == 1
    for bad in ({"sort": "ek; drop"}, {"state": "evil"}, {"size": "7"}, {"page": "0"}):
        r = http.get(f"{service.url}/console/api/fleet", params=bad, timeout=30)
        assert r.status_code == 400 and next(iter(bad)) in r.json()["detail"], bad


def test_failed_attester_page_shows_the_hostile_cmdline_inert(
    service: Service, fleet: dict[str, Any]
) -> None:
    http = _login(service, service.reader)
    bad_id = fleet["bad"]["state"].attester_id
    r = http.get(f"{service.url}/console/attesters/{bad_id}", timeout=30)
    assert r.status_code == 200
    assert "<strong>contraindicated</strong>" in r.text
    assert "<script>" not in r.text  # no script element at all on the page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text  # the hostile value, escaped
    assert "vm-console-bad" in r.text and "c-bad" in r.text
    # the failing rule, with the expected and actual values beside it
    row = re.search(r'<tr class="failure">\s*<td>kernel_cmdline</td>(.*?)</tr>', r.text, re.S)
    assert row is not None, r.text
    assert "EV_IPL" in row.group(1) and "root=/dev/vda ro" in row.group(1)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in row.group(1)
    j = http.get(f"{service.url}/console/api/attesters/{bad_id}", timeout=30).json()
    assert j["results"][0]["status"] == "contraindicated" and "ear" not in j["results"][0]
    assert http.get(f"{service.url}/console/attesters/nope", timeout=30).status_code == 404


def test_logout_needs_the_csrf_token(service: Service) -> None:
    http = _login(service, service.admin)
    page = http.get(f"{service.url}/console/", timeout=30).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    assert http.post(f"{service.url}/console/logout", data={}, timeout=30).status_code == 403
    bad = {"csrf": "x" + csrf.group(1)}
    assert http.post(f"{service.url}/console/logout", data=bad, timeout=30).status_code == 403
    r = http.post(f"{service.url}/console/logout", data={"csrf": csrf.group(1)}, timeout=30)
    assert r.status_code == 200 and "<h1>Log in</h1>" in r.text
    r = http.get(f"{service.url}/console/", allow_redirects=False, timeout=30)
    assert r.status_code == 303


def _event_row(page: str, index: int) -> str:
    row = re.search(rf'<tr id="event-{index}" class="([^"]*)">(.*?)</tr>', page, re.S)
    assert row is not None, f"event {index} not on the page"
    return row.group(1) + row.group(2)


def test_timeline_marks_the_failing_and_the_forged_events(
    service: Service, fleet: dict[str, Any]
) -> None:
    http = _login(service, service.reader)
    bad_id = fleet["bad"]["state"].attester_id
    j = http.get(f"{service.url}/console/api/attesters/{bad_id}/timeline", timeout=30).json()
    assert j["proven"] is True and j["log_error"] is None
    assert j["evidence"]["result_id"] == fleet["bad"]["result"]["id"]
    phases = [p["phase"] for p in j["phases"]]
    assert phases == ["firmware", "secure-boot", "boot-applications", "kernel"]
    events = {e["index"]: e for p in j["phases"] for g in p["pcrs"] for e in g["events"]}
    by_phase = {p["phase"]: [g["pcr"] for g in p["pcrs"]] for p in j["phases"]}
    assert by_phase["secure-boot"] == [7] and by_phase["kernel"] == [9, 12]
    # the forged event: no decoded data, its claim only as a claim
    (forged,) = [e for e in events.values() if e["trust"] == "forged"]
    assert forged["type"] == "EV_EFI_ACTION" and forged["pcr"] == 4
    assert forged["data"] is None and forged["decoded"] is None
    assert forged["untrusted_claim"] == repr(CLAIM.decode())
    # the failing rule, on its event, with expected and actual
    (cmdline,) = [e for e in events.values() if e["failures"]]
    assert cmdline["type"] == "EV_IPL" and cmdline["trust"] == "verified"
    assert cmdline["failures"][0]["rule"] == "kernel_cmdline"
    assert cmdline["failures"][0]["expected"] == "'root=/dev/vda ro'"
    assert cmdline["failures"][0]["actual"] == repr(HOSTILE)
    # the hostile boot variable: its name decoded, verified data, name not covered
    (var,) = [e for e in events.values() if e["data"] and HOSTILE_VAR in e["data"]]
    assert var["pcr"] == 1 and var["trust"] == "verified" and var["digest_covers"]

    page = http.get(f"{service.url}/console/attesters/{bad_id}/timeline", timeout=30)
    assert page.status_code == 200
    html = page.text
    assert "<script>" not in html and "<script" not in html
    assert "Boot&lt;script&gt;alert(2)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    row = _event_row(html, forged["index"])
    assert "trust-row-forged" in row and "UNTRUSTED: the data does not match its digest" in row
    assert f"<del>{repr(CLAIM.decode()).replace(chr(39), '&#39;')}</del>" in row
    assert 'class="decoded"' not in row  # never shown as what was measured
    row = _event_row(html, cmdline["index"])
    assert "failed" in row and "kernel_cmdline" in row
    assert re.search(r'class="mono expected">[^<]*root=/dev/vda ro', row)
    assert re.search(r'class="mono actual">[^<]*&lt;script&gt;alert\(1\)', row)
    # the attester page links the failing rule to its event on the timeline
    attester = http.get(f"{service.url}/console/attesters/{bad_id}", timeout=30).text
    link = f"/console/attesters/{bad_id}/timeline#event-{cmdline['index']}"
    assert f'href="{link}"' in attester
    # the good VM: every event proven, nothing failed
    good = http.get(
        f"{service.url}/console/api/attesters/{fleet['good']['state'].attester_id}/timeline",
        timeout=30,
    ).json()
    trusts = {e["trust"] for p in good["phases"] for g in p["pcrs"] for e in g["events"]}
    assert trusts <= {"verified", "described"} and good["failures"] == []
    r = http.get(f"{service.url}/console/api/attesters/nope/timeline", timeout=30)
    assert r.status_code == 404
