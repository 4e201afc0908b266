"""SBAT revocation in `vtpm policy dbx-update` (issue 20): real .sbat sections (Debian's shim
16.1 and GRUB 2.06, tests/data/sbat/README.md; the installed systemd-boot), the SbatLevel
the RHEL 9 corpus log measured, and the fleet's stored evidence (a swtpm extended with that
log, attested through the real service on SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import CORPUS
from tests.verifier.appraisal_lab import _extend_log
from tests.verifier.service.test_state import TpmFactory, Verifier, assign, enrol, row
from tests.verifier.test_reappraise import ek_ca, pg_database, tpm_factory, verifier
from tests.vtpm_core.test_authenticode import make_pe
from verifier.appraisal import appraise_log
from verifier.attester import TpmAttester, attest_once
from verifier.dbx import DbxUpdate, scan
from verifier.eventlog import EventLog
from verifier.policy import Policy, learn_policy
from verifier.sbat import SbatBinary, SbatLevel, SbatRevocation, parse_sbat
from vtpm_cli.main import cli
from vtpm_core.errors import ConfigError, ParseError
from vtpm_core.measured_boot import BootApplication, BootDescription, build_boot_log

__all__ = ["ek_ca", "pg_database", "tpm_factory", "verifier"]  # fixtures, shared

DATA = Path(__file__).parent.parent / "data" / "sbat"
LOG = CORPUS / "eventlogs" / "vm_rhel9_qemu_ovmf_secureboot_keylime.bin"
SDBOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
SHIM_SHA256 = bytes.fromhex("80a66d53a945d2286fcadd780fae1c225aa732079cd67b5225dc78aaab4e2ff8")
GRUB_SHA256 = bytes.fromhex("a68f6d71ebddaa19751ff8d729f67d11b0df8e4c49400c3e7e90de16119e1265")
# a level newer than the RHEL 9 log's measured one (sbat,1,2023012900: shim 2, grub 3, ...)
LEVEL_SHIM4 = b"sbat,1,2024010900\nshim,4\ngrub,3\ngrub.debian,4\n"
LEVEL_GRUB6 = b"sbat,1,2026120700\nshim,4\ngrub,6\n"


def _binaries() -> dict[bytes, SbatBinary]:
    shim_sbat = parse_sbat((DATA / "shimx64.sbat").read_bytes(), "shimx64.efi")
    grub_sbat = parse_sbat((DATA / "grubx64.sbat").read_bytes(), "grubx64.efi")
    shim = SbatBinary("shimx64.efi", SHIM_SHA256, shim_sbat)
    grub = SbatBinary("grubx64.efi", GRUB_SHA256, grub_sbat)
    sdboot = SbatBinary.of_image(SDBOOT.read_bytes(), "systemd-bootx64.efi")
    return {b.sha256: b for b in (shim, grub, sdboot)}


def _debian_boot_log() -> bytes:
    """Debian's shim and GRUB (their real Authenticode digests) and systemd-boot, in PCR 4."""
    desc = BootDescription(
        boot_applications=(
            BootApplication("\\EFI\\debian\\shimx64.efi", digests={"sha256": SHIM_SHA256}),
            BootApplication("\\EFI\\debian\\grubx64.efi", digests={"sha256": GRUB_SHA256}),
            BootApplication("\\EFI\\systemd\\systemd-bootx64.efi", pe=SDBOOT.read_bytes()),
        ),
        kernel_cmdline="root=/dev/vda2 ro",
    )
    return build_boot_log(desc, ("sha256",)).to_bytes()


def _replayed(data: bytes):  # type: ignore[no-untyped-def]
    log = EventLog.parse(data)
    return log.verify(log.replay())


def test_real_sbat_sections() -> None:
    b = _binaries()
    assert [(e.component, e.generation) for e in b[SHIM_SHA256].entries] == [
        ("sbat", 1), ("shim", 4), ("shim.debian", 1),
    ]  # fmt: skip
    grub = b[GRUB_SHA256].entries  # (a 4096-byte section, NUL padded)
    assert [(e.component, e.generation) for e in grub] == [
        ("sbat", 1), ("grub", 5), ("grub.debian", 5), ("grub.debian12", 1),
    ]  # fmt: skip
    assert grub[1].vendor == "Free Software Foundation" and grub[2].version == "2.06-13+deb12u2"
    sdboot = next(x for x in b.values() if x.name == "systemd-bootx64.efi")
    assert [(e.component, e.generation) for e in sdboot.entries][:2] == [
        ("sbat", 1), ("systemd", 1),
    ]  # fmt: skip
    # what the CLI sends the verifier reads back the same
    revocation = SbatRevocation(SbatLevel.parse(LEVEL_GRUB6), b)
    again = DbxUpdate.parse(revocation.to_json())
    assert again.sbat is not None
    assert {k: v.entries for k, v in again.sbat.binaries.items()} == {
        k: v.entries for k, v in b.items()
    }


def test_level_revokes_below_its_generations() -> None:
    b = _binaries()
    assert SbatLevel.parse(LEVEL_SHIM4).revokes(b[GRUB_SHA256].entries) == []
    assert SbatLevel.parse(LEVEL_GRUB6).revokes(b[GRUB_SHA256].entries) == ["grub 5 < 6"]
    assert SbatLevel.parse(b"sbat,1,2022111500\nshim,5\n").revokes(b[SHIM_SHA256].entries) == [
        "shim 4 < 5"
    ]
    # shim's documented levels (SbatLevel_Variable.txt): initialised, no revocations
    assert SbatLevel.parse(b"sbat,1,2021030218\n").generations == {}


def test_measured_level_of_the_corpus_log_is_behind() -> None:
    replayed = _replayed(LOG.read_bytes())
    found = scan(replayed, DbxUpdate.parse(LEVEL_SHIM4))
    assert found.sbat_level == "2023012900"
    assert found.sbat_behind == ("shim 2 < 4",) and not found.sbat_current
    same = scan(replayed, DbxUpdate.parse(b"sbat,1,2023012900\nshim,2\ngrub,3\n"))
    assert same.sbat_current and same.revoked == ()


def test_booted_binary_below_the_level_is_revoked() -> None:
    update = DbxUpdate.of_sbat(SbatRevocation(SbatLevel.parse(LEVEL_GRUB6), _binaries()))
    found = scan(_replayed(_debian_boot_log()), update)
    [grub] = found.revoked
    assert (grub.kind, grub.pcr, grub.name, grub.detail) == ("sbat", 4, "grubx64.efi", "grub 5 < 6")
    assert grub.what == GRUB_SHA256.hex()
    assert found.sbat_behind == ("no SbatLevel measured",)  # (the simulator runs no shim)
    sd = DbxUpdate.of_sbat(
        SbatRevocation(SbatLevel.parse(b"sbat,1,2026120700\nsystemd,2\n"), _binaries())
    )
    assert [f.detail for f in scan(_replayed(_debian_boot_log()), sd).revoked] == ["systemd 1 < 2"]


def test_cli_offline(tmp_path: Path) -> None:
    level = tmp_path / "SbatLevel.txt"
    level.write_bytes(b"sbat,1,2026120700\nsystemd,2\n")
    log = tmp_path / "boot.log"
    log.write_bytes(_debian_boot_log())
    out = CliRunner().invoke(
        cli, ["policy", "dbx-update", str(level), "--binary", str(SDBOOT), "--eventlog", str(log)]
    )
    assert out.exit_code == 1, out.output
    assert "SBAT level 2026120700 (systemd 2); 1 binaries known; 1 boots scanned" in out.output
    assert f"REVOKED {log}: sbat " in out.output and "systemd 1 < 2 (event" in out.output
    assert f"OLD SBAT {log}: measured none; no SbatLevel measured" in out.output
    out = CliRunner().invoke(cli, ["policy", "dbx-update", str(level), "--eventlog", str(LOG)])
    assert out.exit_code == 1 and "measured 2023012900; systemd 0 < 2" in out.output
    not_sbat = CliRunner().invoke(
        cli, ["policy", "dbx-update", str(level), "--binary", str(DATA / "README.md"),
              "--eventlog", str(log)],
    )  # fmt: skip
    assert not_sbat.exit_code != 0 and "Traceback" not in not_sbat.output


def test_sbat_currency_as_a_policy_rule(tmp_path: Path) -> None:
    """``dbx-update LEVEL --base -o`` writes sbat.min_level; the corpus boot (measured level
    shim 2) fails it naming the event and what is behind, and passes a level it holds."""
    learned = learn_policy(_replayed(LOG.read_bytes()), name="corpus")
    base = tmp_path / "base.yaml"
    base.write_text(learned.to_yaml())
    level = tmp_path / "SbatLevel.txt"
    for text, verdict in ((b"sbat,1,2023012900\nshim,2\ngrub,3\n", "affirming"),
                          (LEVEL_SHIM4, "contraindicated")):  # fmt: skip
        level.write_bytes(text)
        out_file = tmp_path / "revised.yaml"
        out = CliRunner().invoke(
            cli, ["policy", "dbx-update", str(level), "--base", str(base), "-o", str(out_file)]
        )
        assert out.exit_code == 0, out.output
        assert "SbatLevel requires shim" in out.output
        result = appraise_log(LOG.read_bytes(), Policy.load(out_file))
        assert result.status == verdict, [str(f) for f in result.failures]
    [fail] = [f for f in result.failures if f.rule == "sbat.min_level"]
    assert fail.expected == "an SbatLevel with shim 4, grub 3, grub.debian 4"
    assert fail.actual == "shim 2 < 4" and fail.event is not None and fail.event.index == 32
    assert "2023012900 is behind" in fail.message
    # no shim, no SbatLevel: not current
    no_shim = Policy.from_dict(
        learn_policy(_replayed(_debian_boot_log())).to_dict() | {"sbat": {"min_level": {"grub": 3}}}
    )
    [absent] = appraise_log(_debian_boot_log(), no_shim).failures
    assert (absent.rule, absent.actual) == ("sbat.min_level", "absent")


@pytest.mark.parametrize(
    ("sbat", "field"),
    [
        pytest.param({}, "policy.sbat.min_level", id="fail/missing"),
        pytest.param({"min_level": {}}, "policy.sbat.min_level", id="fail/empty"),
        pytest.param({"min_level": {"grub": -1}}, "policy.sbat.min_level.grub", id="fail/neg"),
        pytest.param({"min_level": {"gr ub": 1}}, "policy.sbat.min_level.gr ub", id="fail/name"),
        pytest.param({"min_level": {"grub": 1}, "x": 1}, "policy.sbat.x", id="fail/key"),
    ],
)
def test_malformed_sbat_rule(sbat: dict[str, object], field: str) -> None:
    with pytest.raises(ParseError) as exc:
        Policy.from_dict({"version": 1, "sbat": sbat})
    assert exc.value.field == field
    ok = Policy.from_dict({"version": 1, "sbat": {"min_level": {"shim": 4}}})
    assert ok.to_dict()["sbat"] == {"min_level": {"shim": 4}}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(b"", "line 1", id="fail/empty"),
        pytest.param(b"shim,4\n", "line 1", id="fail/no-header"),
        pytest.param(b"sbat,1,x\nshim,four\n", "line 2.component_generation", id="fail/gen"),
        pytest.param(b"sbat,1,x\nsh im,4\n", "line 2.component_name", id="fail/name"),
        pytest.param(b"sbat,1,x\nshim\n", "line 2.component_generation", id="fail/short"),
        pytest.param(b"sbat,1,x\n\xffshim,4\n", "(data)", id="fail/ascii"),
        pytest.param(b"sbat,1,x\0shim,4\n", "(data)", id="fail/nul"),
    ],
)
def test_malformed_sbat_names_the_line(data: bytes, field: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_sbat(data, "grubx64.efi")
    assert exc.value.field == field and "grubx64.efi" in str(exc.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(b"sbat,1\n", "line 1", id="fail/no-datestamp"),
        pytest.param(b"sbat,1,2024\ngrub,3\ngrub,4\n", "line 3.component_name", id="fail/twice"),
        pytest.param(b"sbat,1,2024\ngrub,-1\n", "line 2.component_generation", id="fail/neg"),
    ],
)
def test_malformed_level_names_the_line(data: bytes, field: str) -> None:
    with pytest.raises(ParseError) as exc:
        SbatLevel.parse(data, "SbatLevel.txt")
    assert exc.value.field == field


def test_malformed_revocation_json() -> None:
    for doc, field in (
        (b'{"sbat_level": 1}', "sbat_level"),
        (b'{"sbat_level": "sbat,1,x\\n", "binaries": {}}', "binaries"),
        (b'{"sbat_level": "sbat,1,x\\n", "binaries": [{"name": "a", "sha256": "00", "sbat": ""}]}',
         "binaries[0].sha256"),
    ):  # fmt: skip
        with pytest.raises(ParseError) as exc:
            DbxUpdate.parse(doc)
        assert exc.value.field == field
    with pytest.raises(ConfigError, match=r"x\.efi: no \.sbat section"):
        SbatBinary.of_image(make_pe(), "x.efi")


@given(st.binary(max_size=300))
def test_only_the_parse_error_escapes(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_sbat(data, "x")
    with contextlib.suppress(ParseError):
        SbatLevel.parse(data)
    with contextlib.suppress(ParseError):
        DbxUpdate.parse(b"sbat," + data)


@pytest.mark.swtpm
def test_fleet_sbat_report(verifier: Verifier, tpm_factory: TpmFactory, tmp_path: Path) -> None:
    """The corpus boot attested through the service: its measured SbatLevel is behind a
    level naming shim 4 (POST /v1/dbx/report with the SbatLevel, and the CLI)."""
    v = verifier
    data = LOG.read_bytes()
    booted = tpm_factory()
    _extend_log(booted, EventLog.parse(data))
    a = enrol(v, booted, "vm-sbat")
    v.clock.advance(1)
    with requests.Session() as http, TpmAttester.open(booted.endpoint.tcti) as att:
        assert attest_once(http, a, att, data)["report"]["quote_verified"]
    r = requests.post(f"{v.url}/v1/dbx/report", data=LEVEL_SHIM4,
                      headers={"Authorization": f"Bearer {v.admin}"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    doc = r.json()
    [old] = [e for e in doc["old_sbat"] if e["attester_id"] == a.attester_id]
    assert (old["sbat_level"], old["sbat_behind"]) == ("2023012900", ["shim 2 < 4"])
    assert doc["old_dbx"] == [] and doc["update"]["sbat_level"]["generations"]["shim"] == 4
    token = tmp_path / "admin.token"
    token.write_text(v.admin)
    level = tmp_path / "SbatLevel.txt"
    level.write_bytes(LEVEL_SHIM4)
    out = CliRunner().invoke(
        cli, ["policy", "dbx-update", str(level), "--binary", str(SDBOOT), "--verifier", v.url,
              "--token-file", str(token)],
    )  # fmt: skip
    assert out.exit_code == 1, out.output
    assert f"OLD SBAT {a.attester_id}: measured 2023012900; shim 2 < 4" in out.output

    # SBAT currency as a rule: the stored boot is re-appraised (no new quote) and fails it
    rule = {"version": 1, "name": "sbat-current", "sbat": {"min_level": {"shim": 4}}}
    r = v.call("PUT", "/v1/policies/sbat-current", v.admin, json={"policy": rule})
    assert r.status_code == 200, r.text
    against = {"against": [a.attester_id]}
    r = v.call("POST", "/v1/policies/sbat-current/apply", v.admin, json=against)
    [change] = r.json()["changed"]
    assert change["to"] == "contraindicated"
    failures = [(f["rule"], f["actual"]) for f in change["failures"]]
    assert failures == [("sbat.min_level", "shim 2 < 4")]
    assert row(v, a.attester_id).state == "failed"
    assign(v, a.attester_id, None)
