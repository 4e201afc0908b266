"""Continuous attestation of a real VM (issue 16): `vtpm vm boot --verifier URL --rounds N`.

One boot. The host runs `vtpm agent`'s loop (verifier.agent.Agent) with the guest's
TPM as its backend (tpm2-tools over the serial channel) against a real verifier
(gunicorn, SQLite) asking for evidence every 2 s: one registration, three rounds on
that cadence, the attester trusted with the history unknown -> trusted. Then the VM
is powered off: the sweeper marks it stale after its deadline, and the webhook for
that transition reaches a real receiver process, its HMAC verifying.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from click.testing import CliRunner

from tests._server import free_port
from tests.verifier.service.conftest import Server
from tests.verifier.service.test_webhooks_outbox import Receiver
from tests.vm.conftest import CA_PASSPHRASE, GuestImages, files_policy, provision_vtpm
from verifier.service.webhooks import verify_hmac
from vtpm_cli.main import cli
from vtpm_core.vm import DEFAULT_CMDLINE

pytestmark = pytest.mark.vm

CADENCE_S = 2
ROUNDS = 3
# stale after 3 cadences without evidence: a round is the cadence plus the guest's quote
# (a second or more under TCG), so a grace of 1 marks it stale between rounds
GRACE = 3
SECRET = "vm-agent-webhook-secret-0123456789"


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _t(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


@pytest.fixture
def fast_verifier(tmp_path: Path) -> Iterator[tuple[Server, str, Path]]:
    """A verifier trusting a fresh project CA: 2 s cadence, stale 3 cadences after the
    last evidence, swept every second, webhooks polled every 100 ms."""
    from ca.home import CaHome
    from verifier.service.config import init_home

    CaHome(tmp_path / "ca").init(passphrase=CA_PASSPHRASE)
    home = tmp_path / "verifier"
    admin = init_home(home, verifier_id="vm-agent-verifier")
    shutil.copyfile(tmp_path / "ca" / "ca.pem", home / "roots" / "vtpm-ca.pem")
    cfg = home / "verifier.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw.update(
        attest_cadence_s=CADENCE_S, stale_grace=GRACE, sweep_interval_s=1, webhook_poll_ms=100
    )
    cfg.write_text(yaml.safe_dump(raw))
    server = Server(home, None).start()
    try:
        yield server, admin, tmp_path / "ca"
    finally:
        server.stop()


def test_agent_loop_attests_a_real_vm_which_goes_stale_when_powered_off(
    tmp_path: Path, guest_images: GuestImages, fast_verifier: tuple[Server, str, Path]
) -> None:
    server, admin, ca = fast_verifier
    headers = {"Authorization": f"Bearer {admin}"}

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        kw["headers"] = {**headers, **kw.get("headers", {})}
        return requests.request(method, f"{server.url}{path}", timeout=30, **kw)

    receiver = Receiver(free_port(), tmp_path / "hooks.jsonl", tmp_path / "status").start()
    try:
        r = call("POST", "/v1/webhooks", json={"url": receiver.url, "secret": SECRET})
        assert r.status_code == 201, r.text
        policy = files_policy("vm-agent", guest_images.esp(), secure_boot=False,
                              cmdline=DEFAULT_CMDLINE)  # fmt: skip
        r = call("PUT", "/v1/policies/vm-agent", data=policy.encode(),
                 headers={"Content-Type": "application/yaml"})  # fmt: skip
        assert r.status_code in (200, 201), r.text
        prov = provision_vtpm(tmp_path / "vtpm", name="agent-vm", ca_dir=ca)
        token = tmp_path / "admin.token"
        token.write_text(admin + "\n")
        out = tmp_path / "out"
        result = CliRunner().invoke(
            cli,
            [
                "vm", "boot", "agent-vm", "--store", str(prov.store.root), "--out", str(out),
                "--kernel", str(guest_images.kernel.vmlinuz),
                "--initrd", str(guest_images.initramfs.path), "--json",
                "--verifier", server.url, "--token-file", str(token), "--policy", "vm-agent",
                "--rounds", str(ROUNDS),
            ],
        )  # fmt: skip
        powered_off = time.time()
        assert result.exit_code == 0, result.output
        run = json.loads(result.output)["verifier"]
        assert run["registrations"] == 1 and run["exit_status"] == 0
        assert [r["status"] for r in run["rounds"]] == ["affirming"] * ROUNDS
        assert {r["next_attestation_s"] for r in run["rounds"]} == {CADENCE_S}
        aid = run["attester_id"]
        assert json.loads((out / "result.json").read_text())["attester_id"] == aid

        # the rounds came on the verifier's cadence, each one appraised and stored
        results = call("GET", f"/v1/attesters/{aid}/results").json()["results"]
        assert len(results) == ROUNDS and {x["status"] for x in results} == {"affirming"}
        stamps = sorted(_t(x["created_at"]).timestamp() for x in results)
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert all(CADENCE_S * 0.9 <= g <= CADENCE_S + 15 for g in gaps), gaps
        listed = call("GET", "/v1/attesters").json()["attesters"]
        assert [a["id"] for a in listed] == [aid]  # registered once

        # powered off: stale after its deadline (last evidence + cadence x grace)
        def state() -> str:
            return str(call("GET", f"/v1/attesters/{aid}").json()["state"])

        _wait(lambda: state() == "stale", 30, "the sweeper to mark the VM stale")
        history = call("GET", f"/v1/attesters/{aid}/history").json()["transitions"]
        edges = sorted((t["id"], t["from_state"], t["to_state"]) for t in history)
        assert [(f, t) for _, f, t in edges] == [("unknown", "trusted"), ("trusted", "stale")]
        stale = next(t for t in history if t["to_state"] == "stale")
        assert stale["cause"]["cadence_s"] == CADENCE_S
        assert _t(stale["at"]).timestamp() >= stamps[-1] + CADENCE_S * GRACE * 0.9
        assert _t(stale["at"]).timestamp() <= powered_off + 30

        # the webhooks: each transition delivered once, the HMAC over the received bytes
        def arrived() -> list[dict[str, Any]]:
            return [json.loads(h["body"]) for h in receiver.requests()]

        _wait(lambda: len(arrived()) >= 2, 30, "both webhook deliveries")
        time.sleep(0.5)  # nothing more comes
        hooks = receiver.requests()
        assert len(hooks) == 2, hooks
        for h in hooks:
            assert verify_hmac(SECRET, h["body"].encode(), h["headers"]["x-vtpm-signature"])
        bodies = sorted(arrived(), key=lambda b: int(b["transition_id"]))
        assert [(b["from_state"], b["to_state"]) for b in bodies] == [
            ("unknown", "trusted"),
            ("trusted", "stale"),
        ]
        assert all(b["attester_id"] == aid for b in bodies)
        assert bodies[1]["cause"] == stale["cause"]
    finally:
        receiver.stop()
