"""The CA console in a real browser: Debian's headless chromium through chromedriver.

An operator logs in to `vtpm ca serve` (gunicorn, SQLite), searches a real vTPM's VM id,
clicks its RSA EK certificate and reads the certificate's details off the screen; then
the revoked page and the CRL state after a revocation. A hostile VM name shows as text
and no script runs.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from ca.home import CaHome
from ca.issuer import LocalCaIssuer
from tests._server import free_port, serving
from tests.ca.conftest import PASSPHRASE
from tests.verifier.console._browser import save_page, start_chromium
from tests.verifier.service.conftest import Server
from verifier.attester import TpmAttester, enroll
from verifier.service.config import CONFIG_FILE, init_home
from vtpm_core.record import VtpmRecord
from vtpm_core.store import VtpmStore

pytestmark = [pytest.mark.swtpm, pytest.mark.browser]
VTPM = str(Path(sys.executable).with_name("vtpm"))
HOSTILE = "<script>alert(1)</script>"


@dataclass
class World:
    url: str
    reader: str
    vm: VtpmRecord
    hostile_serial: str
    revoked_serial: str
    verifier_url: str
    verifier_admin: str
    attester_id: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tpm_keys: dict[str, bytes]) -> Iterator[World]:
    root = tmp_path_factory.mktemp("ca-console-browser")
    home = CaHome(root / "ca")
    home.init(passphrase=PASSPHRASE)
    admin = home.add_token("adm", "admin")
    reader = home.add_token("ops", "reader")
    store = VtpmStore.init(root / "store")
    with LocalCaIssuer.open(home.path, passphrase=PASSPHRASE) as issuer:
        vm = store.create("web-01", issuer=issuer)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [VTPM, "ca", "serve", "--home", str(home.path), "--bind", f"127.0.0.1:{port}",
           "--workers", "2"]  # fmt: skip
    env = dict(os.environ, VTPM_CA_PASSPHRASE=PASSPHRASE.decode())
    auth = {"Authorization": f"Bearer {admin}"}
    with serving(cmd, root / "serve.log", url + "/v1/ca/chain", env=env):
        hostile = requests.post(
            f"{url}/v1/ek-certificates",
            json={
                "ek_public": base64.b64encode(tpm_keys["ek-rsa"]).decode(),
                "vm_id": str(uuid.uuid4()),
                "vm_name": HOSTILE,
            },
            headers=auth,
            timeout=30,
        ).json()["serial"]
        ecc = vm.ek("ecc-p256").serial
        assert ecc is not None
        r = requests.post(
            f"{url}/v1/ek-certificates/{ecc:x}/revoke",
            json={"reason": "superseded"},
            headers=auth,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        # a verifier trusting this CA, linking its console, with the vTPM enrolled
        vhome = root / "verifier"
        vadmin = init_home(vhome, verifier_id="ca-console-browser")
        shutil.copyfile(home.path / "ca.pem", vhome / "roots" / "our-ca.pem")
        raw = yaml.safe_load((vhome / CONFIG_FILE).read_text())
        raw["ca_console_url"] = f"{url}/ca-console"
        (vhome / CONFIG_FILE).write_text(yaml.safe_dump(raw))
        server = Server(vhome, None).start()
        try:
            with (
                store.running("web-01") as tpm,
                requests.Session() as http,
                TpmAttester.open(tpm.endpoint.tcti) as att,
            ):
                attester = enroll(http, server.url, att).attester_id
            yield World(url, reader, vm, hostile, f"{ecc:x}", server.url, vadmin, attester)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium-ca"))
    try:
        yield driver
    finally:
        driver.quit()


def _arrive(driver: webdriver.Chrome, url: str) -> None:
    WebDriverWait(driver, 10).until(
        lambda d: (
            d.current_url == url and d.execute_script("return document.readyState") == "complete"
        )
    )


def test_operator_finds_a_vms_certificate_and_the_revocation(
    browser: webdriver.Chrome, world: World
) -> None:
    screenshots = None
    if os.environ.get("VTPM_CONSOLE_SCREENSHOTS") == "1":
        screenshots = Path(__file__).resolve().parents[2] / "docs" / "img"
    base = f"{world.url}/ca-console"
    browser.delete_all_cookies()
    browser.get(f"{base}/")
    assert browser.current_url == f"{base}/login"
    browser.find_element(By.ID, "token").send_keys(world.reader)
    browser.find_element(By.ID, "login").click()
    _arrive(browser, f"{base}/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "EK certificates"
    assert browser.find_element(By.ID, "count-issued").text == "2"
    assert browser.find_element(By.ID, "count-revoked").text == "1"
    # the hostile VM name on the list: text, not markup
    assert HOSTILE in browser.find_element(By.ID, "certificates").text
    assert browser.execute_script("return document.scripts.length") == 0
    # 1. search the VM id: its two EK certificates
    vm_id = str(world.vm.vm_id)
    browser.find_element(By.ID, "q").send_keys(vm_id[:13])
    browser.find_element(By.ID, "search").click()
    WebDriverWait(browser, 10).until(lambda d: "q=" in d.current_url)
    _arrive(browser, browser.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#certificates tbody tr")
    assert len(rows) == 2 and all(vm_id in r.text for r in rows)
    rsa = world.vm.ek("rsa2048")
    assert rsa.serial is not None
    (row,) = [r for r in rows if "rsa-2048" in r.text]
    assert "issued" in row.text
    # 2. the RSA certificate's details
    row.find_element(By.CSS_SELECTOR, "a.serial").click()
    _arrive(browser, f"{base}/certificates/{rsa.serial:x}")
    assert browser.find_element(By.ID, "serial").text == f"{rsa.serial:x}"
    assert browser.find_element(By.ID, "status").text.startswith("issued")
    assert browser.find_element(By.ID, "vm-id").text == vm_id
    assert browser.find_element(By.ID, "vm-name").text == "web-01"
    assert browser.find_element(By.ID, "public-key").text == "RSA 2048"
    assert "vtpm-trust EK CA" in browser.find_element(By.ID, "issuer").text
    extensions = browser.find_element(By.ID, "extensions").text
    assert "vmIdentity" in extensions and vm_id in extensions and "tpmManufacturer=" in extensions
    pem = browser.find_element(By.ID, "pem").text
    assert base64.b64decode("".join(pem.splitlines()[1:-1])) == rsa.certificate_der
    if screenshots:
        save_page(browser, screenshots / "ca-console-certificate.png")
    # 3. the revoked page: the VM's ECC certificate, superseded
    browser.find_element(By.ID, "nav-revoked").click()
    _arrive(browser, f"{base}/revoked")
    (revoked,) = browser.find_elements(By.CSS_SELECTOR, "#certificates tbody tr")
    assert world.revoked_serial in revoked.text and vm_id in revoked.text
    assert revoked.find_element(By.CSS_SELECTOR, ".reason").text == "superseded"
    # 4. the CRL state
    browser.find_element(By.ID, "nav-crl").click()
    _arrive(browser, f"{base}/crl")
    assert browser.find_element(By.ID, "entries").text == "1"
    assert "lists all 1 revoked certificate" in browser.find_element(By.ID, "crl-verdict").text
    assert browser.find_element(By.ID, "reasons").text == "superseded: 1"
    if screenshots:
        save_page(browser, screenshots / "ca-console-crl.png")
    # the hostile certificate's own page: the name as text, no script
    browser.get(f"{base}/certificates/{world.hostile_serial}")
    assert browser.find_element(By.ID, "vm-name").text == HOSTILE
    assert browser.execute_script("return document.querySelectorAll('script').length") == 0


def test_from_the_verifier_console_to_the_vms_certificate(
    browser: webdriver.Chrome, world: World
) -> None:
    """The verifier console's attester page links its VM's certificates in the CA console;
    the CA's login brings the operator back to them."""
    browser.delete_all_cookies()
    browser.get(f"{world.verifier_url}/console/login")
    browser.find_element(By.ID, "token").send_keys(world.verifier_admin)
    browser.find_element(By.ID, "login").click()
    _arrive(browser, f"{world.verifier_url}/console/")
    browser.find_element(By.CSS_SELECTOR, "a.attester").click()
    _arrive(browser, f"{world.verifier_url}/console/attesters/{world.attester_id}")
    vm_id = str(world.vm.vm_id)
    assert browser.find_element(By.ID, "nav-ca").get_attribute("href") == (
        f"{world.url}/ca-console/"
    )
    browser.find_element(By.ID, "ca-link").click()
    WebDriverWait(browser, 10).until(lambda d: d.current_url.startswith(f"{world.url}/"))
    assert browser.current_url.startswith(f"{world.url}/ca-console/login?next=")
    browser.find_element(By.ID, "token").send_keys(world.reader)
    browser.find_element(By.ID, "login").click()
    WebDriverWait(browser, 10).until(lambda d: "/login" not in d.current_url)
    _arrive(browser, browser.current_url)
    assert browser.current_url == f"{world.url}/ca-console/?field=vm_id&q={vm_id}"
    rows = browser.find_elements(By.CSS_SELECTOR, "#certificates tbody tr")
    assert len(rows) == 2 and all(vm_id in r.text for r in rows)
    (rsa,) = [r for r in rows if "rsa-2048" in r.text]
    rsa.find_element(By.CSS_SELECTOR, "a.serial").click()
    WebDriverWait(browser, 10).until(lambda d: "/certificates/" in d.current_url)
    _arrive(browser, browser.current_url)
    assert browser.find_element(By.ID, "vm-id").text == vm_id
    assert browser.find_element(By.ID, "public-key").text == "RSA 2048"
