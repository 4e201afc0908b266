"""The HTTP API served by `vtpm ca serve` (gunicorn, 2 workers) on a free loopback port:
tokens and roles, problem bodies, issuance, revocation, and `openssl ocsp` / `openssl verify
-crl_check` agreeing with the ledger."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from ca.client import HttpCaIssuer
from ca.home import CaHome
from ca.issuer import LocalCaIssuer
from tests._server import free_port, serving
from tests.ca.conftest import PASSPHRASE
from vtpm_core.errors import ConflictError, PermissionDeniedError, VerificationError
from vtpm_core.issuer import EkCertificateRequest

pytestmark = pytest.mark.swtpm
VTPM = str(Path(sys.executable).with_name("vtpm"))


@dataclass
class Server:
    url: str
    home: Path
    provisioner: str
    admin: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("caserve")
    home = CaHome(root / "ca")
    home.init(passphrase=PASSPHRASE)
    provisioner = home.add_token("prov", "provisioner")
    admin = home.add_token("adm", "admin")
    port = free_port()
    env = dict(os.environ, VTPM_CA_PASSPHRASE=PASSPHRASE.decode())
    url = f"http://127.0.0.1:{port}"
    cmd = [VTPM, "ca", "serve", "--home", str(home.path), "--bind", f"127.0.0.1:{port}",
           "--workers", "2"]  # fmt: skip
    with serving(cmd, root / "serve.log", url + "/v1/ca/chain", env=env):
        yield Server(url, home.path, provisioner, admin)


def _post(server: Server, path: str, body: object, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(server.url + path, json=body, headers=headers, timeout=30)


def _body(tpm_keys: dict[str, bytes], kind: str = "ek-rsa", **extra: object) -> dict[str, object]:
    return {
        "ek_public": base64.b64encode(tpm_keys[kind]).decode(),
        "vm_id": str(uuid.uuid4()),
        "vm_name": "web-01",
        **extra,
    }


@pytest.mark.parametrize(
    ("case", "token", "status"),
    [
        ("fail/auth/missing", None, 401),
        ("fail/auth/unknown", "nope", 401),
        ("fail/auth/wrong-role", "provisioner", 403),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("fail/") else "",
)
def test_tokens(
    server: Server, tpm_keys: dict[str, bytes], case: str, token: str | None, status: int
) -> None:
    if case == "fail/auth/wrong-role":  # a provisioner may issue, but not revoke
        response = _post(
            server, "/v1/ek-certificates/01/revoke", {"reason": "superseded"}, server.provisioner
        )
    else:
        response = _post(server, "/v1/ek-certificates", _body(tpm_keys), token)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["status"] == status
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("case", "mutate", "status", "field"),
    [
        ("fail/body/not-json", "not json", 400, "body"),
        ("fail/body/no-ek", {"vm_id": str(uuid.uuid4())}, 400, "ek_public"),
        ("fail/body/ek-not-base64", {"ek_public": "***"}, 400, "ek_public"),
        ("fail/body/ek-truncated", {"ek_public": "AAEAAQ=="}, 400, "ek_public"),
        ("fail/body/bad-vm-id", {"vm_id": "vm-1"}, 400, "vm_id"),
        ("fail/body/vm-name-type", {"vm_name": 7}, 400, "vm_name"),
        ("fail/body/unknown-field", {"colour": "blue"}, 400, "colour"),
        ("fail/body/manufacturer", {"tpm_manufacturer": "id:XYZ"}, 400, "tpm_manufacturer"),
        ("fail/ek/ak", {"ek_public": "ak"}, 422, "ek_public"),
        ("fail/ek/pem-without-flag", {"ek_public_pem": "pem"}, 422, "allow_bare_key"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("fail/") else "",
)
def test_bad_requests_name_the_field(
    server: Server,
    tpm_keys: dict[str, bytes],
    case: str,
    mutate: object,
    status: int,
    field: str,
) -> None:
    if isinstance(mutate, str):
        response = requests.post(
            server.url + "/v1/ek-certificates",
            data=mutate,
            headers={
                "Authorization": f"Bearer {server.provisioner}",
                "Content-Type": "application/json",
            },
            timeout=30,
        )
    else:
        body = _body(tpm_keys)
        assert isinstance(mutate, dict)
        if mutate.get("ek_public") == "ak":
            mutate = {"ek_public": base64.b64encode(tpm_keys["ak"]).decode()}
        if mutate.get("ek_public_pem") == "pem":
            body.pop("ek_public")
            mutate = {"ek_public_pem": tpm_keys["ek-rsa-pem"].decode()}
        if "ek_public" not in mutate and case == "fail/body/no-ek":
            body.pop("ek_public")
        body.update(mutate)
        response = _post(server, "/v1/ek-certificates", body, server.provisioner)
    assert response.status_code == status, response.text
    problem = response.json()
    assert problem["field"] == field
    assert problem["detail"]
    assert "Traceback" not in response.text


def test_issue_reissue_revoke_ocsp_crl(
    server: Server, tpm_keys: dict[str, bytes], tmp_path: Path
) -> None:
    body = _body(tpm_keys, "ek-ecc")
    first = _post(server, "/v1/ek-certificates", body, server.provisioner)
    assert first.status_code == 201, first.text
    again = _post(server, "/v1/ek-certificates", body, server.provisioner)
    assert again.status_code == 200 and again.json()["serial"] == first.json()["serial"]
    assert again.json()["reissued"] is True
    serial = first.json()["serial"]
    (tmp_path / "ek.pem").write_text(first.json()["certificate_pem"])
    chain = requests.get(server.url + "/v1/ca/chain", timeout=30)
    assert chain.headers["Content-Type"] == "application/pem-certificate-chain"
    (tmp_path / "chain.pem").write_bytes(chain.content)
    assert chain.text == first.json()["chain_pem"]

    def ocsp() -> str:
        result = subprocess.run(
            [
                "openssl",
                "ocsp",
                "-issuer",
                str(tmp_path / "chain.pem"),
                "-cert",
                str(tmp_path / "ek.pem"),
                "-url",
                server.url + "/v1/ocsp",
                "-CAfile",
                str(tmp_path / "chain.pem"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "Response verify OK" in result.stderr + result.stdout, result.stderr
        return result.stdout

    def crl_check() -> subprocess.CompletedProcess[str]:
        crl = requests.get(server.url + "/v1/crl", timeout=30)
        assert crl.headers["Content-Type"] == "application/pkix-crl"
        (tmp_path / "crl.der").write_bytes(crl.content)
        subprocess.run(
            [
                "openssl",
                "crl",
                "-inform",
                "der",
                "-in",
                str(tmp_path / "crl.der"),
                "-out",
                str(tmp_path / "crl.pem"),
            ],
            check=True,
        )
        both = tmp_path / "both.pem"
        both.write_bytes(chain.content + (tmp_path / "crl.pem").read_bytes())
        return subprocess.run(
            ["openssl", "verify", "-crl_check", "-CAfile", str(both), str(tmp_path / "ek.pem")],
            capture_output=True,
            text=True,
            check=False,
        )

    assert ": good" in ocsp()
    assert crl_check().returncode == 0
    revoked = _post(
        server, f"/v1/ek-certificates/{serial}/revoke", {"reason": "key-compromise"}, server.admin
    )
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    out = ocsp()
    assert ": revoked" in out and "Reason: keyCompromise" in out
    result = crl_check()
    assert result.returncode != 0 and "certificate revoked" in result.stdout + result.stderr
    twice = _post(
        server, f"/v1/ek-certificates/{serial}/revoke", {"reason": "superseded"}, server.admin
    )
    assert twice.status_code == 409


def test_ocsp_unknown_serial_is_not_good(server: Server, tmp_path: Path) -> None:
    """A certificate the ledger never issued (same issuer name/key) is 'unknown', never 'good'."""
    chain = requests.get(server.url + "/v1/ca/chain", timeout=30).content
    (tmp_path / "chain.pem").write_bytes(chain)
    result = subprocess.run(
        [
            "openssl",
            "ocsp",
            "-issuer",
            str(tmp_path / "chain.pem"),
            "-serial",
            "0x1234567890ABCDEF",
            "-url",
            server.url + "/v1/ocsp",
            "-CAfile",
            str(tmp_path / "chain.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "0x1234567890ABCDEF: unknown" in result.stdout, result.stdout + result.stderr


def test_http_issuer_and_local_issuer(server: Server, tpm_keys: dict[str, bytes]) -> None:
    vm = uuid.uuid4()
    request = EkCertificateRequest(
        ek_public=tpm_keys["ek-rsa"],
        vm_id=vm,
        vm_name="db-1",
        vtpm_instance_id="i-1",
        template_id="L-1",
        tpm_manufacturer=0x49424D00,
        tpm_model="swtpm",
        tpm_version=0x20191023,
    )
    client = HttpCaIssuer(server.url, server.provisioner)
    try:
        issued = client.issue_ek_certificate(request)
        again = client.issue_ek_certificate(request)
        assert issued == again and issued.serial > 1 << 64
        with pytest.raises(ConflictError, match="clone by copy"):
            client.issue_ek_certificate(
                EkCertificateRequest(**{**_fields(request), "vm_id": uuid.uuid4()})
            )
        with pytest.raises(VerificationError, match="not a TCG EK"):
            client.issue_ek_certificate(
                EkCertificateRequest(**{**_fields(request), "ek_public": tpm_keys["ak"]})
            )
        with pytest.raises(PermissionDeniedError, match="403"):
            client.revoke_ek_certificate(issued.serial, "superseded")
    finally:
        client.close()
    admin = HttpCaIssuer(server.url, server.admin)
    try:
        admin.revoke_ek_certificate(issued.serial, "superseded")
    finally:
        admin.close()
    # in-process issuer over the same home (its own ledger connection): sees the revocation
    with LocalCaIssuer.open(server.home, passphrase=PASSPHRASE) as local:
        assert local.ca.ledger.get(issued.serial).status == "revoked"
        with pytest.raises(ConflictError, match="revoked"):  # a revoked EK is not certified again
            local.issue_ek_certificate(request)
        assert local.ca.material.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")


def _fields(request: EkCertificateRequest) -> dict[str, object]:
    return {f: getattr(request, f) for f in request.__dataclass_fields__}


def test_show_and_ocsp_get(server: Server, tpm_keys: dict[str, bytes]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import ocsp

    # an EK this module has not used yet: the ECC EK's key as a bare PEM, explicitly allowed
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    issued = _post(
        server,
        "/v1/ek-certificates",
        {"ek_public_pem": pem.decode(), "allow_bare_key": True, "vm_id": str(uuid.uuid4())},
        server.provisioner,
    )
    assert issued.status_code == 201, issued.text
    serial = issued.json()["serial"]
    auth = {"Authorization": f"Bearer {server.provisioner}"}
    shown = requests.get(f"{server.url}/v1/ek-certificates/{serial}", headers=auth, timeout=30)
    assert shown.status_code == 200
    assert (shown.json()["status"], shown.json()["ek_template"]) == ("issued", "bare-pem")
    assert requests.get(f"{server.url}/v1/ek-certificates/{serial}", timeout=30).status_code == 401
    missing = requests.get(f"{server.url}/v1/ek-certificates/abc123", headers=auth, timeout=30)
    assert (
        missing.status_code == 404
        and "no certificate with serial abc123" in missing.json()["detail"]
    )
    cert = x509.load_pem_x509_certificate(issued.json()["certificate_pem"].encode())
    issuer = x509.load_pem_x509_certificate(issued.json()["chain_pem"].encode())
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    encoded = base64.b64encode(request.public_bytes(serialization.Encoding.DER)).decode()
    answer = ocsp.load_der_ocsp_response(
        requests.get(f"{server.url}/v1/ocsp/{encoded}", timeout=30).content
    )
    assert answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert answer.serial_number == cert.serial_number
    public = issuer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    garbage = requests.post(f"{server.url}/v1/ocsp", data=b"\x30\x00", timeout=30)
    assert garbage.status_code == 400 and garbage.json()["title"] == "malformed"
