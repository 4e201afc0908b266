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

from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.tpm import EK_TEMPLATES, Public, match_ek_template, require_ek_template

pytestmark = pytest.mark.swtpm


@dataclass
class ModuleTools:
    tpm: SwtpmProcess
    cwd: Path

    def run(self, *args: str) -> str:
        result = subprocess.run(
            list(args), env=self.tpm.tool_env, cwd=self.cwd, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
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
