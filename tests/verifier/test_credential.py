"""MakeCredential in software against TPM2_ActivateCredential on a real swtpm.

The EK is created from the TCG default templates (L-1 RSA-2048, L-2 ECC
P-256) inside swtpm; activation runs through tpm2-pytss ESAPI with the EK's
policy (PolicySecret(TPM_RH_ENDORSEMENT)), and through
``tpm2_activatecredential``. ``tpm2_makecredential`` output is read back.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_SYM_DEF,
    TSS2_Exception,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from tests.conftest import Tools
from verifier.credential import Credential, make_credential
from vtpm_core.errors import ParseError, VerificationError
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.tpm import Public

pytestmark = pytest.mark.swtpm

AK_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"


@dataclass
class Keys:
    esapi: ESAPI
    ek: ESYS_TR
    ek_public: bytes  # TPMT_PUBLIC
    ak: ESYS_TR
    ak_name: bytes


def _keys(esapi: ESAPI, ek_type: str) -> Keys:
    _, template = create_ek_template(ek_type, NVReadEK(esapi))
    ek, ek_pub, _, _, _ = esapi.create_primary(
        TPM2B_SENSITIVE_CREATE(), template, primary_handle=ESYS_TR.ENDORSEMENT
    )
    ak_template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRS)
    ak, _, _, _, _ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), ak_template)
    return Keys(esapi, ek, ek_pub.publicArea.marshal(), ak, bytes(esapi.tr_get_name(ak)))


def _activate(keys: Keys, credential: Credential) -> bytes:
    esapi = keys.esapi
    session = esapi.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.POLICY,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )
    try:
        esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
        secret = esapi.activate_credential(
            keys.ak,
            keys.ek,
            TPM2B_ID_OBJECT(credential=credential.credential_blob),
            TPM2B_ENCRYPTED_SECRET(secret=credential.encrypted_secret),
            session1=ESYS_TR.PASSWORD,
            session2=session,
        )
    finally:
        esapi.flush_context(session)
    return bytes(secret)


@pytest.fixture
def esapi(swtpm: SwtpmProcess) -> Iterator[ESAPI]:
    ctx = swtpm.esapi()
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.mark.parametrize("ek_type", ["EK-RSA2048", "EK-ECC256"], ids=["ok/rsa-ek", "ok/ecc-ek"])
def test_swtpm_activates_our_credential(esapi: ESAPI, ek_type: str) -> None:
    keys = _keys(esapi, ek_type)
    secret = hashlib.sha256(b"challenge").digest()
    credential = make_credential(keys.ek_public, keys.ak_name, secret)
    assert _activate(keys, credential) == secret
    # a fresh credential for the same inputs differs (fresh seed), and works too
    again = make_credential(keys.ek_public, keys.ak_name, secret)
    assert again.encrypted_secret != credential.encrypted_secret
    assert _activate(keys, again) == secret


@pytest.mark.parametrize("ek_type", ["EK-RSA2048", "EK-ECC256"], ids=["fail/rsa-ek", "fail/ecc-ek"])
def test_wrong_ak_name_does_not_activate(esapi: ESAPI, ek_type: str) -> None:
    keys = _keys(esapi, ek_type)
    other_name = keys.ak_name[:2] + hashlib.sha256(b"another key").digest()
    credential = make_credential(keys.ek_public, other_name, b"secret")
    with pytest.raises(TSS2_Exception, match="integrity"):
        _activate(keys, credential)


def test_tampered_blob_does_not_activate(esapi: ESAPI) -> None:
    keys = _keys(esapi, "EK-RSA2048")
    credential = make_credential(keys.ek_public, keys.ak_name, b"secret")
    blob = bytearray(credential.credential_blob)
    blob[-1] ^= 1
    with pytest.raises(TSS2_Exception, match="integrity"):
        _activate(keys, Credential(bytes(blob), credential.encrypted_secret))


def _tools_keys(tools: Tools, alg: str) -> None:
    tools.run("tpm2_createek", "-c", "ek.ctx", "-G", alg, "-u", "ek.pub")
    tools.run(
        "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256",
        "-s", "rsassa", "-u", "ak.pub", "-n", "ak.name",
    )  # fmt: skip


def _tools_activate(tools: Tools, credential_file: str) -> bytes:
    tools.run("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
    tools.run("tpm2_policysecret", "-S", "session.ctx", "-c", "e")
    tools.run(
        "tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek.ctx", "-i", credential_file,
        "-o", "recovered", "-P", "session:session.ctx",
    )  # fmt: skip
    tools.run("tpm2_flushcontext", "session.ctx")
    return (tools.cwd / "recovered").read_bytes()


@pytest.mark.parametrize("alg", ["rsa", "ecc"], ids=["ok/tools/rsa", "ok/tools/ecc"])
def test_tpm2_activatecredential_recovers_our_secret(tools: Tools, alg: str) -> None:
    _tools_keys(tools, alg)
    ek_pub = (tools.cwd / "ek.pub").read_bytes()  # TPM2B_PUBLIC as tpm2-tools writes it
    ak_name = (tools.cwd / "ak.name").read_bytes()
    # the EK as the file's bytes (RSA case) or as a typed Public (TPMT_PUBLIC in .raw)
    ek = ek_pub if alg == "rsa" else Public.load(ek_pub)
    credential = make_credential(ek, ak_name, b"tools interop secret")
    (tools.cwd / "ours.cred").write_bytes(credential.to_tpm2_tools())
    assert _tools_activate(tools, "ours.cred") == b"tools interop secret"


def test_tpm2_makecredential_file_round_trips(tools: Tools) -> None:
    _tools_keys(tools, "rsa")
    (tools.cwd / "secret").write_bytes(b"made by tpm2-tools")
    ak_name = (tools.cwd / "ak.name").read_bytes()
    tools.run(
        "tpm2_makecredential", "-T", "none", "-u", "ek.pub", "-s", "secret",
        "-n", ak_name.hex(), "-o", "theirs.cred",
    )  # fmt: skip
    data = (tools.cwd / "theirs.cred").read_bytes()
    parsed = Credential.from_tpm2_tools(data)
    assert parsed.to_tpm2_tools() == data
    assert _tools_activate(tools, "theirs.cred") == b"made by tpm2-tools"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"\xba\xdc\xc0\xde", r"header at byte 0: 4 bytes", id="fail/tools-file/short"),
        pytest.param(b"\x00" * 12, r"magic at byte 0", id="fail/tools-file/magic"),
        pytest.param(
            b"\xba\xdc\xc0\xde\x00\x00\x00\x01\x00\x10abc",
            r"credentialBlob at byte 8: declares 16",
            id="fail/tools-file/truncated",
        ),
        pytest.param(
            b"\xba\xdc\xc0\xde\x00\x00\x00\x01\x00\x01a\x00\x01bX",
            r"end at byte 14: 1 trailing",
            id="fail/tools-file/trailing",
        ),
    ],
)
def test_tools_file_parse_errors(data: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        Credential.from_tpm2_tools(data)


def test_input_checks(tools: Tools) -> None:
    _tools_keys(tools, "rsa")
    ek_pub = (tools.cwd / "ek.pub").read_bytes()
    ak_name = (tools.cwd / "ak.name").read_bytes()
    ak_pub = (tools.cwd / "ak.pub").read_bytes()
    with pytest.raises(
        VerificationError, match=r"^credential\.secret: secret is 33 bytes, must be 1\.\.32"
    ):
        make_credential(ek_pub, ak_name, b"x" * 33)
    with pytest.raises(
        VerificationError, match=r"^credential\.ek: EK must be a restricted decryption key"
    ):
        make_credential(ak_pub, ak_name, b"x")
    with pytest.raises(ParseError, match=r"TPM2B_NAME\.digest at byte 2: 31 bytes, expected 32"):
        make_credential(ek_pub, ak_name[:-1], b"x")
    with pytest.raises(ParseError, match=r"TPMT_PUBLIC\.publicArea"):
        make_credential(ek_pub[:-3], ak_name, b"x")


def test_credential_file_written_by_us_is_readable(tmp_path: Path) -> None:
    credential = Credential(b"\x00\x20" + b"h" * 32 + b"e" * 18, b"s" * 256)
    assert Credential.from_tpm2_tools(credential.to_tpm2_tools()) == credential


def test_pem_ek_is_refused(tools: Tools) -> None:
    tools.run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    tools.run("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-u", "ak.pub", "-n", "ak.name")
    pem = tools.run("tpm2_print", "-t", "TPM2B_PUBLIC", "-f", "pem", "ek.pub").stdout.encode()
    with pytest.raises(VerificationError, match=r"^credential\.ek: a PEM key is not enough"):
        make_credential(Public.load(pem), (tools.cwd / "ak.name").read_bytes(), b"x")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_tools_file_parser_only_raises_parse_error(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        Credential.from_tpm2_tools(data)
    with contextlib.suppress(ParseError):
        Credential.from_tpm2_tools(b"\xba\xdc\xc0\xde\x00\x00\x00\x01" + data)
