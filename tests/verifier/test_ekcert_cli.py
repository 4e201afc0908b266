"""`vtpm ek verify`: exit codes 0/1/2, JSON report, flags, on corpus certificates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vtpm_cli.main import cli

EK = Path("ekcerts")


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["ek", "verify", *args])
    return result.exit_code, result.stdout, result.stderr


def test_valid_ecc_ek_human_output(corpus: Path) -> None:
    c = corpus / EK
    code, out, _ = _run(
        str(c / "stmicro/stm_ek_ecc_p256.der"),
        "--roots", str(c / "stmicro/chain/STM_ECC_01RT.pem"),
        "--intermediates", str(c / "stmicro/chain/STM_ECC_01I.pem"),
    )  # fmt: skip
    assert code == 0, out
    assert out.splitlines()[0] == "EK certificate valid"
    assert "manufacturer id:53544D20, model ST33HTPHAHB4" in out


def test_json_report_and_ek_public(corpus: Path, tmp_path: Path) -> None:
    c = corpus / EK
    cert = c / "infineon/infineon_ek_rsa_slb9670_ca007.der"
    pem = subprocess.run(
        ["openssl", "x509", "-inform", "der", "-in", str(cert), "-noout", "-pubkey"],
        capture_output=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    (tmp_path / "ek.pem").write_bytes(pem)
    code, out, _ = _run(
        str(cert), "--roots", str(c / "infineon/chain/Infineon_OPTIGA_RSA_Root_CA.pem"),
        "--intermediates", str(c / "infineon/chain/Infineon_OPTIGA_RSA_Manufacturing_CA_007.pem"),
        "--ek-public", str(tmp_path / "ek.pem"), "--json",
    )  # fmt: skip
    assert code == 0
    report = json.loads(out)
    assert report["valid"] is True
    assert report["tpm"] == {
        "manufacturer": "id:49465800",
        "model": "SLB 9670 TPM2.0",
        "version": "id:0728",
        "key_type": "rsa",
    }
    assert len(report["chain"]) == 3


@pytest.mark.parametrize(
    ("extra", "code", "check"),
    [
        pytest.param([], 1, "ek.chain.signature", id="fail/sha1/no-flag"),
        pytest.param(["--allow-sha1"], 1, "ek.validity", id="fail/expired-ek/no-flag"),
        pytest.param(["--allow-sha1", "--allow-expired-ek"], 0, None, id="ok/both-flags"),
        pytest.param(["--allow-sha1", "--at", "2020-06-01"], 0, None, id="ok/at-2020"),
    ],
)
def test_flags(corpus: Path, extra: list[str], code: int, check: str | None) -> None:
    c = corpus / EK
    got, out, err = _run(
        str(c / "stmicro/stm_ek_rsa_nuc1.der"), "--roots", str(c / "stmicro/chain/gstpmroot.crt"),
        "--intermediates", str(c / "stmicro/chain"), "--json", *extra,
    )  # fmt: skip
    assert got == code, (out, err)
    report = json.loads(out)
    if check is None:
        assert report["valid"] is True
    else:
        assert report == {"valid": False, "failed_check": check, "message": report["message"]}
        assert err.strip().startswith(f"invalid: {check}: ")
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["{cert}"], id="unreadable/no-roots"),
        pytest.param(["{junk}", "--roots", "{root}"], id="unreadable/not-a-cert"),
        pytest.param(["{cert}", "--roots", "{root}", "--at", "yesterday"], id="unreadable/bad-at"),
        pytest.param(["{cert}", "--roots", "{missing}"], id="unreadable/missing-roots"),
    ],
)
def test_unreadable_input_exits_2(corpus: Path, tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "junk").write_bytes(b"not a certificate")
    values = {
        "cert": str(corpus / EK / "stmicro/stm_ek_ecc_p256.der"),
        "root": str(corpus / EK / "stmicro/chain/STM_ECC_01RT.pem"),
        "junk": str(tmp_path / "junk"),
        "missing": str(tmp_path / "missing"),
    }
    code, _, err = _run(*[a.format(**values) for a in args])
    assert code == 2, err
    assert "Traceback" not in err


def test_installed_script(corpus: Path) -> None:
    c = corpus / EK
    vtpm = Path(sys.executable).with_name("vtpm")
    result = subprocess.run(
        [str(vtpm), "ek", "verify", str(c / "gce_vtpm/pca_tpm_ecc_sign_cert.der"),
         "--roots", str(c / "gce_vtpm/chain")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("invalid: ek.profile.key_usage: ECC EK needs key_agreement")
