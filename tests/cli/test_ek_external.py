"""Issue 8: EK certificates from a third-party CA, end to end on real swtpm vTPMs.

Two stand-ins for the third party: our own CA in a separate home (`vtpm ca
issue-ek --ek-public` on the exported TPM2B_PUBLIC) and plain openssl
(`openssl x509 -new -force_pubkey` on the exported PEM; openssl cannot use a
CSR here since an EK cannot sign one). NV is read back with tpm2-tools; the
imported vTPM registers and attests at a real verifier (gunicorn) that trusts
only the third-party root.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_public_key
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.verifier.service.conftest import Server
from verifier.ekcert import TrustStore, load_certificates, validate_ek_certificate
from vtpm_cli.main import cli
from vtpm_core.errors import VerificationError
from vtpm_core.store import VtpmStore
from vtpm_core.tpm.public import Public

pytestmark = [pytest.mark.swtpm, pytest.mark.timeout(180)]

RSA_NV = "0x01c00002"
ECC_NV = "0x01c0000a"


def _nv_handles(getcap_output: str) -> set[int]:
    """The NV indices `tpm2_getcap handles-nv-index` lists (its lines read "- 0x1C0000A")."""
    return {int(line.strip("- "), 16) for line in getcap_output.splitlines() if line.strip()}


LOCKED = "0x62072801"

# an EK certificate profile for openssl (TCG EK Credential Profile 3.2); the
# "0." prefix is openssl's multi-value syntax, stripped before the OID
_OPENSSL_EXT = """\
[ek]
basicConstraints = critical,CA:FALSE
keyUsage = critical,{usage}
extendedKeyUsage = 2.23.133.8.1
authorityKeyIdentifier = keyid
subjectAltName = dirName:tpm_dn
[tpm_dn]
0.2.23.133.2.1 = {manufacturer}
0.2.23.133.2.2 = {model}
0.2.23.133.2.3 = {version}
"""


@dataclass
class Env:
    root: Path
    store: Path
    other_ca: Path  # our CA in a separate home: the third party
    passphrase: Path
    ours_ca: Path  # the default CA of this store (not trusted for third-party certs)
    ossl_key: Path
    ossl_root: Path

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(cli, [*args, "--store", str(self.store)], catch_exceptions=False)

    def create_external(self, name: str) -> Path:
        r = self.run("create", name, "--ek-cert-mode", "external")
        assert r.exit_code == 0, r.output
        out = self.root / f"{name}-req"
        r = self.run("ek", "request", name, "--out", str(out))
        assert r.exit_code == 0, r.output
        return out

    def issue_other(self, req: Path, kind: str, out: Path) -> Path:
        doc = json.loads((req / "request.json").read_text())
        ek = next(e for e in doc["eks"] if e["kind"] == kind)
        r = CliRunner().invoke(
            cli,
            ["ca", "issue-ek", "--home", str(self.other_ca), "--passphrase-file",
             str(self.passphrase), "--ek-public", str(req / ek["ek_public_file"]),
             "--vm-id", doc["vm"]["id"], "--vm-name", doc["vm"]["name"],
             "--tpm-manufacturer", ek["san"]["tpmManufacturer"],
             "--tpm-model", ek["san"]["tpmModel"], "--tpm-version", ek["san"]["tpmVersion"],
             "--out", str(out)],
            catch_exceptions=False,
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        return out

    def issue_openssl(
        self, req: Path, kind: str, out: Path, *, usage: str = "keyEncipherment"
    ) -> Path:
        doc = json.loads((req / "request.json").read_text())
        ek = next(e for e in doc["eks"] if e["kind"] == kind)
        ext = out.with_suffix(".cnf")
        ext.write_text(
            _OPENSSL_EXT.format(
                usage=usage,
                manufacturer=ek["san"]["tpmManufacturer"],
                model=ek["san"]["tpmModel"],
                version=ek["san"]["tpmVersion"],
            )
        )
        _openssl(
            "x509", "-new", "-subj", f"/CN={doc['vm']['name']} EK",
            "-force_pubkey", str(req / ek["ek_pem_file"]),
            "-CA", str(self.ossl_root), "-CAkey", str(self.ossl_key),
            "-set_serial", "0x" + "5a" * 10, "-days", "365",
            "-extfile", str(ext), "-extensions", "ek", "-out", str(out),
        )  # fmt: skip
        return out


def _openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def _invoke(*args: str) -> Result:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("ekx")
    pw = root / "pass"
    pw.write_text("correct horse battery staple\n")
    pw.chmod(0o600)
    for home, subject in (("other-ca", "CN=Example Corp TPM EK Root,O=Example Corp"),
                          ("ours-ca", "CN=vtpm-trust EK CA,O=vtpm-trust")):  # fmt: skip
        _invoke("ca", "init", "--home", str(root / home), "--passphrase-file", str(pw),
                "--subject", subject)  # fmt: skip
    _invoke("init", "--store", str(root / "store"))
    key, cert = root / "ossl-root.key", root / "ossl-root.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=OpenSSL Third Party EK Root",
        "-days", "3650", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return Env(root, root / "store", root / "other-ca", pw, root / "ours-ca", key, cert)


@pytest.fixture
def store(env: Env) -> VtpmStore:
    return VtpmStore.open(env.store)


def _tools(store: VtpmStore, name: str, *argv: list[str]) -> list[str]:
    """Run tpm2-tools commands against vTPM ``name`` (started for the call, stopped by PID)."""
    outs = []
    with store.running(name, transport="tcp") as tpm:
        for args in argv:
            r = subprocess.run(args, env=tpm.tool_env, capture_output=True, text=True, check=False)
            assert r.returncode == 0, f"{args}: {r.stderr}"
            outs.append(r.stdout)
    return outs


def _der(pem: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER)


# -- request ---------------------------------------------------------------------------


def test_external_create_leaves_nv_empty_and_request_has_everything(
    env: Env, store: VtpmStore
) -> None:
    req = env.create_external("req1")
    record = store.get("req1")
    assert record.ek_cert_mode == "external"
    assert all(ek.certificate_der is None for ek in record.eks)
    (handles,) = _tools(store, "req1", ["tpm2_getcap", "handles-nv-index"])
    assert _nv_handles(handles).isdisjoint({int(RSA_NV, 16), int(ECC_NV, 16)})

    doc = json.loads((req / "request.json").read_text())
    assert doc["format"] == "vtpm-trust/ek-request/1"
    assert doc["vm"] == {"id": str(record.vm_id), "name": "req1"}
    assert "cannot sign a PKCS#10 request" in doc["note"]
    assert [(e["kind"], e["template"], e["nv_index"]) for e in doc["eks"]] == [
        ("rsa2048", "L-1", RSA_NV),
        ("ecc-p256", "L-2", ECC_NV),
    ]
    for e, ek in zip(doc["eks"], record.eks, strict=True):
        assert (req / e["ek_public_file"]).read_bytes() == ek.public
        pub = Public.parse_tpm2b(ek.public)
        assert pub.same_key(load_pem_public_key((req / e["ek_pem_file"]).read_bytes()))  # type: ignore[arg-type]
        assert e["san"]["tpmManufacturer"] == f"id:{record.tpm.manufacturer:08X}"
        assert e["certified"] is False
    # tpm2-tools agrees that the exported TPM2B_PUBLIC is the EK the TPM makes
    ek_pub = env.root / "req1-createek.pub"
    _tools(store, "req1", ["tpm2_createek", "-c", "-", "-G", "rsa", "-u", str(ek_pub)])
    assert Public.load(ek_pub.read_bytes()).same_key(Public.parse_tpm2b(record.eks[0].public))


# -- round trip -------------------------------------------------------------------------


def test_round_trip_other_ca_import_nvread_and_register(env: Env, store: VtpmStore) -> None:
    req = env.create_external("rt1")
    rsa_pem = env.issue_other(req, "rsa2048", env.root / "rt1-rsa.pem")
    ecc_pem = env.issue_other(req, "ecc-p256", env.root / "rt1-ecc.pem")
    chain = env.other_ca / "chain.pem"
    for pem, nv in ((rsa_pem, RSA_NV), (ecc_pem, ECC_NV)):
        r = env.run("ek", "import", "rt1", str(pem), "--chain", str(chain))
        assert r.exit_code == 0, r.output
        assert f"written at NV {nv}" in r.output and "write-locked" in r.output

    # NV read back by tpm2-tools equals the certificates, locked with the usual attributes
    rsa_out, ecc_out = env.root / "rt1-rsa.nv", env.root / "rt1-ecc.nv"
    _, _, public = _tools(
        store, "rt1",
        ["tpm2_nvread", RSA_NV, "-C", "o", "-o", str(rsa_out)],
        ["tpm2_nvread", ECC_NV, "-C", "o", "-o", str(ecc_out)],
        ["tpm2_nvreadpublic"],
    )  # fmt: skip
    assert rsa_out.read_bytes() == _der(rsa_pem)
    assert ecc_out.read_bytes() == _der(ecc_pem)
    for nv in (RSA_NV, ECC_NV):
        block = public.split(f"0x{int(nv, 16):x}:\n")[1].split("\n0x")[0]
        assert f"value: {LOCKED}" in block, block
    record = store.get("rt1")
    assert [ek.certificate_der for ek in record.eks] == [_der(rsa_pem), _der(ecc_pem)]
    assert all(ek.serial is None for ek in record.eks)  # never revoked at our CA

    # the verifier's own EK validation: third-party root trusted -> valid; ours -> refused
    other = TrustStore(tuple(load_certificates(env.other_ca / "ca.pem")))
    ok = validate_ek_certificate(
        rsa_out.read_bytes(), other, ek_public=Public.parse_tpm2b(record.eks[0].public)
    )
    assert "Example Corp TPM EK Root" in ok.anchor.subject
    ours = TrustStore(tuple(load_certificates(env.ours_ca / "ca.pem")))
    with pytest.raises(VerificationError, match=r"ek\.chain"):
        validate_ek_certificate(rsa_out.read_bytes(), ours)

    # registration + attestation at a real verifier trusting only the third-party root
    from verifier.service.config import init_home

    home = env.root / "verifier-home"
    init_home(home, verifier_id="ek-external-test")
    shutil.copyfile(env.other_ca / "ca.pem", home / "roots" / "root.pem")
    server = Server(home, None, workers=1).start()
    try:
        with store.running("rt1", transport="tcp") as tpm:
            tcti = tpm.tool_env["TPM2TOOLS_TCTI"]
            r = CliRunner().invoke(
                cli,
                ["attest", "--verifier", server.url, "--tpm", tcti, "--token-file",
                 str(env.root / "rt1-attester.json"), "--json"],
                catch_exceptions=False,
            )  # fmt: skip
    finally:
        server.stop()
    out = json.loads(r.stdout)
    assert out["report"]["quote_verified"] is True
    assert out["report"]["trust_vector"]["instance-identity"] == 2  # affirming: EK chain ok
    assert out["status"] == "warning"  # only because no policy is assigned
    assert [w["message"] for w in out["report"]["warnings"]] == ["no policy assigned"]


def test_round_trip_openssl_third_party(env: Env, store: VtpmStore) -> None:
    req = env.create_external("os1")
    pem = env.issue_openssl(req, "rsa2048", env.root / "os1-rsa.pem")
    r = env.run("ek", "import", "os1", str(pem), "--chain", str(env.ossl_root))
    assert r.exit_code == 0, r.output
    out = env.root / "os1.nv"
    _tools(store, "os1", ["tpm2_nvread", RSA_NV, "-C", "o", "-o", str(out)])
    assert out.read_bytes() == _der(pem)
    # the ECC EK stays uncertified and its index undefined
    assert store.get("os1").ek("ecc-p256").certificate_der is None


def test_same_certificate_again_is_a_no_op(env: Env, store: VtpmStore) -> None:
    req = env.create_external("again1")
    pem = env.issue_other(req, "rsa2048", env.root / "again1.pem")
    args = ("ek", "import", "again1", str(pem), "--chain", str(env.other_ca / "chain.pem"))
    assert env.run(*args).exit_code == 0
    r = env.run(*args)
    assert r.exit_code == 0, r.output
    assert "already locked in NV (unchanged)" in r.output


def test_profile_warn_imports_with_warning(env: Env, store: VtpmStore) -> None:
    req = env.create_external("warn1")
    pem = env.issue_openssl(req, "rsa2048", env.root / "warn1.pem", usage="digitalSignature")
    r = env.run("ek", "import", "warn1", str(pem), "--chain", str(env.ossl_root),
                "--profile", "warn")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning: profile: ek.profile.key_usage" in r.output
    assert store.get("warn1").ek("rsa2048").certificate_der == _der(pem)


# -- refusals ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refusal_vtpm(env: Env) -> tuple[str, Path]:
    """vTPM "ref1" with its RSA certificate imported, plus a second vTPM's request."""
    req = env.create_external("ref1")
    pem = env.issue_other(req, "rsa2048", env.root / "ref1-rsa.pem")
    r = env.run("ek", "import", "ref1", str(pem), "--chain", str(env.other_ca / "chain.pem"))
    assert r.exit_code == 0, r.output
    return "ref1", req


def _refusal_inputs(env: Env, req: Path, case: str) -> tuple[list[str], int, str]:
    chain = str(env.other_ca / "chain.pem")
    if case == "fail/key/another-vtpm":
        other_req = env.create_external("ref2")
        pem = env.issue_other(other_req, "rsa2048", env.root / "ref2-rsa.pem")
        return [str(pem), "--chain", chain], 1, r"ek\.key: the certificate's key is not any EK"
    if case == "fail/key/wrong-kind":
        pem = env.issue_other(req, "ecc-p256", env.root / "ref1-ecc-k.pem")
        return [str(pem), "--chain", chain, "--ek", "rsa2048"], 1, "is not the rsa2048 EK"
    if case == "fail/locked/other-certificate":
        pem = env.issue_openssl(req, "rsa2048", env.root / "ref1-second.pem")
        return (
            [str(pem), "--chain", str(env.ossl_root)],
            1,
            (r"the rsa2048 EK already has a certificate \(NV 0x01c00002, locked\); refusing"),
        )
    if case == "fail/chain/wrong-ca":
        pem = env.issue_other(req, "ecc-p256", env.root / "ref1-ecc-c.pem")
        return [str(pem), "--chain", str(env.ours_ca / "chain.pem")], 1, r"ek\.chain"
    if case == "fail/chain/missing":
        pem = env.issue_other(req, "ecc-p256", env.root / "ref1-ecc-m.pem")
        return [str(pem)], 2, "--chain CHAIN is required"
    if case == "fail/profile/key-usage":
        pem = env.issue_openssl(req, "ecc-p256", env.root / "ref1-ecc-p.pem",
                                usage="digitalSignature")  # fmt: skip
        return [str(pem), "--chain", str(env.ossl_root)], 1, r"ek\.profile\.key_usage"
    if case == "fail/malformed/garbage":
        bad = env.root / "garbage.pem"
        bad.write_bytes(
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
        )
        return [str(bad), "--chain", chain], 2, "not an X.509 certificate"
    if case == "fail/malformed/truncated-der":
        der = _der(env.root / "ref1-rsa.pem")
        bad = env.root / "truncated.der"
        bad.write_bytes(der[: len(der) // 2])
        return [str(bad), "--chain", chain], 2, "not an X.509 certificate"
    if case == "fail/malformed/chain":
        pem = env.issue_other(req, "ecc-p256", env.root / "ref1-ecc-x.pem")
        bad = env.root / "bad-chain.pem"
        bad.write_bytes(b"this is not a certificate bundle\n")
        return [str(pem), "--chain", str(bad)], 2, "bad-chain.pem"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "fail/key/another-vtpm",
        "fail/key/wrong-kind",
        "fail/locked/other-certificate",
        "fail/chain/wrong-ca",
        "fail/chain/missing",
        "fail/profile/key-usage",
        "fail/malformed/garbage",
        "fail/malformed/truncated-der",
        "fail/malformed/chain",
    ],
)
def test_import_refusals(
    env: Env, store: VtpmStore, refusal_vtpm: tuple[str, Path], case: str
) -> None:
    name, req = refusal_vtpm
    before = store.get(name).to_json()
    args, code, pattern = _refusal_inputs(env, req, case)
    r = env.run("ek", "import", name, *args)
    assert r.exit_code == code, r.output
    assert re.search(pattern, r.output), r.output
    assert "Traceback" not in r.output
    assert store.get(name).to_json() == before  # nothing changed
    (nv,) = _tools(store, name, ["tpm2_getcap", "handles-nv-index"])
    assert _nv_handles(nv) == {int(RSA_NV, 16)}  # the uncertified EK's index was not touched


def test_locked_in_nv_but_not_in_record_is_refused(env: Env, store: VtpmStore) -> None:
    """A vTPM made by our CA (certs locked in NV) refuses a third-party certificate."""
    r = env.run("create", "ours1", "--ca-home", str(env.ours_ca), "--ca-passphrase-file",
                str(env.passphrase))  # fmt: skip
    assert r.exit_code == 0, r.output
    req = env.root / "ours1-req"
    assert env.run("ek", "request", "ours1", "--out", str(req)).exit_code == 0
    assert json.loads((req / "request.json").read_text())["eks"][0]["certified"] is True
    pem = env.issue_other(req, "rsa2048", env.root / "ours1-other.pem")
    r = env.run("ek", "import", "ours1", str(pem), "--chain", str(env.other_ca / "chain.pem"))
    assert r.exit_code == 1
    assert "already has a certificate" in r.output
    # and the NV-level check alone (record without the certificate, NV still locked)
    from vtpm_core.ek_external import import_certificate
    from vtpm_core.errors import ConflictError

    record = store.get("ours1")
    stripped = dataclasses.replace(
        record,
        eks=tuple(dataclasses.replace(e, certificate_der=None) for e in record.eks),
        raw=b"",
    )
    store.write_record(store.state_dir("ours1").parent, stripped)
    with pytest.raises(ConflictError, match=r"NV 0x01c00002 \(rsa2048 EK\) already holds a locked"):
        import_certificate(store, "ours1", _der(pem))


def test_interrupted_import_unlocked_index_is_rewritten(env: Env, store: VtpmStore) -> None:
    """An index defined and written but not locked (a crash before NV_WriteLock) is redone."""
    from vtpm_core.provision import EsapiTpm, write_certificate

    req = env.create_external("crash1")
    pem = env.issue_other(req, "rsa2048", env.root / "crash1.pem")
    with store.running("crash1", transport="unix") as tpm:
        write_certificate(
            EsapiTpm(tpm.esapi()), int(RSA_NV, 16), b"\x30\x03\x02\x01\x00", lock=False
        )
    r = env.run("ek", "import", "crash1", str(pem), "--chain", str(env.other_ca / "chain.pem"))
    assert r.exit_code == 0, r.output
    out = env.root / "crash1.nv"
    (_, public) = _tools(
        store, "crash1", ["tpm2_nvread", RSA_NV, "-C", "o", "-o", str(out)], ["tpm2_nvreadpublic"]
    )
    assert out.read_bytes() == _der(pem)
    assert f"value: {LOCKED}" in public


def test_running_vtpm_is_refused(env: Env, store: VtpmStore) -> None:
    req = env.create_external("run1")
    pem = env.issue_other(req, "rsa2048", env.root / "run1.pem")
    detached = store.start_detached("run1", port=_free_port())
    try:
        r = env.run("ek", "import", "run1", str(pem), "--chain", str(env.other_ca / "chain.pem"))
    finally:
        assert store.stop("run1")
    assert r.exit_code == 1
    assert "vTPM 'run1' is running; `vtpm stop run1` first" in r.output
    assert detached.pid > 0
    assert store.get("run1").ek("rsa2048").certificate_der is None


def _free_port() -> int:
    """A port P with P+1 free too: swtpm serves TPM commands on P and control on P+1."""
    from vtpm_core.swtpm import free_tcp_port_pair

    return free_tcp_port_pair()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_load_certificate_only_parse_error_escapes(data: bytes) -> None:
    from vtpm_core.ek_external import load_certificate
    from vtpm_core.errors import ParseError

    for blob in (data, b"-----BEGIN CERTIFICATE-----\n" + data + b"\n-----END CERTIFICATE-----\n"):
        try:
            der = load_certificate(blob, "fuzz")
        except ParseError:
            continue
        assert x509.load_der_x509_certificate(der).public_bytes(Encoding.DER) == der
