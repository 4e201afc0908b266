"""Incremental IMA appraisal through the HTTP evidence API (issue 14).

Real parts: swtpm TPMs (EK certificates from the test CA) whose PCR 10 is
extended, as the kernel does, with the entries of a published list
(tests/data/ima/embrave-rpi-ima-ng.ascii, 27 entries) in parts; the verifier
under gunicorn on SQLite and PostgreSQL; the attester's quote from
``verifier.attester``. The runtime policy is learned from the same list
(``verifier.ima.learn``) and embedded in the boot policy's ``runtime`` part.
The list's ``boot_aggregate`` was computed on a Raspberry Pi, not from this
swtpm's PCRs 0-9, so the policy lists its digest (what an operator does for
a TPM whose PCRs 0-9 the kernel read before a firmware update).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.verifier.service.conftest import EkCa, Server, Service, make_home, provision_tpm
from verifier.attester import AttesterState, TpmAttester, enroll, ima_start_index
from verifier.ear import verify_result
from verifier.ima.entries import ImaEntry
from verifier.ima.learn import build_policy, learn_from_entries
from verifier.ima.parse import parse_list
from vtpm_core.swtpm import SwtpmProcess

pytestmark = [pytest.mark.swtpm]

DATA = Path(__file__).resolve().parents[2] / "data" / "ima"
LEFT_OUT = "/etc/fstab"  # entry 26, measured once: the file "not in the policy"
DELTA_LIMIT = 12  # ima_max_delta_entries of this module's verifier


@pytest.fixture(scope="module")
def published() -> tuple[ImaEntry, ...]:
    entries = parse_list((DATA / "embrave-rpi-ima-ng.ascii").read_bytes())
    assert len(entries) == 27 and entries[26].path == LEFT_OUT
    return entries


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def ima_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ek_ca: EkCa
) -> Iterator[Service]:
    """The verifier with small IMA delta limits (and nonces that outlive a slow round)."""
    backend = request.param
    home = tmp_path_factory.mktemp(f"ima-home-{backend}")
    if not ek_ca.root.exists():
        provision_tpm(ek_ca, tmp_path_factory.mktemp("ca-bootstrap"))
    admin, reader = make_home(home, ek_ca, nonce_lifetime_s=60, ima_max_delta_entries=DELTA_LIMIT)
    db_url = request.getfixturevalue("pg_database")() if backend == "postgres" else None
    server = Server(home, db_url).start()
    try:
        yield Service(backend, home, db_url, admin, reader, server, ek_ca)
    finally:
        server.stop()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _extend(tpm: SwtpmProcess, entries: tuple[ImaEntry, ...]) -> None:
    """ima_pcr_extend for each entry: PCR 10's SHA-256 bank (the only bank these TPMs have)."""
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA

    with tpm.esapi() as esapi:
        for entry in entries:
            ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
            ha.digest.sha256 = entry.template_digest("sha256")
            esapi.pcr_extend(ESYS_TR.PCR10, TPML_DIGEST_VALUES([ha]))


def _binary(entries: tuple[ImaEntry, ...]) -> bytes:
    return b"".join(e.to_bytes() for e in entries)


def _policy_body(published: tuple[ImaEntry, ...], leave_out: str | None) -> str:
    learned = learn_from_entries(e for e in published if e.path != leave_out)
    runtime = build_policy(learned, name="rpi").to_dict()
    aggregate = published[0]
    runtime["digests"]["boot_aggregate"] = [f"{aggregate.digest_algo}:{aggregate.digest.hex()}"]
    # the boot part: these TPMs never measure into PCR 7 (all zeros)
    doc = {"version": 1, "name": "ima", "pcrs": {"sha256": {"7": "00" * 32}}, "runtime": runtime}
    return yaml.safe_dump(doc)


class Attester:
    """One swtpm-backed attester, enrolled, whose policy has a runtime part."""

    def __init__(self, service: Service, tpm: SwtpmProcess, state: AttesterState) -> None:
        self.service, self.tpm, self.state = service, tpm, state

    def challenge(self) -> dict[str, Any]:
        r = self.service.call(
            "POST", f"/v1/attesters/{self.state.attester_id}/challenges", self.state.token
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def evidence(
        self, delta: bytes | None, start: int | None = None, ch: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A quote for a fresh challenge and the delta from ``start`` (when None: the
        challenge's ``ima.next_index``, or 0 for a quote of another boot)."""
        ch = ch or self.challenge()
        with TpmAttester.open(self.tpm.endpoint.tcti) as att:
            q = att.quote(base64.b64decode(ch["nonce"]), ch["pcr_selection"])
        body: dict[str, Any] = {
            "nonce": ch["nonce"],
            "quote": _b64(q.attest),
            "signature": _b64(q.signature),
            "pcrs": q.pcrs,
        }
        if delta is not None:
            index = ima_start_index(ch["ima"], q.attest) if start is None else start
            body["ima"] = {"start_index": index, "entries": _b64(delta)}
        return body

    def submit(self, body: dict[str, Any]) -> requests.Response:
        return self.service.call(
            "POST", f"/v1/attesters/{self.state.attester_id}/evidence", self.state.token, json=body
        )

    def round(self, delta: bytes | None, start: int | None = None) -> dict[str, Any]:
        r = self.submit(self.evidence(delta, start))
        assert r.status_code == 200, r.text
        return dict(r.json())

    def stored(self) -> dict[str, Any] | None:
        view = self.service.call(
            "GET", f"/v1/attesters/{self.state.attester_id}", self.service.reader
        ).json()
        return view["ima"]  # type: ignore[no-any-return]


AttesterFactory = Callable[[str | None], Attester]


@pytest.fixture
def make_attester(
    ima_service: Service,
    tpm_factory: Callable[[], SwtpmProcess],
    published: tuple[ImaEntry, ...],
) -> AttesterFactory:
    def make(leave_out: str | None = LEFT_OUT) -> Attester:
        tpm = tpm_factory()
        with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
            state = enroll(http, ima_service.url, att)
        name = f"ima-{state.attester_id[:8]}"
        r = ima_service.call(
            "PUT",
            f"/v1/policies/{name}",
            ima_service.admin,
            json={"policy": _policy_body(published, leave_out)},
        )
        assert r.status_code == 200, r.text
        r = ima_service.call(
            "PUT",
            f"/v1/attesters/{state.attester_id}/policy",
            ima_service.admin,
            json={"policy": name},
        )
        assert r.status_code == 200, r.text
        return Attester(ima_service, tpm, state)

    return make


def test_rounds_affirm_then_an_unlisted_file_is_named(
    ima_service: Service, make_attester: AttesterFactory, published: tuple[ImaEntry, ...]
) -> None:
    a = make_attester(LEFT_OUT)
    ch = a.challenge()
    assert set(ch["pcr_selection"]["sha256"]) >= set(range(11))  # PCR 10 (and 0-9) quoted
    assert ch["ima"] == {"next_index": 0, "reset_count": None, "restart_count": None}
    for lo, hi in ((0, 10), (10, 20)):
        _extend(a.tpm, published[lo:hi])
        result = a.round(_binary(published[lo:hi]))
        assert result["status"] == "affirming", result["report"]["failures"]
        ima = result["report"]["ima"]
        assert (ima["start_index"], ima["proven"], ima["pending"]) == (lo, hi - lo, 0)
        assert ima["next_index"] == hi and ima["state_stored"] is True
        assert ima["new_boot"] is (lo == 0)
        stored = a.stored()
        assert stored is not None and stored["entry_count"] == hi  # in the database
    assert a.challenge()["ima"]["next_index"] == 20
    # nothing new measured: an empty delta (or none) proves the same PCR 10
    assert a.round(b"")["status"] == "affirming"
    assert a.round(None)["status"] == "affirming"

    # /etc/fstab is not in the learned policy
    _extend(a.tpm, published[20:])
    bad = a.round(_binary(published[20:]))
    assert bad["status"] == "contraindicated" and bad["state"] == "failed"
    failures = [f for f in bad["report"]["failures"] if f["rule"] == "ima.entry"]
    assert [f["entry"]["path"] for f in failures] == [LEFT_OUT]
    entry = failures[0]["entry"]
    assert entry["index"] == 26 and entry["template"] == "ima-ng"
    assert entry["reason"] == "path not in the policy" and entry["expected"] == []
    assert entry["actual"] == f"sha256:{published[26].digest.hex()}"
    assert LEFT_OUT in failures[0]["message"] and "entry 26" in failures[0]["message"]
    assert bad["report"]["trust_vector"]["executables"] == 96
    assert bad["report"]["ima"]["state_stored"] is False
    assert bad["report"]["ima"]["next_index"] == 20
    # the EAR names it too, offline
    jwks = ima_service.call("GET", "/.well-known/jwks.json").json()
    sub = verify_result(bad["ear"], jwks).submods["vtpm-boot"]
    named = [f for f in sub.failures if f["rule"] == "ima.entry"]
    assert named[0]["ima_path"] == LEFT_OUT and named[0]["ima_index"] == "26"
    assert named[0]["ima_template"] == "ima-ng"
    # the state did not move: the next round appraises the same entries again
    stored = a.stored()
    assert stored is not None and stored["entry_count"] == 20
    again = a.round(_binary(published[20:]))
    assert again["status"] == "contraindicated"
    assert [f["path"] for f in again["report"]["ima"]["failures"]] == [LEFT_OUT]


def test_gap_reorder_and_replayed_suffix_are_refused(
    make_attester: AttesterFactory, published: tuple[ImaEntry, ...]
) -> None:
    a = make_attester(None)
    _extend(a.tpm, published[:10])
    assert a.round(_binary(published[:10]))["status"] == "affirming"
    _extend(a.tpm, published[10:20])
    part = published[10:20]

    def refused_409(delta: bytes, start: int, match: str) -> None:
        r = a.submit(a.evidence(delta, start))
        assert r.status_code == 409, r.text
        assert r.headers["Content-Type"] == "application/problem+json"
        assert match in r.json()["detail"], r.json()["detail"]

    def contraindicated(delta: bytes, start: int) -> dict[str, Any]:
        result = a.round(delta, start)
        assert result["status"] == "contraindicated"
        assert "ima.pcr10" in [f["rule"] for f in result["report"]["failures"]]
        assert result["report"]["ima"]["state_stored"] is False
        return result

    # a gap: entry 10 left out, honestly numbered (409) or claimed to start at 10
    refused_409(_binary(part[1:]), 11, "starts at entry 11, the verified list stands at entry 10")
    contraindicated(_binary(part[1:]), 10)
    # reordered
    contraindicated(_binary((part[1], part[0], *part[2:])), 10)
    # a replayed suffix: the verified entries again, as new ones or as themselves
    contraindicated(_binary(published[:10]), 10)
    refused_409(_binary(published[:20]), 0, "stands at entry 10")
    # a forged entry (its template hash no longer matches its data)
    forged = bytearray(_binary(part))
    forged[60] ^= 1  # inside the first entry's file digest
    result = a.round(bytes(forged), 10)
    assert result["status"] == "contraindicated"
    assert result["report"]["ima"]["appraised"] is False
    # none of it moved the stored state; the honest delta still passes
    stored = a.stored()
    assert stored is not None and stored["entry_count"] == 10
    ok = a.round(_binary(part))
    assert ok["status"] == "affirming" and ok["report"]["ima"]["next_index"] == 20


def test_list_ahead_of_the_quote_leaves_entries_pending(
    make_attester: AttesterFactory, published: tuple[ImaEntry, ...]
) -> None:
    """IMA appends an entry before it extends PCR 10: a list read after the quote may hold
    entries the quote does not cover yet; they are not appraised and are sent again."""
    a = make_attester(None)
    _extend(a.tpm, published[:8])
    result = a.round(_binary(published[:10]))
    ima = result["report"]["ima"]
    assert result["status"] == "affirming"
    assert (ima["proven"], ima["pending"], ima["next_index"]) == (8, 2, 8)


def test_reboot_starts_a_new_list(
    ima_service: Service,
    ek_ca: EkCa,
    tmp_path: Path,
    published: tuple[ImaEntry, ...],
    make_attester: AttesterFactory,
) -> None:
    a = make_attester(None)
    _extend(a.tpm, published[:12])
    first = a.round(_binary(published[:12]))
    assert first["status"] == "affirming"
    reset = first["report"]["clock"]["reset_count"]
    a.tpm.stop()  # a reboot: the TPM resets (resetCount up, PCR 10 zero), the list restarts
    a.tpm.start()
    ch = a.challenge()
    assert ch["ima"] == {"next_index": 12, "reset_count": reset, "restart_count": 0}
    _extend(a.tpm, published[:5])
    # the old index belongs to the old boot: this boot's list stands at 0
    r = a.submit(a.evidence(_binary(published[12:]), 12, ch))
    assert r.status_code == 409 and "stands at entry 0" in r.json()["detail"], r.text
    again = a.round(_binary(published[:5]), 0)
    assert again["status"] == "affirming", again["report"]["failures"]
    assert again["report"]["clock"]["reset_count"] > reset
    assert again["report"]["ima"]["new_boot"] is True
    stored = a.stored()
    assert stored is not None and stored["entry_count"] == 5
    assert stored["reset_count"] == again["report"]["clock"]["reset_count"]
    # a TPM Restart (Shutdown(STATE), then Startup(CLEAR)): resetCount stays, restartCount
    # goes up and the PCRs are reset (TPM 2.0 Part 1, 36.6): a new list as well
    from tpm2_pytss import TPM2_SU

    with a.tpm.esapi() as esapi:
        esapi.shutdown(TPM2_SU.STATE)
    a.tpm.stop()
    a.tpm.start()
    _extend(a.tpm, published[:3])
    r = a.submit(a.evidence(_binary(published[5:]), 5))
    assert r.status_code == 409 and "stands at entry 0" in r.json()["detail"], r.text
    restarted = a.round(_binary(published[:3]))  # the quote's restartCount: from 0
    assert restarted["status"] == "affirming", restarted["report"]["failures"]
    clock = restarted["report"]["clock"]
    assert clock["reset_count"] == stored["reset_count"] and clock["restart_count"] == 1
    assert restarted["report"]["ima"]["new_boot"] is True
    stored = a.stored()
    assert stored is not None and (stored["entry_count"], stored["restart_count"]) == (3, 1)


def test_racing_evidences_extend_the_state_once(
    make_attester: AttesterFactory, published: tuple[ImaEntry, ...]
) -> None:
    a = make_attester(None)
    _extend(a.tpm, published[:10])
    bodies = [json.dumps(a.evidence(_binary(published[:10]), 0)).encode() for _ in range(6)]

    def post(body: bytes) -> int:
        return requests.post(
            f"{a.service.url}/v1/attesters/{a.state.attester_id}/evidence",
            data=body,
            headers={
                "Authorization": f"Bearer {a.state.token}",
                "Content-Type": "application/json",
            },
            timeout=60,
        ).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(post, bodies))
    assert sorted(codes) == [200] + [409] * 5, codes
    stored = a.stored()
    assert stored is not None and stored["entry_count"] == 10


def test_bad_deltas_are_4xx_naming_the_entry(
    ima_service: Service, make_attester: AttesterFactory, published: tuple[ImaEntry, ...]
) -> None:
    a = make_attester(None)
    _extend(a.tpm, published[:10])
    binary = _binary(published[:10])
    cut = binary[: len(binary) - 7]  # the last entry truncated
    r = a.submit(a.evidence(cut, 0))
    assert r.status_code == 400, r.text
    assert "ima_entry[9]" in r.json()["detail"] and "at byte" in r.json()["detail"]
    too_many = _binary(published[: DELTA_LIMIT + 1])
    r = a.submit(a.evidence(too_many, 0))
    assert r.status_code == 400 and f"{DELTA_LIMIT}-entry limit" in r.json()["detail"], r.text
    # a delta past max_body_bytes (1 MiB) still reaches the parser on this route
    big = binary + b"\x0a\x00\x00\x00" + bytes(3 << 19)
    r = a.submit(a.evidence(big, 0))
    assert r.status_code == 400 and "ima_entry[10]" in r.json()["detail"], r.text
    body = a.evidence(binary, 0)
    body["ima"]["start_index"] = -1
    r = a.submit(body)
    assert r.status_code == 400 and "ima.start_index" in r.json()["detail"], r.text
    body["ima"] = {"start_index": 0, "entries": "not base64!"}
    r = a.submit(body)
    assert r.status_code == 400 and "ima.entries" in r.json()["detail"], r.text
    # the nonce of a refused (4xx) evidence is not used up: the good delta still passes
    body["ima"] = {"start_index": 0, "entries": _b64(binary)}
    assert a.submit(body).status_code == 200
    # a quote without PCR 10 proves no list
    ch = a.challenge()
    ch["pcr_selection"] = {"sha256": list(range(8))}
    result = a.submit(a.evidence(b"", 10, ch)).json()
    assert result["status"] == "contraindicated"
    rules = [f["rule"] for f in result["report"]["failures"]]
    assert "ima.pcr10" in rules and "quote.pcr_select" in rules


@pytest.mark.parametrize(
    ("runtime", "match"),
    [
        (
            {"version": 1, "digests": {"/bin/sh": ["sha256:00"]}},
            'policy.runtime.digests["/bin/sh"][0]',
        ),
        ({"version": 2}, "policy.runtime.version"),
        ({"version": 1, "digests": {}}, "policy.runtime: runtime policy has no rules"),
        ({"version": 1, "meta": {}}, "Keylime runtime policy"),
        ([], "policy.runtime: expected an object"),
    ],
    ids=["bad-digest", "bad-version", "no-rules", "keylime", "not-a-mapping"],
)
def test_bad_runtime_parts_are_refused_at_upload(
    ima_service: Service, runtime: Any, match: str
) -> None:
    doc = {"version": 1, "pcrs": {"sha256": {"7": "00" * 32}}, "runtime": runtime}
    r = ima_service.call("PUT", "/v1/policies/bad-ima", ima_service.admin, json={"policy": doc})
    assert r.status_code == 400 and match in r.json()["detail"], r.text
    only = {"version": 1, "runtime": {"version": 1, "excludes": ["/tmp/.*"]}}
    r = ima_service.call("PUT", "/v1/policies/bad-ima", ima_service.admin, json={"policy": only})
    assert r.status_code == 400 and "has only a runtime part" in r.json()["detail"], r.text


def test_agent_sends_only_new_entries_from_its_list_file(
    make_attester: AttesterFactory, published: tuple[ImaEntry, ...], tmp_path: Path
) -> None:
    """``Agent.ima_delta``: the list as the kernel shows it (a file here), read from where
    the last delta began or ended, only the entries the verifier has not verified sent."""
    from verifier.agent import Agent, AgentConfig

    a = make_attester(LEFT_OUT)
    listing = tmp_path / "binary_runtime_measurements"
    cfg = AgentConfig(
        url=a.service.url,
        tcti=a.tpm.endpoint.tcti,
        state_file=None,
        token=a.state.token,
        attester_id=a.state.attester_id,
        ima_list=listing,
    )
    agent = Agent(cfg, sleep=lambda _s: None)

    def sent() -> tuple[int, int]:
        """(start_index, entries received) of the latest evidence, as the verifier saw it."""
        results = a.service.call(
            "GET", f"/v1/attesters/{a.state.attester_id}/results?limit=1", a.service.reader
        ).json()["results"]
        ima = results[0]["report"]["ima"]
        return ima["start_index"], ima["received"]

    try:
        for lo, hi in ((0, 12), (12, 20)):
            _extend(a.tpm, published[lo:hi])
            listing.write_bytes(_binary(published[:hi]))
            assert agent.round().status == "affirming"
            assert sent() == (lo, hi - lo)
        # /etc/fstab: refused, and sent again (the verifier still stands at 20)
        _extend(a.tpm, published[20:])
        listing.write_bytes(_binary(published))
        for _ in range(2):
            assert agent.round().status == "contraindicated"
            assert sent() == (20, 7)
        # a reboot: resetCount up, PCR 10 and the list start over (the agent with them)
        a.tpm.stop()
        a.tpm.start()
        agent.close()
        agent = Agent(dataclasses.replace(cfg, tcti=a.tpm.endpoint.tcti), sleep=lambda _s: None)
        _extend(a.tpm, published[:6])
        listing.write_bytes(_binary(published[:6]))
        assert agent.round().status == "affirming"
        assert sent() == (0, 6)
        # the list unreadable: a fault of kind ima_list
        listing.unlink()
        outcome = agent.round()
        assert (outcome.fault, outcome.fault_kind) == ("tpm", "ima_list")
        assert "unreadable" in (outcome.detail or "")
    finally:
        agent.close()


def test_vtpm_attest_ima_list(
    ima_service: Service,
    make_attester: AttesterFactory,
    published: tuple[ImaEntry, ...],
    tmp_path: Path,
) -> None:
    """``vtpm attest --ima-list FILE`` (here the ASCII form) sends the entries after the
    verified ones: the whole list first, then only what was added."""
    import subprocess
    import sys

    from tests.verifier.service.conftest import REPO

    a = make_attester(None)
    token_file = tmp_path / "attester.json"
    a.state.save(token_file)
    listing = tmp_path / "ascii_runtime_measurements"

    def run() -> dict[str, Any]:
        args = ["attest", "--verifier", a.service.url, "--tpm", a.tpm.endpoint.tcti]
        args += ["--token-file", str(token_file), "--ima-list", str(listing), "--json"]
        proc = subprocess.run(
            [sys.executable, "-m", "vtpm_cli.main", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return dict(json.loads(proc.stdout))

    for hi in (9, 20):
        lo = 0 if hi == 9 else 9
        _extend(a.tpm, published[lo:hi])
        listing.write_text("".join(e.to_ascii() + "\n" for e in published[:hi]))
        result = run()
        assert result["status"] == "affirming"
        ima = result["report"]["ima"]
        assert (ima["start_index"], ima["received"], ima["next_index"]) == (lo, hi - lo, hi)


def test_a_changed_runtime_policy_appraises_the_list_again(
    ima_service: Service, make_attester: AttesterFactory, published: tuple[ImaEntry, ...]
) -> None:
    """Entries verified under one runtime policy are not taken as verified under another:
    the challenge asks for the list from entry 0 again."""
    a = make_attester(None)
    _extend(a.tpm, published[:10])
    assert a.round(_binary(published[:10]))["status"] == "affirming"
    assert a.challenge()["ima"]["next_index"] == 10
    policy = a.service.call("GET", f"/v1/attesters/{a.state.attester_id}", a.service.admin).json()[
        "policy"
    ]
    doc = yaml.safe_load(_policy_body(published, LEFT_OUT))
    r = ima_service.call("PUT", f"/v1/policies/{policy}", ima_service.admin, json={"policy": doc})
    assert r.status_code == 200, r.text
    assert a.challenge()["ima"]["next_index"] == 0
    again = a.round(_binary(published[:10]))
    assert again["status"] == "affirming" and again["report"]["ima"]["start_index"] == 0
