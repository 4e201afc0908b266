"""The service with our own CA and vTPM store: no swtpm_setup, no swtpm_localca.

The trust root is our CA's certificate (``ca.home.CaHome``); the vTPM is made
by ``vtpm_core.store.VtpmStore.create`` with EK certificates issued by
``ca.issuer.LocalCaIssuer`` into NV, and runs under ``store.running(name)``.
The verifier is the real ``vtpm verifier serve`` under gunicorn (SQLite).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from ca.home import CaHome
from ca.issuer import LocalCaIssuer
from tests.verifier.service.conftest import Server
from verifier.attester import TpmAttester, attest_once, enroll
from verifier.ear import verify_result
from verifier.eventlog import EventLog
from verifier.policy import learn_policy
from verifier.service.config import init_home
from vtpm_core.measured_boot import BootDescription, simulate_boot
from vtpm_core.store import VtpmStore

pytestmark = [pytest.mark.swtpm]

PASSPHRASE = b"our-ca-test-passphrase"


@dataclass(frozen=True)
class World:
    ca_cert: Path
    store: VtpmStore
    url: str
    admin: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("our-ca")
    home = CaHome(root / "ca")
    home.init(subject="CN=vtpm-trust test EK CA,O=vtpm-trust test", passphrase=PASSPHRASE)
    store = VtpmStore.init(root / "store")
    with LocalCaIssuer.open(root / "ca", passphrase=PASSPHRASE) as issuer:
        store.create("vm-a", issuer=issuer)
    vhome = root / "verifier"
    admin = init_home(vhome, verifier_id="our-ca-test")
    # the only trust root: our CA's certificate
    shutil.copyfile(root / "ca" / "ca.pem", vhome / "roots" / "our-ca.pem")
    server = Server(vhome, None).start()
    try:
        yield World(root / "ca" / "ca.pem", store, server.url, admin)
    finally:
        server.stop()


def test_full_flow_with_our_ca_and_store(world: World) -> None:
    record = world.store.get("vm-a")
    with world.store.running("vm-a") as tpm:
        esapi = tpm.esapi()
        try:
            boot = simulate_boot(BootDescription(kernel_cmdline="root=/dev/vda ro"), esapi)
        finally:
            esapi.close()
        with requests.Session() as http, TpmAttester.open(tpm.endpoint.tcti) as att:
            state = enroll(http, world.url, att)
            # the VM id comes from our CA's VM identity extension in the EK certificate
            view = http.get(
                f"{world.url}/v1/attesters/{state.attester_id}", headers=world.headers()
            ).json()
            assert view["vm_id"] == str(record.vm_id)
            assert view["identity"]["trust"] == "ek-certificate"
            assert "vtpm-trust test EK CA" in view["identity"]["anchor"]
            # the learned policy, uploaded as the YAML file `vtpm policy learn` writes
            log = EventLog.parse(boot.eventlog)
            learned = learn_policy(log.verify(log.replay()), name="vm-a-golden")
            r = http.put(
                f"{world.url}/v1/policies/vm-a-golden",
                data=learned.to_yaml().encode(),
                headers={**world.headers(), "Content-Type": "application/yaml"},
            )
            assert r.status_code == 200, r.text
            r = http.put(
                f"{world.url}/v1/attesters/{state.attester_id}/policy",
                json={"policy": "vm-a-golden"},
                headers=world.headers(),
            )
            assert r.status_code == 200, r.text
            result = attest_once(http, state, att, boot.eventlog)
            jwks = http.get(f"{world.url}/.well-known/jwks.json").json()
    assert result["status"] == "affirming", result["report"]
    ear = verify_result(result["ear"], jwks, expected_nonce=bytes.fromhex(result["nonce"]))
    assert ear.status == "affirming" and ear.attester_id == state.attester_id
    assert ear.submods["vtpm-boot"].policy_id == learned.id
