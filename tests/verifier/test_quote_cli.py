"""`vtpm verify-quote` on tpm2-tools evidence: exit 0/1/2, one-line failures, JSON, --eventlog."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import Tools
from tests.verifier.test_quote_swtpm import NONCE, QuoteLab, _build_lab
from vtpm_cli.main import cli
from vtpm_core.measured_boot import BootDescription, simulate_boot
from vtpm_core.swtpm import SwtpmProcess

pytestmark = pytest.mark.swtpm
GOOD = "rsa-rsassa-sha256"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuoteLab]:
    base = tmp_path_factory.mktemp("quotes-cli")
    yield from _build_lab(base / "state", base)


def _run(lab: QuoteLab, *args: str, ak: str = f"{GOOD}.pub", stem: str = GOOD,
         pcrs: str | None = None, nonce: bytes = NONCE) -> tuple[int, str, str]:  # fmt: skip
    argv = [
        "verify-quote", "--ak", str(lab.dir / ak), "--message", str(lab.dir / f"{stem}.msg"),
        "--signature", str(lab.dir / f"{stem}.sig"),
        "--pcrs", str(lab.dir / (pcrs or f"{stem}.pcrs")), "--nonce", nonce.hex(), *args,
    ]  # fmt: skip
    result = CliRunner().invoke(cli, argv)
    return result.exit_code, result.stdout, result.stderr


def test_valid_quote(lab: QuoteLab) -> None:
    code, out, _ = _run(lab)
    assert code == 0
    assert out.splitlines()[0] == "quote valid"
    assert "  PCRs: sha1:0,16+sha256:0,1,2,16" in out


def test_valid_quote_json_lists_every_check(lab: QuoteLab) -> None:
    code, out, _ = _run(lab, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["valid"] is True
    assert [c["status"] for c in report["checks"]] == ["passed"] * 7
    assert report["quote"]["firmware_version"] == "0x2019102300163636"
    assert set(report["quote"]["pcrs"]["sha256"]) == {"0", "1", "2", "16"}


def test_values_form_and_json_pcrs(lab: QuoteLab, tmp_path: Path) -> None:
    code, _, err = _run(lab, stem="values")
    assert code == 0, err
    _, out, _ = _run(lab, "--json")
    (tmp_path / "pcrs.json").write_text(json.dumps(json.loads(out)["quote"]["pcrs"]))
    code, _, err = _run(lab, pcrs=str(tmp_path / "pcrs.json"))
    assert code == 0, err


@pytest.mark.parametrize(
    ("kwargs", "check"),
    [
        pytest.param({"nonce": b"\x42" * 32}, "quote.nonce", id="fail/nonce/other"),
        pytest.param(
            {"ak": "plain.pub", "stem": "forged", "pcrs": f"{GOOD}.pcrs", "nonce": b"\x42" * 32},
            "ak.attributes",
            id="fail/ak/non-restricted",
        ),
        pytest.param(
            {"ak": "rsa-rsassa-sha1.pub"}, "quote.signature", id="fail/signature/other-ak"
        ),
        pytest.param({"stem": "badmagic", "pcrs": f"{GOOD}.pcrs"}, "quote.magic", id="fail/magic"),
        pytest.param({"stem": "certify", "pcrs": f"{GOOD}.pcrs"}, "quote.type", id="fail/type"),
        pytest.param(
            {"pcrs": "signdecrypt.pcrs"}, "quote.pcr_select", id="fail/pcr_select/other-pcrs"
        ),
    ],
)
def test_invalid_exits_1_with_one_line_and_json(
    lab: QuoteLab, kwargs: dict[str, object], check: str
) -> None:
    code, out, err = _run(lab, "--json", **kwargs)  # type: ignore[arg-type]
    assert code == 1
    assert err.startswith(f"invalid: {check}: ") and len(err.strip().splitlines()) == 1
    report = json.loads(out)
    assert report["valid"] is False
    statuses = {c["check"]: c["status"] for c in report["checks"]}
    assert statuses[check] == "failed"
    names = [c["check"] for c in report["checks"]]
    assert all(statuses[n] == "passed" for n in names[: names.index(check)])
    assert all(statuses[n] == "not_run" for n in names[names.index(check) + 1 :])


def test_pem_ak_needs_the_flag(lab: QuoteLab, tmp_path: Path) -> None:
    pem = subprocess.run(
        ["tpm2_print", "-t", "TPM2B_PUBLIC", "-f", "pem", str(lab.dir / f"{GOOD}.pub")],
        capture_output=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    (tmp_path / "ak.pem").write_bytes(pem)
    code, _, err = _run(lab, ak=str(tmp_path / "ak.pem"))
    assert code == 1 and err.startswith("invalid: ak.attributes: only a public key was given")
    code, out, _ = _run(lab, "--ak-attributes-verified", "--json", ak=str(tmp_path / "ak.pem"))
    assert code == 0
    assert json.loads(out)["checks"][0] == {"check": "ak.attributes", "status": "skipped"}


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        pytest.param(["--nonce", "zz"], {}, id="unreadable/nonce-not-hex"),
        pytest.param([], {"ak": "forged.msg"}, id="unreadable/ak-not-a-public"),
        pytest.param([], {"pcrs": "ek.pub"}, id="unreadable/pcrs-garbage"),
        pytest.param([], {"stem": "missing"}, id="unreadable/missing-file"),
    ],
)
def test_unreadable_input_exits_2(lab: QuoteLab, args: list[str], kwargs: dict[str, str]) -> None:
    code, _, err = _run(lab, *args, **kwargs)  # type: ignore[arg-type]
    assert code == 2, err
    assert "Traceback" not in err


def test_eventlog_replays_to_the_quote(swtpm: SwtpmProcess, tools: Tools, tmp_path: Path) -> None:
    esapi = swtpm.esapi()
    try:
        boot = simulate_boot(
            BootDescription(kernel_cmdline="console=ttyS0 root=/dev/vda2"), esapi, ["sha256"]
        )
    finally:
        esapi.close()
    (tmp_path / "boot.log").write_bytes(boot.eventlog)
    pcrs = sorted(boot.pcrs["sha256"])
    tools.run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    tools.run("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256",
              "-s", "ecdsa", "-u", "ak.pub")  # fmt: skip
    selection = "sha256:" + ",".join(map(str, pcrs))
    tools.run("tpm2_quote", "-c", "ak.ctx", "-l", selection, "-q", NONCE.hex(),
              "-m", "q.msg", "-s", "q.sig", "-o", "q.pcrs", "-g", "sha256")  # fmt: skip
    argv = ["verify-quote", "--ak", str(tmp_path / "ak.pub"), "--message", str(tmp_path / "q.msg"),
            "--signature", str(tmp_path / "q.sig"), "--pcrs", str(tmp_path / "q.pcrs"),
            "--nonce", NONCE.hex(), "--eventlog", str(tmp_path / "boot.log")]  # fmt: skip
    result = CliRunner().invoke(cli, [*argv, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checks"][-1] == {"check": "eventlog.replay", "status": "passed"}
    assert report["eventlog"]["verified"] == {"sha256": pcrs}
    # --policy: a policy learned from this boot holds; one from another boot fails
    # with every failing rule in the report
    good_policy, other_policy = tmp_path / "good.yaml", tmp_path / "other-policy.yaml"
    learned = CliRunner().invoke(
        cli, ["policy", "learn", str(tmp_path / "boot.log"), "-o", str(good_policy)]
    )
    assert learned.exit_code == 0, learned.stderr
    result = CliRunner().invoke(cli, [*argv, "--policy", str(good_policy), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["policy"]["satisfied"] is True
    assert json.loads(result.stdout)["checks"][-1] == {"check": "policy", "status": "passed"}
    result = CliRunner().invoke(cli, [*argv[:-2], "--policy", str(good_policy)])
    assert result.exit_code == 2
    assert "--policy needs --eventlog" in result.stderr
    # a log of another boot (different command line) does not replay to this quote
    other_log = tmp_path / "other.log"
    with SwtpmProcess(tmp_path / "other-state") as other_tpm:
        other_esapi = other_tpm.esapi()
        try:
            other_boot = simulate_boot(
                BootDescription(kernel_cmdline="init=/bin/sh"), other_esapi, ["sha256"]
            )
        finally:
            other_esapi.close()
    other_log.write_bytes(other_boot.eventlog)
    result = CliRunner().invoke(cli, [*argv[:-1], str(other_log)])
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: eventlog.replay: ")
    learned = CliRunner().invoke(cli, ["policy", "learn", str(other_log), "-o", str(other_policy)])
    assert learned.exit_code == 0, learned.stderr
    result = CliRunner().invoke(cli, [*argv, "--policy", str(other_policy), "--json"])
    assert result.exit_code == 1
    failures = json.loads(result.stdout)["policy"]["failures"]
    assert [f["rule"] for f in failures] == ["kernel_cmdline"]
    assert "init=/bin/sh" in failures[0]["expected"]
    assert result.stderr.startswith("invalid: policy: 1 rule(s) failed; first: kernel_cmdline")


def test_installed_script(lab: QuoteLab) -> None:
    vtpm = Path(sys.executable).with_name("vtpm")
    result = subprocess.run(
        [str(vtpm), "verify-quote", "--ak", str(lab.dir / "signdecrypt.pub"),
         "--message", str(lab.dir / "signdecrypt.msg"),
         "--signature", str(lab.dir / "signdecrypt.sig"),
         "--pcrs", str(lab.dir / "signdecrypt.pcrs"), "--nonce", NONCE.hex()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "invalid: ak.attributes: AK lacks restricted (attributes 0x00060072):"
        " a non-restricted key can sign forged quotes\n"
    )
