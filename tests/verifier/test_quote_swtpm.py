"""verify_quote on evidence tpm2-tools makes on a real swtpm: valid, each attack, tpm2_checkquote.

One swtpm per module (making AKs is the slow part): an RSA EK, AKs of every
kind the swtpm supports, quotes with a nonce over two banks, and the
attacks: a non-restricted signing key and a sign+decrypt key (both accepted
by tpm2_checkquote 5.4), a bad-magic structure signed by the real AK through
a TPM2_Hash ticket, and a TPM2_Certify attestation (type 0x8017) by the AK.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vtpm_core.swtpm import SwtpmProcess

pytestmark = pytest.mark.swtpm

NONCE = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
PCR_LIST = "sha1:0,16+sha256:0,1,2,16"
# name -> (tpm2_createak -G, -g, -s); the quote uses the same hash and scheme
AK_KINDS = {
    "rsa-rsassa-sha256": ("rsa", "sha256", "rsassa"),
    "rsa-rsapss-sha256": ("rsa", "sha256", "rsapss"),
    "ecc-ecdsa-sha256": ("ecc", "sha256", "ecdsa"),
    "rsa-rsassa-sha1": ("rsa", "sha1", "rsassa"),
    "rsa-rsassa-sha384": ("rsa", "sha384", "rsassa"),
    "ecc384-ecdsa-sha384": ("ecc384", "sha384", "ecdsa"),
}
PLAIN_SIGNER = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"
SIGN_DECRYPT = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign|decrypt"


@dataclass
class QuoteLab:
    tpm: SwtpmProcess
    dir: Path
    log: list[str] = field(default_factory=list)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args),
            env=self.tpm.tool_env,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        subprocess.run(
            ["tpm2_flushcontext", "-t"], env=self.tpm.tool_env, capture_output=True, timeout=30
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def checkquote(
        self, ak: str, msg: str, sig: str, pcrs: str | None, hash_alg: str, nonce: bytes
    ) -> bool:
        args = [
            "tpm2_checkquote",
            "-u",
            ak,
            "-m",
            msg,
            "-s",
            sig,
            "-g",
            hash_alg,
            "-q",
            nonce.hex(),
        ]
        if pcrs is not None:
            args += ["-f", pcrs]
        return self.run(*args, check=False).returncode == 0


def _build_lab(state: Path, work: Path) -> Iterator[QuoteLab]:
    with SwtpmProcess(state) as tpm:
        lab = QuoteLab(tpm, work)
        lab.run("tpm2_pcrextend", "16:sha256=" + "ab" * 32 + ",sha1=" + "cd" * 20)
        lab.run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
        for name, (key, hash_alg, scheme) in AK_KINDS.items():
            lab.run(
                "tpm2_createak", "-C", "ek.ctx", "-c", f"{name}.ctx", "-G", key, "-g", hash_alg,
                "-s", scheme, "-u", f"{name}.pub", "-n", f"{name}.name",
            )  # fmt: skip
            lab.run(
                "tpm2_quote", "-c", f"{name}.ctx", "-l", PCR_LIST, "-q", NONCE.hex(),
                "-m", f"{name}.msg", "-s", f"{name}.sig", "-o", f"{name}.pcrs", "-g", hash_alg,
                "--scheme", scheme,
            )  # fmt: skip
        # the same kind of quote with the PCRs written in -F values form
        lab.run(
            "tpm2_quote", "-c", "rsa-rsassa-sha256.ctx", "-l", "sha256:0,1,2,16",
            "-q", NONCE.hex(), "-m", "values.msg", "-s", "values.sig", "-o", "values.pcrs",
            "-F", "values", "-g", "sha256",
        )  # fmt: skip
        # keys that must never be accepted as AKs
        lab.run("tpm2_createprimary", "-C", "o", "-c", "prim.ctx")
        for name, attrs in (("plain", PLAIN_SIGNER), ("signdecrypt", SIGN_DECRYPT)):
            lab.run(
                "tpm2_create", "-C", "prim.ctx", "-G", "rsa", "-a", attrs,
                "-u", f"{name}.pub", "-r", f"{name}.priv",
            )  # fmt: skip
            lab.run(
                "tpm2_load", "-C", "prim.ctx", "-u", f"{name}.pub", "-r", f"{name}.priv",
                "-c", f"{name}.ctx",
            )  # fmt: skip
        # 1. the plain signing key signs a forged TPMS_ATTEST claiming a nonce never quoted
        forged = lab.read("rsa-rsassa-sha256.msg").replace(NONCE, b"\x42" * 32)
        (work / "forged.msg").write_bytes(forged)
        lab.run(
            "tpm2_sign",
            "-c",
            "plain.ctx",
            "-g",
            "sha256",
            "-s",
            "rsassa",
            "-o",
            "forged.sig",
            "forged.msg",
        )
        # 2. a real TPM2_Quote by the sign+decrypt key
        lab.run(
            "tpm2_quote", "-c", "signdecrypt.ctx", "-l", "sha256:0,16",
            "-q", NONCE.hex(), "-m", "signdecrypt.msg", "-s", "signdecrypt.sig",
            "-o", "signdecrypt.pcrs", "-g", "sha256",
        )  # fmt: skip
        # 3. the real AK signs a structure with another magic (TPM2_Hash gives a ticket for it)
        bad_magic = b"\xff\x54\x43\x48" + lab.read("rsa-rsassa-sha256.msg")[4:]
        (work / "badmagic.msg").write_bytes(bad_magic)
        lab.run(
            "tpm2_hash",
            "-C",
            "o",
            "-g",
            "sha256",
            "-t",
            "bm.ticket",
            "-o",
            "bm.digest",
            "badmagic.msg",
        )
        lab.run(
            "tpm2_sign", "-c", "rsa-rsassa-sha256.ctx", "-g", "sha256", "-s", "rsassa",
            "-t", "bm.ticket", "-o", "badmagic.sig", "badmagic.msg",
        )  # fmt: skip
        # 4. a TPM2_Certify attestation (type 0x8017) by the real AK (tpm2_certify 5.4 has no -q)
        lab.run(
            "tpm2_certify", "-c", "plain.ctx", "-C", "rsa-rsassa-sha256.ctx", "-g", "sha256",
            "-o", "certify.msg", "-s", "certify.sig", "-f", "tss",
        )  # fmt: skip
        yield lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuoteLab]:
    base = tmp_path_factory.mktemp("quotes")
    yield from _build_lab(base / "state", base)


# --- tpm2_checkquote 5.4, the oracle (and where it is wrong) --------------------------


@pytest.mark.parametrize("kind", [k for k in AK_KINDS if k != "rsa-rsapss-sha256"])
def test_checkquote_accepts_valid_quotes(lab: QuoteLab, kind: str) -> None:
    hash_alg = AK_KINDS[kind][1]
    assert lab.checkquote(
        f"{kind}.pub", f"{kind}.msg", f"{kind}.sig", f"{kind}.pcrs", hash_alg, NONCE
    )


def test_checkquote_accepts_a_forgery_by_a_non_restricted_key(lab: QuoteLab) -> None:
    # the quote claims a nonce the TPM never saw; tpm2_checkquote only checks the signature
    assert lab.checkquote(
        "plain.pub", "forged.msg", "forged.sig", "rsa-rsassa-sha256.pcrs", "sha256", b"\x42" * 32
    )


def test_checkquote_accepts_a_quote_by_a_sign_decrypt_key(lab: QuoteLab) -> None:
    assert lab.checkquote(
        "signdecrypt.pub", "signdecrypt.msg", "signdecrypt.sig", "signdecrypt.pcrs", "sha256", NONCE
    )
