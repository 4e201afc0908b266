"""The attestation service end to end: gunicorn (2 workers) + SQLite and PostgreSQL + swtpm.

Each test drives the real HTTP API; TPMs are swtpm_setup-provisioned swtpm
processes whose EK certificates chain to a local CA the verifier trusts.
"""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.verifier.service.conftest import REPO, Server, Service
from verifier.attester import AttesterState, TpmAttester, attest_once, enroll
from verifier.ear import EAR_PROFILE_04, EAR_PROFILE_2023, verify_result
from verifier.eventlog import EventLog
from verifier.policy import learn_policy
from verifier.service.config import load_config
from vtpm_core.measured_boot import BootDescription, simulate_boot
from vtpm_core.swtpm import SwtpmProcess

pytestmark = [pytest.mark.swtpm]

TpmFactory = Callable[[], SwtpmProcess]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def register(service: Service, tpm: SwtpmProcess, vm_id: str | None = None) -> AttesterState:
    with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
        return enroll(http, service.url, att, vm_id=vm_id)


def attest(service: Service, tpm: SwtpmProcess, state: AttesterState, log: bytes | None = None):
    with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
        return attest_once(http, state, att, log)


def make_evidence(service: Service, tpm: SwtpmProcess, state: AttesterState) -> dict[str, Any]:
    """One challenge answered by a real quote (not yet submitted)."""
    ch = service.call("POST", f"/v1/attesters/{state.attester_id}/challenges", state.token)
    assert ch.status_code == 201, ch.text
    doc = ch.json()
    nonce = base64.b64decode(doc["nonce"])
    with TpmAttester.open(tpm.endpoint.tcti) as att:
        q = att.quote(nonce, doc["pcr_selection"])
    return {
        "nonce": doc["nonce"],
        "quote": b64(q.attest),
        "signature": b64(q.signature),
        "pcrs": q.pcrs,
    }


def submit(service: Service, state: AttesterState, evidence: dict[str, Any]) -> requests.Response:
    return service.call(
        "POST", f"/v1/attesters/{state.attester_id}/evidence", state.token, json=evidence
    )


def vtpm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtpm_cli.main", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture(scope="module")
def booted(service: Service, tpm_factory: TpmFactory) -> dict[str, Any]:
    """A TPM after a simulated measured boot, enrolled, with a policy from its PCRs assigned."""
    tpm = tpm_factory()
    esapi = tpm.esapi()
    boot = simulate_boot(BootDescription(kernel_cmdline="root=/dev/vda ro"), esapi, ["sha256"])
    esapi.close()
    state = register(service, tpm, vm_id="vm-booted")
    # `vtpm policy learn` output, uploaded as-is (the verifier.policy schema)
    log = EventLog.parse(boot.eventlog)
    learned = learn_policy(log.verify(log.replay()), name="golden").to_yaml()
    r = requests.put(
        f"{service.url}/v1/policies/golden",
        data=learned.encode(),
        headers={**service.headers(service.admin), "Content-Type": "application/yaml"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    r = service.call(
        "PUT", f"/v1/attesters/{state.attester_id}/policy", service.admin, json={"policy": "golden"}
    )
    assert r.status_code == 200, r.text
    return {"tpm": tpm, "state": state, "log": boot.eventlog}


def test_full_flow_affirming(service: Service, booted: dict[str, Any], tmp_path: Path) -> None:
    state, tpm = booted["state"], booted["tpm"]
    result = attest(service, tpm, state, booted["log"])
    assert result["status"] == "affirming", result["report"]
    assert result["report"]["quote_verified"] is True
    assert result["policy"] == "golden"
    assert result["report"]["policy_id"].startswith("policy:golden@sha256:")
    # the EAR verifies offline with the published JWKS (verifier.ear.verify_result)
    jwks = service.call("GET", "/.well-known/jwks.json").json()
    ear = verify_result(
        result["ear"], jwks, expected_nonce=bytes.fromhex(result["nonce"]), max_age=60
    )
    assert ear.status == "affirming" and ear.attester_id == state.attester_id
    sub = ear.submods["vtpm-boot"]
    assert sub.policy_id == result["report"]["policy_id"] and sub.failures == ()
    # the relying party's view
    view = service.call("GET", f"/v1/attesters/{state.attester_id}", service.reader).json()
    assert view["status"] == "active" and view["latest_result"]["id"] == result["id"]
    assert view["identity"]["trust"] == "ek-certificate"
    results = service.call(
        "GET", f"/v1/attesters/{state.attester_id}/results?limit=5", service.reader
    ).json()["results"]
    assert results[0]["id"] == result["id"]


def test_relying_party_chooses_the_ear_profile(service: Service, booted: dict[str, Any]) -> None:
    """``ear_profile`` on the routes that return results; the 2023 profile by default."""
    state, tpm = booted["state"], booted["tpm"]
    result = attest(service, tpm, state, booted["log"])
    jwks = service.call("GET", "/.well-known/jwks.json").json()
    nonce = bytes.fromhex(result["nonce"])
    plain = verify_result(result["ear"], jwks, expected_nonce=nonce)
    assert plain.profile == EAR_PROFILE_2023

    def read(path: str, **params: str) -> Any:
        r = requests.get(
            f"{service.url}{path}",
            params=params,
            headers=service.headers(service.reader),
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return r.json()

    results = f"/v1/attesters/{state.attester_id}/results"
    for name in ("ietf-ear-04", EAR_PROFILE_04):  # the short name or the full tag
        (row,) = read(results, limit="1", ear_profile=name)["results"]
        ear = verify_result(row["ear"], jwks, expected_nonce=nonce)
        assert ear.profile == EAR_PROFILE_04 and row["id"] == result["id"]
        # the same verdict, appraised at the same time, under the -04 names
        assert (ear.status, ear.issued_at, ear.attester_id) == (
            plain.status,
            plain.issued_at,
            plain.attester_id,
        )
        assert dict(ear.submods) == dict(plain.submods)
        assert ear.claims["ear_status"] == plain.status
    (row,) = read(results, limit="1")["results"]
    assert row["ear"] == result["ear"]  # the stored token itself
    (row,) = read(results, limit="1", ear_profile="veraison-2023")["results"]
    assert row["ear"] == result["ear"]
    view = read(f"/v1/attesters/{state.attester_id}", ear_profile="ietf-ear-04")
    assert verify_result(view["latest_result"]["ear"], jwks).profile == EAR_PROFILE_04
    # evidence answered in the profile its caller asks for
    evidence = make_evidence(service, tpm, state)
    evidence["event_log"] = b64(booted["log"])
    r = service.call(
        "POST",
        f"/v1/attesters/{state.attester_id}/evidence?ear_profile=ietf-ear-04",
        state.token,
        json=evidence,
    )
    assert r.status_code == 200, r.text
    fresh = verify_result(r.json()["ear"], jwks, expected_nonce=base64.b64decode(evidence["nonce"]))
    assert fresh.profile == EAR_PROFILE_04 and fresh.status == r.json()["status"]
    # an unknown profile is a 400 naming the parameter and the choices
    r = service.call("GET", f"{results}?ear_profile=ear-05", service.reader)
    problem(r, 400, "ear_profile.*veraison-2023, ietf-ear-04")


def test_vtpm_attest_and_check_cli(
    service: Service, booted: dict[str, Any], tmp_path: Path
) -> None:
    state, tpm = booted["state"], booted["tpm"]
    state_file = tmp_path / "attester.json"
    state.save(state_file)
    log = tmp_path / "eventlog.bin"
    log.write_bytes(booted["log"])
    token = tmp_path / "reader.token"
    token.write_text(service.reader)
    att = vtpm(
        "attest",
        "--verifier",
        service.url,
        "--tpm",
        tpm.endpoint.tcti,
        "--eventlog",
        str(log),
        "--token-file",
        str(state_file),
    )
    assert att.returncode == 0, att.stderr
    assert f"attester {state.attester_id}: affirming" in att.stdout

    junit = tmp_path / "junit.xml"

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return vtpm("check", "--verifier", service.url, "--attester", state.attester_id,
                    "--token-file", str(token), *args)  # fmt: skip

    ok = check("--max-age", "10m", "--policy", "golden", "--junit", str(junit), "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    suite = ET.parse(junit).getroot()  # noqa: S314 - our own output
    assert suite.get("tests") == "1" and suite.get("failures") == "0"

    bad = check("--policy", "other", "--junit", str(junit))
    assert bad.returncode == 1
    assert "appraised under policy 'golden', not 'other'" in bad.stdout
    failure = ET.parse(junit).getroot().find("testcase/failure")  # noqa: S314
    assert failure is not None and "not 'other'" in (failure.text or "")

    stale = check("--max-age", "0s")
    assert stale.returncode == 1 and "old, more than 0 s" in stale.stdout
    noauth = vtpm("check", "--verifier", service.url, "--attester", state.attester_id)
    assert noauth.returncode == 1 and "401" in noauth.stderr

    # --attest-now: attest from inside the VM first, then check a result seconds old
    now = check(
        "--max-age",
        "30s",
        "--attest-now",
        "--tpm",
        tpm.endpoint.tcti,
        "--attester-state",
        str(state_file),
        "--eventlog",
        str(log),
    )
    assert now.returncode == 0, now.stdout + now.stderr
    assert now.stdout.startswith(f"PASS attester {state.attester_id}: affirming")


def test_policy_failure_lists_every_rule(
    service: Service, booted: dict[str, Any], tmp_path: Path
) -> None:
    """Every failing rule is listed (rule, event, expected, actual), in the body and the EAR."""
    state, tpm = booted["state"], booted["tpm"]
    policy = {
        "version": 1,
        "name": "strict",
        "kernel_cmdlines": [{"exact": "root=/dev/sda1 ro quiet"}],
        "pcrs": {"sha256": {"0": "00" * 32, "7": "11" * 32}},
    }
    r = service.call("PUT", "/v1/policies/strict", service.admin, json={"policy": policy})
    assert r.status_code == 200, r.text
    service.call(
        "PUT", f"/v1/attesters/{state.attester_id}/policy", service.admin, json={"policy": "strict"}
    )
    try:
        result = attest(service, tpm, state, booted["log"])
    finally:
        service.call(
            "PUT",
            f"/v1/attesters/{state.attester_id}/policy",
            service.admin,
            json={"policy": "golden"},
        )
    assert result["status"] == "contraindicated"
    failures = {f["rule"]: f for f in result["report"]["failures"]}
    assert sorted(failures) == ["kernel_cmdline", "pcrs.sha256.0", "pcrs.sha256.7"]
    cmdline = failures["kernel_cmdline"]
    assert cmdline["event"]["pcr"] in (8, 9, 12) and cmdline["event"]["type"] == "EV_IPL"
    assert cmdline["expected"] == "'root=/dev/sda1 ro quiet'", cmdline
    assert cmdline["actual"] == "'root=/dev/vda ro'", cmdline
    assert failures["pcrs.sha256.7"]["expected"] == "11" * 32
    # the EAR carries the same failures
    jwks = service.call("GET", "/.well-known/jwks.json").json()
    ear = verify_result(result["ear"], jwks)
    sub = ear.submods["vtpm-boot"]
    assert sub.status == "contraindicated"
    assert sub.policy_id is not None and sub.policy_id.startswith("policy:strict@sha256:")
    in_ear = {f["rule"]: f for f in sub.failures}
    assert sorted(in_ear) == sorted(failures)
    assert in_ear["kernel_cmdline"]["event"].startswith(f"event {cmdline['event']['index']} (")
    assert in_ear["kernel_cmdline"]["actual"] == cmdline["actual"]
    # `vtpm check` (CI) lists every failing rule with its event, expected and actual
    token = tmp_path / "reader.token"
    token.write_text(service.reader)
    check = vtpm(
        "check", "--verifier", service.url, "--attester", state.attester_id,
        "--token-file", str(token),
    )  # fmt: skip
    assert check.returncode == 1, check.stdout + check.stderr
    ev = cmdline["event"]
    assert (
        f"rule kernel_cmdline: event {ev['index']} (EV_IPL, PCR {ev['pcr']}): "
        "kernel command line not allowed (expected 'root=/dev/sda1 ro quiet', "
        "got 'root=/dev/vda ro')"
    ) in check.stdout, check.stdout
    assert "rule pcrs.sha256.7: sha256 PCR 7 value (expected 1111" in check.stdout
    # the policy is still assigned elsewhere: it cannot be deleted while in use
    assert service.call("DELETE", "/v1/policies/golden", service.admin).status_code == 409
    assert service.call("DELETE", "/v1/policies/strict", service.admin).status_code == 204


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        pytest.param(
            {"pcrs": {"sha256": {"0": "00" * 32}}}, r"policy\.version", id="fail/policy/no-version"
        ),
        pytest.param(
            {"version": 1, "pcrs": {"sha256": {"0": "zz"}}},
            r"policy\.pcrs\.sha256\.0",
            id="fail/policy/bad-hex",
        ),
        pytest.param({"version": 1}, r"no rules", id="fail/policy/empty"),
        pytest.param(
            {"version": 1, "require_event_log": True},
            r"require_event_log",
            id="fail/policy/interim",
        ),
    ],
)
def test_bad_policies_are_refused(service: Service, body: dict[str, Any], pattern: str) -> None:
    r = service.call("PUT", "/v1/policies/bad", service.admin, json={"policy": body})
    problem(r, 400, pattern)
    assert service.call("GET", "/v1/policies/bad", service.reader).status_code == 404


@pytest.fixture(scope="module")
def plain(service: Service, tpm_factory: TpmFactory) -> dict[str, Any]:
    """An enrolled TPM without policy (verdict: warning)."""
    tpm = tpm_factory()
    return {"tpm": tpm, "state": register(service, tpm, vm_id="vm-plain")}


def problem(resp: requests.Response, status: int, pattern: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/problem+json"
    body = resp.json()
    assert body["status"] == status
    import re

    assert re.search(pattern, body["detail"]), body["detail"]


@pytest.mark.parametrize(
    ("case", "status", "pattern"),
    [
        pytest.param("missing-token", 401, "missing Authorization", id="fail/auth/missing-token"),
        pytest.param("wrong-token", 401, "unknown token", id="fail/auth/wrong-token"),
        pytest.param("reader-writes", 403, "needs a admin token", id="fail/auth/reader-writes"),
        pytest.param("admin-submits", 403, "needs a attester token", id="fail/auth/admin-submits"),
        pytest.param("other-attester", 403, "only acts for its own", id="fail/auth/other-attester"),
        pytest.param("malformed-json", 400, "malformed JSON", id="fail/body/malformed-json"),
        pytest.param(
            "bad-base64", 400, r"EvidenceRequest\.quote.*bad base64", id="fail/body/bad-base64"
        ),
        pytest.param(
            "bad-pcr", 400, r"pcrs\.sha256\.0.*expected 32", id="fail/body/bad-pcr-length"
        ),
        pytest.param("oversized", 413, "", id="fail/body/oversized"),
        # found by the soak (issue 18): both were a 500 / a silently truncated body
        pytest.param("oversized-chunked", 413, "", id="fail/body/oversized-chunked"),
        pytest.param("deep-json", 400, "nested too deeply", id="fail/body/deep-json"),
        pytest.param("unknown-attester", 404, "not registered", id="fail/attester/unknown"),
        pytest.param("unknown-nonce", 404, "unknown nonce", id="fail/nonce/unknown"),
        pytest.param("replayed", 409, "nonce already used", id="fail/nonce/replayed"),
        pytest.param("expired", 410, "nonce expired", id="fail/nonce/expired"),
        pytest.param("garbage-quote", 400, "TPMS_ATTEST", id="fail/quote/garbage"),
    ],
)
def test_bad_requests(
    service: Service,
    plain: dict[str, Any],
    booted: dict[str, Any],
    case: str,
    status: int,
    pattern: str,
) -> None:
    state, tpm = plain["state"], plain["tpm"]
    aid = state.attester_id
    if case == "missing-token":
        resp = service.call("GET", "/v1/attesters")
    elif case == "wrong-token":
        resp = service.call("GET", "/v1/attesters", "not-a-token")
    elif case == "reader-writes":
        resp = service.call(
            "POST", "/v1/policies", service.reader, json={"name": "x", "policy": "a"}
        )
    elif case == "admin-submits":
        resp = service.call("POST", f"/v1/attesters/{aid}/evidence", service.admin, json={})
    elif case == "other-attester":
        resp = service.call("POST", f"/v1/attesters/{aid}/challenges", booted["state"].token)
    elif case == "malformed-json":
        resp = service.call(
            "POST", f"/v1/attesters/{aid}/evidence", state.token, data=b'{"nonce": '
        )
    elif case == "bad-base64":
        ev = make_evidence(service, tpm, state)
        resp = submit(service, state, {**ev, "quote": "@@not base64@@"})
    elif case == "bad-pcr":
        ev = make_evidence(service, tpm, state)
        resp = submit(service, state, {**ev, "pcrs": {"sha256": {"0": "00"}}})
    elif case == "oversized":
        # the evidence route's limit: max_body_bytes plus room for an IMA delta
        limit = load_config(service.home).evidence_max_body_bytes
        resp = submit(service, state, {"nonce": "A" * (limit + 1024)})
    elif case == "oversized-chunked":
        # no Content-Length: werkzeug stops reading at the limit without a word; the
        # first `limit` bytes of this body are well-formed JSON, and must not be parsed
        limit = load_config(service.home).evidence_max_body_bytes
        head = b'{"nonce": "' + b"A" * (limit - 13) + b'"}'
        chunks = (head[i : i + 65536] for i in range(0, len(head), 65536))
        resp = service.call(
            "POST", f"/v1/attesters/{aid}/evidence", state.token, data=iter([*chunks, b" " * 4096])
        )
    elif case == "deep-json":
        resp = service.call(
            "POST", f"/v1/attesters/{aid}/evidence", state.token, data=b"[" * 100_000
        )
    elif case == "unknown-attester":
        resp = service.call("GET", "/v1/attesters/does-not-exist", service.admin)
    elif case == "unknown-nonce":
        ev = make_evidence(service, tpm, state)
        resp = submit(service, state, {**ev, "nonce": b64(b"\x01" * 32)})
    elif case == "replayed":
        ev = make_evidence(service, tpm, state)
        assert submit(service, state, ev).status_code == 200
        resp = submit(service, state, ev)
    elif case == "expired":
        ev = make_evidence(service, tpm, state)
        time.sleep(3.2)  # the test home's nonce lifetime is 3 s
        resp = submit(service, state, ev)
    elif case == "garbage-quote":
        ev = make_evidence(service, tpm, state)
        resp = submit(service, state, {**ev, "quote": b64(b"\xff\x54\x43\x47" + b"\x00" * 5)})
        # nothing half-written: the nonce was not consumed by the bad request
        assert submit(service, state, ev).status_code == 200
    else:  # pragma: no cover
        raise AssertionError(case)
    problem(resp, status, pattern)


def test_wrong_nonce_in_quote_is_contraindicated(service: Service, plain: dict[str, Any]) -> None:
    state, tpm = plain["state"], plain["tpm"]
    ev = make_evidence(service, tpm, state)
    with TpmAttester.open(tpm.endpoint.tcti) as att:
        other = att.quote(b"\x07" * 32, {"sha256": list(range(8))})
    resp = submit(
        service, state, {**ev, "quote": b64(other.attest), "signature": b64(other.signature)}
    )
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["status"] == "contraindicated"
    assert result["report"]["failures"][0]["rule"] == "quote.nonce"


def test_activation_failures(service: Service, tpm_factory: TpmFactory) -> None:
    tpm = tpm_factory()
    with TpmAttester.open(tpm.endpoint.tcti) as att:
        _, ek = att.ek()
        _, ak = att.ak()
        cert = att.ek_certificate()
    body = {
        "ek_certificate": b64(cert),
        "ek_public": b64(ek),
        "ak_public": b64(ak),
        "vm_id": "vm-x",
    }
    reg = service.call("POST", "/v1/attesters", json=body)
    assert reg.status_code == 201, reg.text
    aid = reg.json()["attester_id"]
    # evidence before activation: no token exists yet, and no challenge is issued
    problem(service.call("POST", f"/v1/attesters/{aid}/evidence", json={}), 401, "missing")
    problem(
        service.call("POST", f"/v1/attesters/{aid}/challenges", service.admin), 409, "not activated"
    )
    # wrong secret
    problem(
        service.call("POST", f"/v1/attesters/{aid}/activation", json={"secret": b64(b"x" * 32)}),
        403,
        "secret does not match",
    )
    # bare EK public without admin token: refused; a non-restricted "AK" refused
    problem(
        service.call("POST", "/v1/attesters", json={**body, "ek_certificate": None}),
        422,
        "only accepted from the admin",
    )
    problem(
        service.call("POST", "/v1/attesters", json={**body, "ak_public": b64(ek)}),
        422,
        "ak.attributes: AK lacks sign",
    )
    # a CA certificate presented as the EK certificate; an EK cert from an untrusted CA
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from verifier.service.appraiser import parse_public

    issuer = x509.load_pem_x509_certificate(
        (service.home / "intermediates" / "issuer.pem").read_bytes()
    )
    ca_der = issuer.public_bytes(serialization.Encoding.DER)
    problem(
        service.call("POST", "/v1/attesters", json={**body, "ek_certificate": b64(ca_der)}),
        422,
        "must not be a CA",
    )
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rogue EK CA")])
    now = datetime.datetime.now(datetime.UTC)
    rogue = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(name)
        .public_key(parse_public(ek, "ek").key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(rogue_key, hashes.SHA256())
    )
    problem(
        service.call(
            "POST",
            "/v1/attesters",
            json={**body, "ek_certificate": b64(rogue.public_bytes(serialization.Encoding.DER))},
        ),
        422,
        "chain|anchor|issuer",
    )


def test_lineage_shared_ek_and_ak_swap(service: Service, tpm_factory: TpmFactory) -> None:
    tpm = tpm_factory()
    a = register(service, tpm, vm_id="vm-a")
    b = register(service, tpm, vm_id="vm-b")  # a copied vTPM: same EK, another VM
    assert a.attester_id != b.attester_id
    for s in (a, b):
        view = service.call("GET", f"/v1/attesters/{s.attester_id}", service.admin).json()
        assert view["status"] == "flagged"
        assert [f["flag"] for f in view["flags"]] == ["ek-shared"]
    result = attest(service, tpm, a)
    assert result["status"] == "contraindicated"
    assert result["report"]["flags"][0]["flag"] == "ek-shared"
    jwks = service.call("GET", "/.well-known/jwks.json").json()
    ear = verify_result(result["ear"], jwks, expected_nonce=bytes.fromhex(result["nonce"]))
    assert ear.status == "contraindicated"
    assert [f["rule"] for f in ear.submods["vtpm-boot"].failures] == ["lineage.ek-shared"]

    # AK swap: evidence names an AK other than the activated one
    tpm2 = tpm_factory()
    c = register(service, tpm2, vm_id="vm-c")
    ev = make_evidence(service, tpm2, c)
    with TpmAttester.open(tpm.endpoint.tcti) as att:
        _, foreign_ak = att.ek()
    resp = submit(service, c, {**ev, "ak_public": b64(foreign_ak)})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "contraindicated"
    assert [f["flag"] for f in resp.json()["report"]["new_flags"]] == ["ak-not-activated"]


def test_lineage_snapshot_revert(service: Service, ek_ca, tmp_path: Path) -> None:
    from tests.verifier.service.conftest import provision_tpm

    state_dir = provision_tpm(ek_ca, tmp_path / "tpm")
    snapshot = tmp_path / "snapshot"
    shutil.copytree(state_dir, snapshot)
    with SwtpmProcess(state_dir) as tpm:
        s = register(service, tpm, vm_id="vm-revert")
        first = attest(service, tpm, s)
    with SwtpmProcess(state_dir) as tpm:  # a reboot: resetCount goes up
        second = attest(service, tpm, s)
    assert second["report"]["clock"]["reset_count"] > first["report"]["clock"]["reset_count"]
    assert second["report"]["flags"] == []
    shutil.rmtree(state_dir)
    shutil.copytree(snapshot, state_dir)  # revert the vTPM to its snapshot
    with SwtpmProcess(state_dir) as tpm:
        reverted = attest(service, tpm, s)
    assert reverted["status"] == "contraindicated"
    assert reverted["report"]["appraisal_status"] == "warning"  # the quote itself is fine
    assert [f["flag"] for f in reverted["report"]["new_flags"]] == ["reset-count-regressed"]
    # the EAR carries the flag as a failure and an untrustworthy instance
    jwks = service.call("GET", "/.well-known/jwks.json").json()
    sub = verify_result(reverted["ear"], jwks).submods["vtpm-boot"]
    assert sub.status == "contraindicated" and sub.trust_vector.instance_identity == 96
    assert [f["rule"] for f in sub.failures] == ["lineage.reset-count-regressed"]
    view = service.call("GET", f"/v1/attesters/{s.attester_id}", service.reader).json()
    assert view["status"] == "flagged"
    # reverted once more: flagged again in that result, but the attester keeps
    # one flag of each kind (its row, and every later EAR, does not grow per request)
    shutil.rmtree(state_dir)
    shutil.copytree(snapshot, state_dir)
    with SwtpmProcess(state_dir) as tpm:
        again = attest(service, tpm, s)
    assert again["status"] == "contraindicated"
    assert [f["flag"] for f in again["report"]["new_flags"]] == ["reset-count-regressed"]
    assert [f["flag"] for f in again["report"]["flags"]] == ["reset-count-regressed"] * 2
    view = service.call("GET", f"/v1/attesters/{s.attester_id}", service.reader).json()
    assert [f["flag"] for f in view["flags"]] == ["reset-count-regressed"]


def test_concurrent_submissions_of_one_nonce(service: Service, plain: dict[str, Any]) -> None:
    state, tpm = plain["state"], plain["tpm"]
    ev = make_evidence(service, tpm, state)
    body = json.dumps(ev).encode()

    def post(_: int) -> int:
        return requests.post(
            f"{service.url}/v1/attesters/{state.attester_id}/evidence",
            data=body,
            headers={"Authorization": f"Bearer {state.token}", "Content-Type": "application/json"},
            timeout=60,
        ).status_code

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(post, range(50)))
    assert codes.count(200) == 1, codes
    assert codes.count(409) == 49, codes


def test_metrics_health_openapi(service: Service) -> None:
    assert service.call("GET", "/healthz").json() == {"status": "ok"}
    text = service.call("GET", "/metrics").text
    assert "vtpm_verifier_http_requests_total" in text
    spec = service.call("GET", "/openapi.json").json()
    assert "/v1/attesters/{attester_id}/evidence" in spec["paths"]


def test_two_verifiers_share_one_database(service: Service, plain: dict[str, Any]) -> None:
    """Two verifier processes (PostgreSQL; SQLite on one host too) serve the same attesters."""
    second = Server(service.home, service.db_url, workers=1).start()
    try:
        state, tpm = plain["state"], plain["tpm"]
        ev = make_evidence(service, tpm, state)  # challenge from the first verifier
        resp = requests.post(  # answered to the second
            f"{second.url}/v1/attesters/{state.attester_id}/evidence",
            json=ev,
            headers={"Authorization": f"Bearer {state.token}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["report"]["quote_verified"] is True
        # and the first sees the second's result
        view = service.call("GET", f"/v1/attesters/{state.attester_id}", service.reader).json()
        assert view["latest_result"]["id"] == resp.json()["id"]
        # a replay at the first verifier is refused
        problem(submit(service, state, ev), 409, "already used")
    finally:
        second.stop()


def _ek_cert_with_vm_identity(ca_dir: Path, template_der: bytes, vm_id: uuid.UUID) -> bytes:
    """Re-issue the swtpm EK certificate from the same local CA, adding our VM identity extension
    (what the project's CA writes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from vtpm_core.vm_identity import VM_IDENTITY_OID, VmIdentity

    key = serialization.load_pem_private_key((ca_dir / "signkey.pem").read_bytes(), None)
    tmpl = x509.load_der_x509_certificate(template_der)
    builder = (
        x509.CertificateBuilder()
        .subject_name(tmpl.subject)
        .issuer_name(tmpl.issuer)
        .public_key(tmpl.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(tmpl.not_valid_before_utc)
        .not_valid_after(tmpl.not_valid_after_utc)
    )
    for ext in tmpl.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    ident = VmIdentity.build(vm_id, "ci-runner", "vtpm-1", datetime.datetime.now(datetime.UTC))
    builder = builder.add_extension(
        x509.UnrecognizedExtension(x509.ObjectIdentifier(str(VM_IDENTITY_OID)), ident.to_bytes()),
        critical=False,
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def test_vm_identity_from_the_ek_certificate(service: Service, tpm_factory: TpmFactory) -> None:
    """The VM id comes from the EK certificate; the same EK certified for two VMs is flagged."""
    tpm = tpm_factory()
    with TpmAttester.open(tpm.endpoint.tcti) as att:
        _, ek = att.ek()
        _, ak = att.ak()
        original = att.ek_certificate()
    vm1, vm2 = uuid.uuid4(), uuid.uuid4()
    ca_dir = service.ca.root.parent
    body = {"ek_public": b64(ek), "ak_public": b64(ak)}
    cert1 = _ek_cert_with_vm_identity(ca_dir, original, vm1)
    r1 = service.call("POST", "/v1/attesters", json={**body, "ek_certificate": b64(cert1)})
    assert r1.status_code == 201, r1.text
    view = service.call("GET", f"/v1/attesters/{r1.json()['attester_id']}", service.admin).json()
    assert view["vm_id"] == str(vm1)
    assert view["identity"]["vm_identity"]["vm_name"] == "ci-runner"
    # a request claiming another VM than the certificate says is refused
    problem(
        service.call(
            "POST", "/v1/attesters", json={**body, "ek_certificate": b64(cert1), "vm_id": "other"}
        ),
        403,
        "contradicts the EK certificate's VM id",
    )
    cert2 = _ek_cert_with_vm_identity(ca_dir, original, vm2)
    r2 = service.call("POST", "/v1/attesters", json={**body, "ek_certificate": b64(cert2)})
    assert r2.status_code == 201, r2.text
    for r in (r1, r2):
        view = service.call("GET", f"/v1/attesters/{r.json()['attester_id']}", service.admin).json()
        assert view["status"] == "flagged"
        assert view["flags"][0]["flag"] == "ek-shared"


@pytest.mark.parametrize(
    ("case", "status", "pattern"),
    [
        pytest.param("challenge-unknown-token", 401, "unknown token", id="challenge/unknown-token"),
        pytest.param("challenge-reader", 403, "needs a attester/admin", id="challenge/reader"),
        pytest.param("challenge-other", 403, "only acts for its own", id="challenge/other"),
        pytest.param(
            "challenge-other-unknown-id", 403, "only acts for its own", id="challenge/no-attester"
        ),
        pytest.param("challenge-admin-unknown-id", 404, "not registered", id="challenge/admin-404"),
        pytest.param("evidence-unknown-token-bad-body", 401, "unknown token", id="evidence/401"),
        pytest.param("evidence-other-bad-body", 403, "only acts for its own", id="evidence/403"),
        pytest.param(
            "evidence-other-unknown-id", 403, "only acts for its own", id="evidence/no-id"
        ),
        pytest.param("evidence-reader", 403, "needs a attester token", id="evidence/reader"),
    ],
)
def test_hot_routes_authenticate_before_anything_else(
    service: Service,
    plain: dict[str, Any],
    booted: dict[str, Any],
    case: str,
    status: int,
    pattern: str,
) -> None:
    """Challenge and evidence check an attester token against the attester's row (no lookup
    of their own); whatever else is wrong, a bad token is still a 401/403, never a 400/404."""
    mine, other = plain["state"], booted["state"]
    aid, nobody = mine.attester_id, str(uuid.uuid4())
    challenges, evidence = f"/v1/attesters/{aid}/challenges", f"/v1/attesters/{aid}/evidence"
    if case == "challenge-unknown-token":
        resp = service.call("POST", challenges, "not-a-token")
    elif case == "challenge-reader":
        resp = service.call("POST", challenges, service.reader)
    elif case == "challenge-other":
        resp = service.call("POST", challenges, other.token)
    elif case == "challenge-other-unknown-id":
        resp = service.call("POST", f"/v1/attesters/{nobody}/challenges", other.token)
    elif case == "challenge-admin-unknown-id":
        resp = service.call("POST", f"/v1/attesters/{nobody}/challenges", service.admin)
    elif case == "evidence-unknown-token-bad-body":
        resp = service.call("POST", evidence, "not-a-token", data=b'{"nonce": ')
    elif case == "evidence-other-bad-body":
        resp = service.call("POST", evidence, other.token, data=b'{"nonce": ')
    elif case == "evidence-other-unknown-id":
        resp = service.call("POST", f"/v1/attesters/{nobody}/evidence", other.token, json={})
    elif case == "evidence-reader":
        resp = service.call("POST", evidence, service.reader, json={})
    else:  # pragma: no cover
        raise AssertionError(case)
    problem(resp, status, pattern)
    # the admin may ask a challenge for any attester (no attester token involved)
    ok = service.call("POST", challenges, service.admin)
    assert ok.status_code == 201, ok.text


def _registration_body(tpm: SwtpmProcess, vm_id: str) -> bytes:
    with TpmAttester.open(tpm.endpoint.tcti) as att:
        _, ek_public = att.ek()
        _, ak_public = att.ak()
        cert = att.ek_certificate()
    return json.dumps(
        {
            "ek_certificate": b64(cert),
            "ek_public": b64(ek_public),
            "ak_public": b64(ak_public),
            "vm_id": vm_id,
        }
    ).encode()


def _register_concurrently(service: Service, bodies: list[bytes]) -> list[requests.Response]:
    def post(body: bytes) -> requests.Response:
        return requests.post(
            f"{service.url}/v1/attesters",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_concurrent_registrations_make_one_attester(
    service: Service, tpm_factory: TpmFactory
) -> None:
    """One EK and VM id registered 12 times at once: one attester (unique index, migration
    0002, and the registration retried onto the row that won), activatable."""
    tpm = tpm_factory()
    vm_id = f"vm-race-{uuid.uuid4().hex[:8]}"
    answers = _register_concurrently(service, [_registration_body(tpm, vm_id)] * 12)
    assert [r.status_code for r in answers] == [201] * 12, [r.text for r in answers]
    assert len({r.json()["attester_id"] for r in answers}) == 1
    listed = service.call("GET", "/v1/attesters", service.admin).json()["attesters"]
    assert [a["vm_id"] for a in listed].count(vm_id) == 1
    # registering again (the last challenge counts) still activates and attests
    state = register(service, tpm, vm_id=vm_id)
    assert state.attester_id == answers[0].json()["attester_id"]
    assert attest(service, tpm, state)["status"] in ("warning", "affirming")


def test_concurrent_first_registrations_under_two_vm_ids_flag_both(
    service: Service, tpm_factory: TpmFactory
) -> None:
    """The same EK registered at once under two VM ids (a copied vTPM racing itself): both
    attesters exist and both are flagged ek-shared (registrations of one EK serialised)."""
    for _round in range(3):
        tpm = tpm_factory()
        tag = uuid.uuid4().hex[:8]
        bodies = [_registration_body(tpm, f"vm-{tag}-a"), _registration_body(tpm, f"vm-{tag}-b")]
        answers = _register_concurrently(service, bodies * 3)
        assert [r.status_code for r in answers] == [201] * 6, [r.text for r in answers]
        ids = {r.json()["attester_id"] for r in answers}
        assert len(ids) == 2
        for aid in ids:
            view = service.call("GET", f"/v1/attesters/{aid}", service.admin).json()
            assert view["status"] == "flagged", view
            assert [f["flag"] for f in view["flags"]] == ["ek-shared"]


# PostgreSQL only: SQLite has no server connections to drop
@pytest.mark.parametrize(
    "service", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_hot_paths_survive_dropped_database_connections(
    service: Service, plain: dict[str, Any]
) -> None:
    """PostgreSQL closes every connection of the service (as a restart would): the next
    attestations succeed (the hot pool has no pre-ping; its first statement retries once)."""
    assert service.backend == "postgres"
    import sqlalchemy

    assert service.db_url is not None
    engine = sqlalchemy.create_engine(service.db_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            dropped = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).scalar()
    finally:
        engine.dispose()
    assert dropped and dropped >= 1
    for _ in range(4):  # both workers, challenge and evidence each
        assert attest(service, plain["tpm"], plain["state"])["status"] in ("warning", "affirming")
