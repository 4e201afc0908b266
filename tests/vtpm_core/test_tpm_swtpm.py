"""TPM structures made by real tpm2-tools and ESAPI on one real swtpm per module.

tpm2_createek / tpm2_createak / tpm2_quote write the files; our parsers read
them, our templates make the same EKs through ESAPI CreatePrimary, and our
signature check verifies the quotes the TPM signed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC

from vtpm_core.errors import VerificationError
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.tpm import (
    EK_TEMPLATES,
    ST_ATTEST_QUOTE,
    TPM_GENERATED_VALUE,
    Attest,
    PcrValues,
    Public,
    Signature,
    TpmAlg,
    match_ek_template,
    require_ek_template,
)

pytestmark = pytest.mark.swtpm


@dataclass
class ModuleTools:
    tpm: SwtpmProcess
    cwd: Path

    def run(self, *args: str) -> str:
        result = subprocess.run(
            list(args),
            env=self.tpm.tool_env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        subprocess.run(
            ["tpm2_flushcontext", "-t"], env=self.tpm.tool_env, capture_output=True, timeout=30
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def read(self, name: str) -> bytes:
        return (self.cwd / name).read_bytes()


@pytest.fixture(scope="module")
def mtools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleTools]:
    """One swtpm for the module, with an RSA and an ECC EK made by tpm2_createek."""
    work = tmp_path_factory.mktemp("tpm")
    with SwtpmProcess(work / "state") as tpm:
        t = ModuleTools(tpm, work)
        t.run("tpm2_createek", "-c", "ek_rsa.ctx", "-G", "rsa", "-u", "ek_rsa.pub")
        t.run("tpm2_createek", "-c", "ek_ecc.ctx", "-G", "ecc", "-u", "ek_ecc.pub")
        yield t


@pytest.mark.parametrize(("alg", "template_id"), [("rsa", "L-1"), ("ecc", "L-2")])
def test_createek_public_matches_template_and_createprimary(
    mtools: ModuleTools, alg: str, template_id: str
) -> None:
    data = mtools.read(f"ek_{alg}.pub")
    ek = Public.load(data)
    assert ek.to_tpm2b() == data
    assert match_ek_template(ek) is EK_TEMPLATES[template_id]
    assert require_ek_template(ek).id == template_id

    template = EK_TEMPLATES[template_id]
    esapi = mtools.tpm.esapi()
    in_public, _ = TPM2B_PUBLIC.unmarshal(template.public_template())
    handle, out_public, _, _, _ = esapi.create_primary(
        None, in_public, primary_handle=ESYS_TR.ENDORSEMENT
    )
    try:
        made = Public.parse(bytes(out_public.marshal())[2:])
    finally:
        esapi.flush_context(handle)
    # the TPM is deterministic for one seed and one template
    assert made.raw == ek.raw
    assert made.name() == ek.name()
    assert made.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == ek.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("template_id", ["H-1", "H-2", "H-3"])
def test_high_range_templates_create_on_swtpm(mtools: ModuleTools, template_id: str) -> None:
    template = EK_TEMPLATES[template_id]
    esapi = mtools.tpm.esapi()
    in_public, _ = TPM2B_PUBLIC.unmarshal(template.public_template())
    handle, out_public, _, _, _ = esapi.create_primary(
        None, in_public, primary_handle=ESYS_TR.ENDORSEMENT
    )
    esapi.flush_context(handle)
    made = Public.parse_tpm2b(bytes(out_public.marshal()))
    assert match_ek_template(made) is template
    made.public_key()  # a real key came back


def test_createek_name_matches_tpm2_readpublic(mtools: ModuleTools) -> None:
    out = mtools.run("tpm2_readpublic", "-c", "ek_rsa.ctx", "-n", "ek_rsa.name", "-o", "ek_rsa.rp")
    ek = Public.load(mtools.read("ek_rsa.rp"))
    assert ek.name() == mtools.read("ek_rsa.name")
    assert ek.name().hex() in out


AK_KINDS = [
    ("rsa", "rsassa", "sha256"),
    ("rsa", "rsapss", "sha256"),
    ("ecc", "ecdsa", "sha256"),
    ("rsa", "rsassa", "sha1"),
    ("ecc", "ecdsa", "sha384"),
    ("rsa", "rsapss", "sha512"),
]
AK_IDS = [f"{g}-{s}-{h}" for g, s, h in AK_KINDS]
NONCE = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def aks(mtools: ModuleTools) -> dict[str, str]:
    """One AK per kind under the RSA EK, with a quote over sha256:0,1,2+sha1:7 each."""
    made = {}
    for (g, s, h), ak_id in zip(AK_KINDS, AK_IDS, strict=True):
        p = f"ak_{ak_id}"
        mtools.run(
            "tpm2_createak",
            "-C",
            "ek_rsa.ctx",
            "-c",
            f"{p}.ctx",
            "-G",
            g,
            "-g",
            h,
            "-s",
            s,
            "-u",
            f"{p}.pub",
            "-n",
            f"{p}.name",
        )
        mtools.run("tpm2_readpublic", "-c", f"{p}.ctx", "-f", "pem", "-o", f"{p}.pem")
        mtools.run(
            "tpm2_quote",
            "-c",
            f"{p}.ctx",
            "-l",
            "sha256:0,1,2+sha1:7",
            "-q",
            NONCE,
            "-g",
            h,
            "--scheme",
            s,
            "-m",
            f"{p}.msg",
            "-s",
            f"{p}.sig",
            "-o",
            f"{p}.pcrs",
        )
        mtools.run(
            "tpm2_quote",
            "-c",
            f"{p}.ctx",
            "-l",
            "sha256:0,1,2+sha1:7",
            "-q",
            NONCE,
            "-g",
            h,
            "--scheme",
            s,
            "-m",
            f"{p}.vmsg",
            "-s",
            f"{p}.vsig",
            "-o",
            f"{p}.vpcrs",
            "-F",
            "values",
        )
        made[ak_id] = p
    return made


@pytest.mark.parametrize("ak_id", AK_IDS)
def test_tpm2_tools_ak_and_quote(mtools: ModuleTools, aks: dict[str, str], ak_id: str) -> None:
    p = aks[ak_id]
    g, s, h = AK_KINDS[AK_IDS.index(ak_id)]
    ak = Public.load(mtools.read(f"{p}.pub"))
    assert ak.to_tpm2b() == mtools.read(f"{p}.pub")
    assert ak.name() == mtools.read(f"{p}.name")
    assert ak.type == (TpmAlg.RSA if g == "rsa" else TpmAlg.ECC)
    assert ak.is_signing_key and ak.is_restricted and not ak.is_decryption_key
    assert match_ek_template(ak) is None
    pem = Public.load(mtools.read(f"{p}.pem"))
    assert pem.from_pem and pem.same_key(ak)
    assert ak.to_pem() == mtools.read(f"{p}.pem")

    for msg, sig_file, pcr_file in (("msg", "sig", "pcrs"), ("vmsg", "vsig", "vpcrs")):
        attest = Attest.parse(mtools.read(f"{p}.{msg}"))
        assert attest.magic == TPM_GENERATED_VALUE and attest.type == ST_ATTEST_QUOTE
        assert attest.extra_data == bytes.fromhex(NONCE)
        assert attest.qualified_signer  # the AK's qualified name
        quote = attest.quote
        assert quote is not None
        assert str(quote.pcr_select) == "sha256:0,1,2+sha1:7"
        sig = Signature.parse(mtools.read(f"{p}.{sig_file}"))
        assert sig.scheme == s and sig.hash_name == h
        sig.verify(ak, attest.raw)
        sig.verify(pem, attest.raw)
        with pytest.raises(VerificationError, match="does not verify"):
            sig.verify(ak, attest.raw + b"x")
        pcrs = PcrValues.load(mtools.read(f"{p}.{pcr_file}"), quote.pcr_select)
        assert pcrs.selection.as_sets() == quote.pcr_select.as_sets()
        assert pcrs.digest(quote.pcr_select, sig.hash_alg) == quote.pcr_digest
    assert quote is not None
    assert (
        PcrValues.load(mtools.read(f"{p}.pcrs")).to_json()
        == PcrValues.load(mtools.read(f"{p}.vpcrs"), quote.pcr_select).to_json()
    )


def test_signature_with_another_ak_fails(mtools: ModuleTools, aks: dict[str, str]) -> None:
    rsa1 = Public.load(mtools.read(f"{aks['rsa-rsassa-sha256']}.pub"))
    ecc = Public.load(mtools.read(f"{aks['ecc-ecdsa-sha256']}.pub"))
    p = aks["rsa-rsapss-sha256"]
    attest, sig = mtools.read(f"{p}.msg"), Signature.parse(mtools.read(f"{p}.sig"))
    with pytest.raises(VerificationError, match="does not verify"):
        sig.verify(rsa1, attest)
    with pytest.raises(VerificationError, match=r"not ECC|not RSA"):
        sig.verify(ecc, attest)


def test_ek_is_not_an_ak_and_ak_is_not_an_ek(mtools: ModuleTools, aks: dict[str, str]) -> None:
    ak = Public.load(mtools.read(f"{aks['rsa-rsassa-sha256']}.pub"))
    with pytest.raises(VerificationError, match=r"ek.template: not a TCG EK: objectAttributes"):
        require_ek_template(ak)
