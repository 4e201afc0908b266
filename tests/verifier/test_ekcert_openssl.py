"""EK chains made with the openssl CLI: expired intermediates, revocation by a CRL, key mismatch.

The PKI (root -> valid intermediate and expired intermediate -> EK certs with
the TCG EK profile) is built by ``openssl req`` / ``openssl ca``, and the CRL
by ``openssl ca -revoke`` + ``-gencrl``, so what we validate was not made by
our own code. ``openssl verify`` is run beside us as the oracle.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import Tools
from verifier.ekcert import (
    CertificateRevocationList,
    EkValidationOptions,
    TrustStore,
    parse_certificate,
    validate_ek_certificate,
)
from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.tpm import Public

CA_CONF = """
[ca]
default_ca = ca_default
[ca_default]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
crlnumber = {dir}/crlnumber
default_md = sha256
policy = policy_any
email_in_dn = no
unique_subject = no
copy_extensions = none
default_crl_days = 7
[policy_any]
commonName = optional
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ca_nc]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
nameConstraints = critical,permitted;DNS:example.com
[ca_not_ca]
basicConstraints = critical,CA:FALSE
keyUsage = critical,keyCertSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ek_rsa]
basicConstraints = critical,CA:FALSE
keyUsage = critical,keyEncipherment
extendedKeyUsage = 2.23.133.8.1
authorityKeyIdentifier = keyid
subjectAltName = critical,dirName:tpm_attrs
[ek_ecc]
basicConstraints = critical,CA:FALSE
keyUsage = critical,keyAgreement
extendedKeyUsage = 2.23.133.8.1
authorityKeyIdentifier = keyid
subjectAltName = critical,dirName:tpm_attrs
[ek_bad_ku]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = 2.23.133.8.1
subjectAltName = critical,dirName:tpm_attrs
[ek_no_san]
basicConstraints = critical,CA:FALSE
keyUsage = critical,keyEncipherment
extendedKeyUsage = 2.23.133.8.1
[tpm_attrs]
x.2.23.133.2.1 = id:56545054
x.2.23.133.2.2 = vtpm-trust test
x.2.23.133.2.3 = id:00010002
"""


@dataclass
class Pki:
    dir: Path
    root: Path
    intermediate: Path
    expired_intermediate: Path
    ek: Path
    ek_under_expired: Path
    ek_revoked: Path
    ek_bad_ku: Path
    ek_no_san: Path
    ek_key: Path
    crl: Path


def _openssl(*args: str, cwd: Path) -> str:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {result.stderr}")
    return result.stdout


def _ca_dir(base: Path, name: str) -> Path:
    d = base / name
    d.mkdir()
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(CA_CONF.format(dir=d))
    return d


def _issue(ca: Path, csr: Path, out: Path, ext: str, start: str, end: str, cwd: Path) -> None:
    _openssl(
        "ca", "-batch", "-config", str(ca / "ca.cnf"), "-cert", str(ca / "ca.pem"),
        "-keyfile", str(ca / "ca.key"), "-in", str(csr), "-out", str(out),
        "-extensions", ext, "-startdate", start, "-enddate", end, "-notext", cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    now = datetime.now(UTC)
    fmt = "%Y%m%d%H%M%SZ"
    start, end = (now - timedelta(days=1)).strftime(fmt), (now + timedelta(days=3650)).strftime(fmt)
    root = _ca_dir(base, "root")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(root / "ca.key"), "-out", str(root / "ca.pem"), "-days", "3650",
        "-subj", "/O=vtpm-trust test/CN=Test EK Root",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=base,
    )  # fmt: skip
    inters = {}
    for name, (s, e, ext) in {
        "inter": (start, end, "ca_ext"),
        "expired": ("20200101000000Z", "20210101000000Z", "ca_ext"),
        "nc": (start, end, "ca_nc"),
        "notca": (start, end, "ca_not_ca"),
    }.items():
        ca = _ca_dir(base, name)
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca / "ca.key"),
            "-out", str(ca / "ca.csr"), "-subj", f"/O=vtpm-trust test/CN=Test EK CA {name}",
            cwd=base,
        )  # fmt: skip
        _issue(root, ca / "ca.csr", ca / "ca.pem", ext, s, e, base)
        inters[name] = ca
    ek_key = base / "ek.key"
    _openssl(
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        str(ek_key),
        cwd=base,
    )
    csr = base / "ek.csr"
    _openssl("req", "-new", "-key", str(ek_key), "-out", str(csr), "-subj", "/", cwd=base)
    certs = {}
    for name, ca, ext in [
        ("ek", "inter", "ek_rsa"),
        ("ek_under_expired", "expired", "ek_rsa"),
        ("ek_revoked", "inter", "ek_rsa"),
        ("ek_bad_ku", "inter", "ek_bad_ku"),
        ("ek_no_san", "inter", "ek_no_san"),
        ("ek_under_nc", "nc", "ek_rsa"),
        ("ek_under_notca", "notca", "ek_rsa"),
    ]:
        certs[name] = base / f"{name}.pem"
        _issue(inters[ca], csr, certs[name], ext, start, end, base)
    inter = inters["inter"]
    signer = ("-config", str(inter / "ca.cnf"), "-cert", str(inter / "ca.pem"),
              "-keyfile", str(inter / "ca.key"))  # fmt: skip
    _openssl("ca", *signer, "-revoke", str(certs["ek_revoked"]), cwd=base)
    crl = base / "inter.crl.pem"
    _openssl("ca", *signer, "-gencrl", "-out", str(crl), cwd=base)
    return Pki(
        base, root / "ca.pem", inter / "ca.pem", inters["expired"] / "ca.pem",
        certs["ek"], certs["ek_under_expired"], certs["ek_revoked"], certs["ek_bad_ku"],
        certs["ek_no_san"], ek_key, crl,
    )  # fmt: skip


def _openssl_verify(pki: Pki, cert: Path, *extra: str) -> bool:
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki.root), "-untrusted", str(pki.intermediate),
         "-untrusted", str(pki.expired_intermediate), *extra, str(cert)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return result.returncode == 0


def _trust(pki: Pki) -> TrustStore:
    return TrustStore.load([pki.root], [pki.intermediate, pki.expired_intermediate])


def test_valid_ek_agrees_with_openssl(pki: Pki) -> None:
    result = validate_ek_certificate(pki.ek.read_bytes(), _trust(pki))
    assert (result.tpm_manufacturer, result.tpm_model, result.tpm_version) == (
        "id:56545054",
        "vtpm-trust test",
        "id:00010002",
    )
    assert [c.subject for c in result.chain[1:]] == [
        "Common Name: Test EK CA inter",  # openssl ca's policy keeps only the CN
        "Common Name: Test EK Root, Organization: vtpm-trust test",
    ]
    assert _openssl_verify(pki, pki.ek)


def test_expired_intermediate_only_with_the_flag(pki: Pki) -> None:
    assert not _openssl_verify(pki, pki.ek_under_expired)
    with pytest.raises(VerificationError, match=r"^ek\.chain\.validity: .*CA expired expired"):
        validate_ek_certificate(pki.ek_under_expired.read_bytes(), _trust(pki))
    options = EkValidationOptions(allow_expired_intermediates=True)
    result = validate_ek_certificate(
        pki.ek_under_expired.read_bytes(), _trust(pki), options=options
    )
    assert any("expired CA certificate accepted by policy" in w for w in result.warnings)


def test_revoked_ek_per_openssl_crl(pki: Pki) -> None:
    crl = CertificateRevocationList.load(pki.crl)
    assert _openssl_verify(pki, pki.ek_revoked)
    assert not _openssl_verify(pki, pki.ek_revoked, "-crl_check", "-CRLfile", str(pki.crl))
    with pytest.raises(
        VerificationError, match=r"^ek\.revoked: certificate serial 0x1001 .* is revoked"
    ):
        validate_ek_certificate(pki.ek_revoked.read_bytes(), _trust(pki), crls=(crl,))
    ok = validate_ek_certificate(pki.ek.read_bytes(), _trust(pki), crls=(crl,))
    assert ok.revocation[0].checked_by is not None
    # without the CRL the revoked cert passes, and the result says nothing was checked
    unchecked = validate_ek_certificate(pki.ek_revoked.read_bytes(), _trust(pki))
    assert all(s.checked_by is None for s in unchecked.revocation)


def test_stale_crl_fails_closed(pki: Pki) -> None:
    crl = CertificateRevocationList.load(pki.crl)
    later = EkValidationOptions(clock=lambda: datetime.now(UTC) + timedelta(days=30))
    with pytest.raises(VerificationError, match=r"^ek\.crl: CRL of .* is stale"):
        validate_ek_certificate(pki.ek.read_bytes(), _trust(pki), crls=(crl,), options=later)


def test_crl_with_a_bad_signature_is_refused(pki: Pki) -> None:
    der = bytearray(CertificateRevocationList.load(pki.crl).der)
    der[-5] ^= 0x01
    crl = CertificateRevocationList.parse(bytes(der))
    with pytest.raises(VerificationError, match=r"^ek\.crl: signature does not verify"):
        validate_ek_certificate(pki.ek.read_bytes(), _trust(pki), crls=(crl,))


def test_crl_parse_errors() -> None:
    with pytest.raises(ParseError, match=r"CRL\.tag at byte 0"):
        CertificateRevocationList.parse(b"junk")


@pytest.mark.parametrize(
    ("attr", "match"),
    [
        pytest.param(
            "ek_bad_ku",
            r"^ek\.profile\.key_usage: RSA EK needs key_encipherment",
            id="fail/profile/key-usage",
        ),
        pytest.param(
            "ek_no_san", r"^ek\.profile\.san: no subjectAltName", id="fail/profile/no-san"
        ),
    ],
)
def test_profile_failures(pki: Pki, attr: str, match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        validate_ek_certificate(getattr(pki, attr).read_bytes(), _trust(pki))


def test_ek_public_mismatch(pki: Pki) -> None:
    right = parse_certificate(pki.ek.read_bytes()).public_key
    assert right is not None
    assert validate_ek_certificate(pki.ek.read_bytes(), _trust(pki), ek_public=right)
    wrong = parse_certificate(pki.intermediate.read_bytes()).public_key
    assert wrong is not None
    with pytest.raises(VerificationError, match=r"^ek\.public: "):
        validate_ek_certificate(pki.ek.read_bytes(), _trust(pki), ek_public=wrong)


def test_tampered_ek_certificate_fails_signature(pki: Pki) -> None:
    der = bytearray(parse_certificate(pki.ek.read_bytes()).der)
    # flip a bit inside the SAN's model string: still parses, signature breaks
    index = bytes(der).index(b"vtpm-trust test")
    der[index] ^= 0x20
    with pytest.raises(
        VerificationError, match=r"^ek\.chain\.signature: signature does not verify"
    ):
        validate_ek_certificate(bytes(der), _trust(pki))


def test_missing_intermediate(pki: Pki) -> None:
    with pytest.raises(VerificationError, match=r"^ek\.chain: no issuer found"):
        validate_ek_certificate(pki.ek.read_bytes(), TrustStore.load([pki.root]))


@pytest.mark.swtpm
@pytest.mark.parametrize(
    ("alg", "section"), [("rsa", "ek_rsa"), ("ecc", "ek_ecc")], ids=["ok/rsa", "ok/ecc"]
)
def test_swtpm_ek_certified_by_openssl(pki: Pki, tools: Tools, alg: str, section: str) -> None:
    """A real swtpm EK public (tpm2_createek -u) certified with openssl -force_pubkey."""
    tools.run("tpm2_createek", "-c", "ek.ctx", "-G", alg, "-u", "ek.pub")
    pem = tools.run("tpm2_print", "-t", "TPM2B_PUBLIC", "-f", "pem", "ek.pub").stdout
    (tools.cwd / "ek.pem").write_text(pem)
    inter = pki.intermediate.parent
    _openssl(
        "x509", "-req", "-in", str(pki.dir / "ek.csr"), "-CA", str(pki.intermediate),
        "-CAkey", str(inter / "ca.key"), "-force_pubkey", str(tools.cwd / "ek.pem"),
        "-extfile", str(inter / "ca.cnf"), "-extensions", section, "-days", "30",
        "-set_serial", "0x5eed", "-out", str(tools.cwd / "ek.crt"), cwd=tools.cwd,
    )  # fmt: skip
    ek_public = Public.load((tools.cwd / "ek.pub").read_bytes())
    result = validate_ek_certificate(
        (tools.cwd / "ek.crt").read_bytes(), _trust(pki), ek_public=ek_public
    )
    assert result.profile.key_type == alg
    other = parse_certificate(pki.ek.read_bytes()).public_key
    assert other is not None
    with pytest.raises(VerificationError, match=r"^ek\.public: "):
        validate_ek_certificate((tools.cwd / "ek.crt").read_bytes(), _trust(pki), ek_public=other)
    # and through the CLI, with the TPM2B_PUBLIC file tpm2_createek wrote
    from click.testing import CliRunner

    from vtpm_cli.main import cli

    args = ["ek", "verify", str(tools.cwd / "ek.crt"), "--roots", str(pki.root),
            "--intermediates", str(pki.intermediate),
            "--ek-public", str(tools.cwd / "ek.pub")]  # fmt: skip
    assert CliRunner().invoke(cli, args).exit_code == 0
    tools.run(
        "tpm2_createek", "-c", "ek2.ctx", "-G", "rsa" if alg == "ecc" else "ecc", "-u", "ek2.pub"
    )
    wrong = CliRunner().invoke(cli, [*args[:-1], str(tools.cwd / "ek2.pub")])
    assert wrong.exit_code == 1 and wrong.stderr.startswith("invalid: ek.public: ")


@pytest.mark.parametrize(
    ("ca", "cert", "match"),
    [
        pytest.param("nc", "ek_under_nc", r"unsupported critical extension 2\.5\.29\.30",
                     id="fail/chain/critical-name-constraints"),
        pytest.param("notca", "ek_under_notca", r"is not a CA", id="fail/chain/issuer-not-a-ca"),
    ],
)  # fmt: skip
def test_bad_intermediates(pki: Pki, ca: str, cert: str, match: str) -> None:
    trust = TrustStore.load([pki.root], [pki.dir / ca / "ca.pem"])
    with pytest.raises(VerificationError, match=rf"^ek\.chain: .*{match}"):
        validate_ek_certificate((pki.dir / f"{cert}.pem").read_bytes(), trust)


def test_vm_identity_extension_is_read(pki: Pki, tmp_path: Path) -> None:
    """An EK cert with the VM identity extension of vtpm_core.vm_identity, made by openssl."""
    import uuid

    from vtpm_core.vm_identity import VM_IDENTITY_OID, VmIdentity

    identity = VmIdentity.build(
        uuid.UUID("12345678-1234-5678-1234-567812345678"), "web-01", "vtpm-7",
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )  # fmt: skip
    inter = pki.intermediate.parent
    ext = tmp_path / "ext.cnf"
    ext.write_text(
        (inter / "ca.cnf").read_text()
        + f"[ek_vm]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,keyEncipherment\n"
        f"extendedKeyUsage = 2.23.133.8.1\nsubjectAltName = critical,dirName:tpm_attrs\n"
        f"{VM_IDENTITY_OID} = DER:{identity.raw.hex()}\n"
    )
    _openssl(
        "x509", "-req", "-in", str(pki.dir / "ek.csr"), "-CA", str(pki.intermediate),
        "-CAkey", str(inter / "ca.key"), "-extfile", str(ext), "-extensions", "ek_vm",
        "-days", "30", "-set_serial", "0x7777", "-out", str(tmp_path / "ek.crt"), cwd=tmp_path,
    )  # fmt: skip
    result = validate_ek_certificate((tmp_path / "ek.crt").read_bytes(), _trust(pki))
    assert result.vm_identity is not None
    assert result.vm_identity.oid == VM_IDENTITY_OID and not result.vm_identity.critical
    assert result.vm_identity.decoded == identity
    # an EK cert without it has none
    assert validate_ek_certificate(pki.ek.read_bytes(), _trust(pki)).vm_identity is None
