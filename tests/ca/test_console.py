"""The CA console (`vtpm ca serve`, gunicorn, 2 workers) on SQLite and PostgreSQL.

The CA issues real EK certificates for two real vTPMs (``VtpmStore.create`` on swtpm,
RSA and ECC EKs, certificates written to NV) and one for a swtpm EK whose VM name is
hostile markup; the pages and their JSON twins are read back: search by VM id, serial,
EK name and VM name, one certificate's fields as signed, a revocation on the revoked
page and in the CRL (and ``openssl crl`` agreeing), the login and its cookie.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from ca.home import CaHome
from ca.issuer import LocalCaIssuer
from tests._server import free_port, serving
from tests.ca.conftest import PASSPHRASE
from tests.verifier.service.conftest import pg_database  # noqa: F401 (fixture)
from vtpm_core.record import VtpmRecord
from vtpm_core.store import VtpmStore

pytestmark = pytest.mark.swtpm
VTPM = str(Path(sys.executable).with_name("vtpm"))
HOSTILE = "<script>alert(1)</script>"


@dataclass
class CaConsole:
    backend: str
    url: str
    home: Path
    admin: str
    reader: str
    provisioner: str
    vms: dict[str, VtpmRecord]
    hostile: dict[str, Any]  # the API's answer for the hostile VM's certificate

    def get(self, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"{self.url}{path}", headers=headers, timeout=30, **kw)

    def login(self, token: str) -> requests.Session:
        http = requests.Session()
        r = http.post(
            f"{self.url}/ca-console/login",
            data={"token": token},
            headers={"Sec-Fetch-Site": "same-origin"},
            allow_redirects=False,
            timeout=30,
        )
        assert r.status_code == 303, r.text
        return http


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def console(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tpm_keys: dict[str, bytes],
) -> Iterator[CaConsole]:
    root = tmp_path_factory.mktemp(f"ca-console-{request.param}")
    home = CaHome(root / "ca")
    home.init(passphrase=PASSPHRASE)
    admin = home.add_token("adm", "admin")
    reader = home.add_token("ops", "reader")
    provisioner = home.add_token("prov", "provisioner")
    db = request.getfixturevalue("pg_database")() if request.param == "postgres" else None
    store = VtpmStore.init(root / "store")
    with LocalCaIssuer.open(home.path, passphrase=PASSPHRASE, database=db) as issuer:
        vms = {name: store.create(name, issuer=issuer) for name in ("vm-a", "vm-b")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [VTPM, "ca", "serve", "--home", str(home.path), "--bind", f"127.0.0.1:{port}",
           "--workers", "2", *(["--db", db] if db else [])]  # fmt: skip
    env = dict(os.environ, VTPM_CA_PASSPHRASE=PASSPHRASE.decode())
    with serving(cmd, root / "serve.log", url + "/v1/ca/chain", env=env):
        r = requests.post(
            f"{url}/v1/ek-certificates",
            json={
                "ek_public": base64.b64encode(tpm_keys["ek-rsa"]).decode(),
                "vm_id": str(uuid.uuid4()),
                "vm_name": HOSTILE,
            },
            headers={"Authorization": f"Bearer {provisioner}"},
            timeout=30,
        )
        assert r.status_code in (200, 201), r.text
        yield CaConsole(request.param, url, home.path, admin, reader, provisioner, vms, r.json())


def _serial(record: VtpmRecord, kind: str) -> str:
    serial = record.ek(kind).serial
    assert serial is not None
    return f"{serial:x}"


def test_login_cookie_and_who_may_log_in(console: CaConsole) -> None:
    login = f"{console.url}/ca-console/login"
    same = {"Sec-Fetch-Site": "same-origin"}
    for token, status in (
        (console.reader, 303),
        (console.admin, 303),
        (console.provisioner, 401),  # a machine role: not the console
        ("nope", 401),
    ):
        r = requests.post(
            login, data={"token": token}, headers=same, allow_redirects=False, timeout=30
        )
        assert r.status_code == status, token
    r = requests.post(
        login, data={"token": console.reader}, headers=same, allow_redirects=False, timeout=30
    )
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("vtpm_ca_console=")  # not the verifier console's cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ca-console" in cookie
    r = requests.post(
        login, data={"token": console.reader}, headers={"Sec-Fetch-Site": "cross-site"}, timeout=30
    )
    assert r.status_code == 403
    # a page without a session: the login form, which returns there (never elsewhere)
    r = console.get("/ca-console/crl", allow_redirects=False)
    assert (
        r.status_code == 303
        and r.headers["Location"] == "/ca-console/login?next=%2Fca-console%2Fcrl"
    )
    for target, lands in (
        ("/ca-console/crl", "/ca-console/crl"),
        ("https://evil.example/ca-console/", "/ca-console/"),
        ("//evil.example/ca-console/", "/ca-console/"),
        ("/console/", "/ca-console/"),
    ):
        r = requests.post(
            login,
            data={"token": console.reader, "next": target},
            headers=same,
            allow_redirects=False,
            timeout=30,
        )
        assert r.headers["Location"] == lands, target
    # the JSON routes: a session or a reader/admin bearer token
    assert console.get("/ca-console/api/certificates").status_code == 401
    assert console.get("/ca-console/api/certificates", console.provisioner).status_code == 403
    assert console.get("/ca-console/api/certificates", console.reader).status_code == 200
    # and the API routes stay closed to a reader
    serial = _serial(console.vms["vm-a"], "rsa2048")
    assert console.get(f"/v1/ek-certificates/{serial}", console.reader).status_code == 403


def test_list_and_search_by_vm_id_serial_ek_name_vm_name(console: CaConsole) -> None:
    api = "/ca-console/api/certificates"
    every = console.get(api, console.reader).json()
    assert every["total"] == 5 and every["counts"] == {"pending": 0, "issued": 5, "revoked": 0}
    issued = [c["issued_at"] for c in every["certificates"]]
    assert issued == sorted(issued, reverse=True)  # newest first
    a = console.vms["vm-a"]
    rsa = _serial(a, "rsa2048")

    def found(**params: str) -> set[str]:
        answer = console.get(api, console.reader, params=params).json()
        assert answer["total"] == len(answer["certificates"])
        return {c["serial"] for c in answer["certificates"]}

    both = {rsa, _serial(a, "ecc-p256")}
    assert found(q=str(a.vm_id)[:8], field="vm_id") == both
    assert found(q=str(a.vm_id).upper()) == both  # any field, case of the hex ignored
    assert found(q=rsa[:10], field="serial") == {rsa}
    colons = ":".join(re.findall("..", "0" * (len(rsa) % 2) + rsa)).upper()
    assert found(q=colons, field="serial") == {rsa}  # as `openssl x509 -text` prints it
    assert found(q=f"serial={rsa.upper()}", field="serial") == {rsa}
    view = console.get(f"/ca-console/api/certificates/{rsa}", console.reader).json()
    assert found(q=view["ek_name"][:20], field="ek_name") == {rsa}
    assert found(q="<script>", field="vm_name") == {console.hostile["serial"]}
    assert found(q="vm-", field="vm_name") == both | {
        _serial(console.vms["vm-b"], k) for k in ("rsa2048", "ecc-p256")
    }
    assert found(q="zz", field="serial") == set()  # not hex: matches no serial
    assert found(q="100%_") == set()  # LIKE's wildcards are plain characters
    # paging: 5 certificates, pages of 25; a page past the end is empty
    assert (
        console.get(api, console.reader, params={"page": "2", "size": "25"}).json()["certificates"]
        == []
    )
    for params, field in (
        ({"size": "7"}, "size"),
        ({"page": "0"}, "page"),
        ({"field": "colour"}, "field"),
        ({"status": "lost"}, "status"),
        ({"sort": "revoked"}, "sort"),  # only on the revoked page
        ({"q": "x" * 256}, "q"),
    ):
        r = console.get(api, console.reader, params=params)
        assert r.status_code == 400 and field in r.json()["detail"], (params, r.text)


def test_certificate_page_reads_the_certificate_as_signed(console: CaConsole) -> None:
    a = console.vms["vm-a"]
    ek = a.ek("rsa2048")
    serial = _serial(a, "rsa2048")
    http = console.login(console.reader)
    d = http.get(f"{console.url}/ca-console/api/certificates/{serial}", timeout=30).json()
    assert d["status"] == "issued" and d["revoked_at"] is None
    assert d["vm_id"] == str(a.vm_id) and d["vm_name"] == "vm-a" and d["key_type"] == "rsa-2048"
    x = d["certificate"]
    assert x["pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert base64.b64decode("".join(x["pem"].splitlines()[1:-1])) == ek.certificate_der  # in NV
    assert "vtpm-trust EK CA" in x["issuer"] and x["public_key"] == "RSA 2048"
    (identity,) = [e["value"] for e in x["extensions"] if e["name"].startswith("vmIdentity")]
    assert identity["vm_id"] == str(a.vm_id) and identity["vm_name"] == "vm-a"
    (san,) = [e for e in x["extensions"] if e["name"] == "subjectAltName"]
    assert san["critical"] and "tpmManufacturer=" in san["value"][0]
    assert d["bindings"] == [{"vm_id": str(a.vm_id), "kind": "original"}]
    page = http.get(f"{console.url}/ca-console/certificates/{serial.upper()}", timeout=30)
    assert page.status_code == 200 and str(a.vm_id) in page.text and "RSA 2048" in page.text
    for path, status in (("zz", 400), ("abc", 404)):
        r = http.get(f"{console.url}/ca-console/api/certificates/{path}", timeout=30)
        assert r.status_code == status, r.text
    # the hostile VM name: shown as text, nowhere as markup
    hostile = console.hostile["serial"]
    for path in (f"/ca-console/certificates/{hostile}", "/ca-console/?field=vm_name&q=%3Cscript"):
        r = http.get(f"{console.url}{path}", timeout=30)
        assert r.status_code == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
        assert "<script" not in r.text
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp
        assert r.headers["X-Frame-Options"] == "DENY"


def test_revoked_page_and_crl_state(console: CaConsole, tmp_path: Path) -> None:
    b = console.vms["vm-b"]
    serial = _serial(b, "ecc-p256")
    r = requests.post(
        f"{console.url}/v1/ek-certificates/{serial}/revoke",
        json={"reason": "key-compromise"},
        headers={"Authorization": f"Bearer {console.admin}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    http = console.login(console.admin)
    revoked = http.get(f"{console.url}/ca-console/api/revoked", timeout=30).json()
    assert revoked["total"] == 1 and revoked["counts"]["revoked"] == 1
    (row,) = revoked["certificates"]
    assert row["serial"] == serial and row["revocation_reason"] == "key-compromise"
    assert row["vm_id"] == str(b.vm_id) and row["revoked_at"] is not None
    # searching within the revoked ones
    within = http.get(
        f"{console.url}/ca-console/api/revoked", params={"q": str(b.vm_id)}, timeout=30
    ).json()
    assert [c["serial"] for c in within["certificates"]] == [serial]
    assert (
        http.get(
            f"{console.url}/ca-console/api/revoked",
            params={"q": str(console.vms["vm-a"].vm_id)},
            timeout=30,
        ).json()["total"]
        == 0
    )
    page = http.get(f"{console.url}/ca-console/revoked", timeout=30).text
    assert serial in page and "key-compromise" in page
    detail = http.get(f"{console.url}/ca-console/certificates/{serial}", timeout=30).text
    assert "revoked" in detail and "key-compromise" in detail
    # the CRL state: what GET /v1/crl serves now, checked against the ledger
    crl = http.get(f"{console.url}/ca-console/api/crl", timeout=30).json()
    assert crl["entries"] == crl["revoked_in_ledger"] == 1 and crl["complete"]
    assert crl["signature_valid"] and crl["reasons"] == {"key-compromise": 1}
    assert crl["validity_days"] == 7 and crl["next_update"] > crl["this_update"]
    assert (
        "all 1 revoked certificate of the ledger"
        in http.get(f"{console.url}/ca-console/crl", timeout=30).text
    )
    # openssl reads the served CRL as listing that serial, for that reason
    der = tmp_path / "crl.der"
    der.write_bytes(requests.get(f"{console.url}/v1/crl", timeout=30).content)
    text = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(der), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert serial.upper() in text.upper()
    assert "Key Compromise" in text
