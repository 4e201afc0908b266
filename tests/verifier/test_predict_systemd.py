"""`vtpm policy predict` from systemd's own predictions (issue 20): a UKI's PCR 11 (computed
here, compared with Debian 12's real systemd-measure, held against a .pcrsig that
systemd-measure signed with a swtpm) and .pcrlock components with variants.

The UKIs are built with objcopy from Debian's real systemd-stub (linuxx64.efi.stub, 252),
as the UKI spec's objcopy recipe does. A boot of UKI A: systemd-boot then the UKI in PCR 4
(the boot simulator), the stub's PCR 11 events in the log, and systemd-pcrphase's four
phase words extended into a real swtpm with TPM2_PCR_Event and logged nowhere (as on a
booted machine); quoted by tpm2-tools with PCR 11."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tests.verifier.appraisal_lab import Lab, build_lab
from verifier.appraisal import AppraisalResult, Evidence, appraise
from verifier.eventlog import EventLog
from verifier.policy import Policy
from verifier.policy.pcrlock import load_component, parse_pcrlock, pcr_states
from verifier.policy.predict import Artefact, predict_policy
from verifier.policy.uki import (
    DEFAULT_PHASES,
    check_pcrsig,
    parse_measure_json,
    policy_pcr_digest,
    uki_pcr11,
)
from vtpm_cli.main import cli
from vtpm_core.authenticode import PeImage, authenticode_digest
from vtpm_core.errors import ConfigError, ParseError
from vtpm_core.measured_boot import BootApplication, BootDescription, build_boot_log
from vtpm_core.swtpm import SwtpmProcess

pytestmark = pytest.mark.swtpm

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
SDBOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
MEASURE = Path("/usr/lib/systemd/systemd-measure")
CMDLINE = "console=ttyS0 root=/dev/vda2 ro"
UNTIL = datetime(2027, 1, 31, tzinfo=UTC)
NOW = UNTIL - timedelta(days=7)
PCRS = "sha256:0,1,2,3,4,5,6,7,9,11,12"
# the stub's sections, in the order the UKI spec's objcopy recipe adds them
_VMA = {".osrel": 0x20000, ".cmdline": 0x30000, ".linux": 0x2000000, ".initrd": 0x3000000}


def _sections(name: str) -> dict[str, bytes]:
    return {
        ".osrel": f'ID=debian\nVERSION_ID="12"\nIMAGE_VERSION="{name}"\n'.encode(),
        ".cmdline": CMDLINE.encode(),
        ".linux": hashlib.sha512(f"kernel {name}".encode()).digest() * 300,
        ".initrd": hashlib.sha512(f"initrd {name}".encode()).digest() * 100,
    }


def build_uki(work: Path, name: str, extra: Sequence[tuple[str, Path]] = ()) -> Path:
    """A UKI made by objcopy (binutils) from the real stub, as the UKI spec describes."""
    args = ["objcopy"]
    for section, data in _sections(name).items():
        f = work / f"{name}{section}"
        f.write_bytes(data)
        args += ["--add-section", f"{section}={f}", "--change-section-vma",
                 f"{section}={_VMA[section]:#x}"]  # fmt: skip
    for i, (section, f) in enumerate(extra):
        args += ["--add-section", f"{section}={f}", "--change-section-vma",
                 f"{section}={0x40000 + 0x10000 * i:#x}"]  # fmt: skip
    out = work / f"uki-{name}.efi"
    subprocess.run([*args, str(STUB), str(out)], check=True, capture_output=True, timeout=60)
    return out


def _measure(work: Path, name: str, *extra: str) -> list[str]:
    files = {s: work / f"{name}{s}" for s in _sections(name)}
    return [
        str(MEASURE), *extra, f"--linux={files['.linux']}", f"--osrel={files['.osrel']}",
        f"--cmdline={files['.cmdline']}", f"--initrd={files['.initrd']}",
    ]  # fmt: skip


def _stub_events(uki: bytes) -> list[tuple[bytes, bytes]]:
    """(event data, measured bytes) of the stub's PCR 11 events: name, then contents."""
    pe = PeImage.parse(uki)
    by_name = {s.name.decode(): s for s in pe.sections}
    out = []
    for s in (".linux", ".osrel", ".cmdline", ".initrd"):
        out.append((s.encode() + b"\0", s.encode() + b"\0"))
        out.append((s.encode() + b"\0", pe.section_data(by_name[s])))
    return out


def _boot_log(uki: bytes) -> bytes:
    desc = BootDescription(
        boot_applications=(
            BootApplication("\\EFI\\BOOT\\BOOTX64.EFI", pe=SDBOOT.read_bytes()),
            BootApplication("\\EFI\\Linux\\uki.efi", pe=uki),
        ),
        kernel_cmdline=CMDLINE,
    )
    log = build_boot_log(desc, ("sha256",))
    for data, measured in _stub_events(uki):
        log.add(11, 0x0000000D, data, measured)  # EV_IPL, as systemd-stub 252 logs them
    return log.to_bytes()


@pytest.fixture(scope="module")
def ukis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("ukis")
    return {n: build_uki(work, n) for n in ("A", "B", "C")}


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory, ukis: dict[str, Path]) -> dict[str, Lab]:
    phases = [(11, w.encode()) for w in DEFAULT_PHASES[-1].split(":")]
    out = {}
    for name, path in ukis.items():
        base = tmp_path_factory.mktemp(f"boot-{name}")
        (base / "boot.log").write_bytes(_boot_log(path.read_bytes()))
        out[name] = build_lab(base / "state", base, base / "boot.log", pcrs=PCRS, unlogged=phases)
    return out


def _appraise(lab: Lab, policy: Policy, now: datetime = NOW) -> AppraisalResult:
    q = lab.quotes["rsa"]
    return appraise(
        Evidence(q.attest, q.signature, q.pcrs, lab.log), policy, nonce=lab.nonce, ak=q.ak, now=now
    )


def _base(lab: Lab):  # type: ignore[no-untyped-def]
    log = EventLog.parse(lab.log)
    return log.verify(log.replay())


# -- UKI PCR 11 ------------------------------------------------------------------------------


def test_uki_pcr11_is_what_systemd_measure_computes(ukis: dict[str, Path]) -> None:
    work = ukis["B"].parent
    real = subprocess.run(
        _measure(work, "B", "calculate", "--json=short", "--bank=sha1", "--bank=sha256"),
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip
    theirs = {(v.bank, v.phase): v.value for v in parse_measure_json(real, "measure.json")}
    ours, what = uki_pcr11(ukis["B"].read_bytes(), "uki-B.efi", banks=("sha1", "sha256"))
    assert "systemd-stub 252" in what and ".linux .osrel .cmdline .initrd" in what
    assert len(theirs) == 8
    assert {(v.bank, v.phase): v.value for v in ours} == theirs


def test_the_quoted_pcr11_is_the_predicted_one(labs: dict[str, Lab], ukis: dict[str, Path]) -> None:
    ours, _ = uki_pcr11(ukis["A"].read_bytes(), "uki-A.efi")
    ready = next(v.value for v in ours if v.phase.endswith(":ready"))
    assert labs["A"].quotes["rsa"].pcrs.values["sha256"][11] == ready


def test_pcrsig_signed_by_systemd_measure(tmp_path: Path, ukis: dict[str, Path]) -> None:
    work = ukis["B"].parent
    key = tmp_path / "key.pem"
    pub = tmp_path / "pub.pem"
    genkey = ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    subprocess.run([*genkey, "-out", str(key)], check=True, capture_output=True)
    pubout = ["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)]
    subprocess.run(pubout, check=True, capture_output=True)
    with SwtpmProcess(tmp_path / "tpm") as tpm:
        signed = subprocess.run(
            _measure(work, "B", "sign", "--json=short", "--bank=sha256",
                     f"--pcrpkey={pub}", f"--private-key={key}", f"--public-key={pub}",
                     f"--tpm2-device={tpm.endpoint.tcti}"),
            check=True, capture_output=True, timeout=60,
        ).stdout  # fmt: skip
    (tmp_path / "pcrsig.json").write_bytes(signed)
    uki = build_uki(tmp_path, "B", extra=((".pcrsig", tmp_path / "pcrsig.json"), (".pcrpkey", pub)))
    values, _ = uki_pcr11(uki.read_bytes(), "uki-B-signed.efi")
    assert check_pcrsig(signed, pub.read_bytes(), values, "uki-B-signed.efi") == 4
    pol = json.loads(signed)["sha256"][0]["pol"]
    assert pol == policy_pcr_digest("sha256", values[0].value).hex()
    # the prediction reads the .pcrsig from the UKI itself
    labs_base = _base_from_log(_boot_log(build_uki(tmp_path, "A").read_bytes()))
    _, predictions = predict_policy(
        labs_base, [Artefact("uki", "uki-B.efi", uki.read_bytes())], cmdline=None,
        valid_until=UNTIL,
    )  # fmt: skip
    assert any("its .pcrsig's 4 signed policies match" in str(p) for p in predictions)
    # a .pcrsig that signs another UKI's PCR 11, or a signature by another key
    other, _ = uki_pcr11(build_uki(tmp_path, "C").read_bytes(), "uki-C.efi")
    with pytest.raises(ConfigError, match=r"sha256\[0\].pol .* policy of no PCR 11 value"):
        check_pcrsig(signed, pub.read_bytes(), other, "uki-C.efi")
    forged = json.loads(signed)
    forged["sha256"][0]["sig"] = forged["sha256"][1]["sig"]
    with pytest.raises(ConfigError, match=r"sha256\[0\].sig does not verify"):
        check_pcrsig(json.dumps(forged).encode(), pub.read_bytes(), values, "uki-B.efi")


def _base_from_log(data: bytes):  # type: ignore[no-untyped-def]
    log = EventLog.parse(data)
    return log.verify(log.replay())


def test_predicted_uki_b_affirms_unpredicted_c_does_not(
    labs: dict[str, Lab], ukis: dict[str, Path]
) -> None:
    policy, predictions = predict_policy(
        _base(labs["A"]), [Artefact("uki", "uki-B.efi", ukis["B"].read_bytes())],
        cmdline=None, valid_until=UNTIL, name="fleet",
    )  # fmt: skip
    text = "\n".join(map(str, predictions))
    assert "boot application uki-B.efi" in text and "PCR 11 sha256:" in text
    assert "replaces events" in text and "(PCR 11)" in text  # the stub's events of A
    pcr11 = policy.to_dict()["pcrs"]["sha256"]["11"]
    assert len(pcr11) == 8  # A's four phases (windowed) and B's four
    assert sum("valid_until" in v for v in pcr11) == 4
    a, b, c = (_appraise(labs[n], policy) for n in "ABC")
    assert a.status == "affirming", [str(f) for f in a.failures]
    assert b.status == "affirming", [str(f) for f in b.failures]
    assert c.status == "contraindicated"
    assert sorted(f.rule for f in c.failures) == ["boot_applications", "pcrs.sha256.11"]
    # after the window: A's values stop being accepted, each named with its end
    late = _appraise(labs["A"], policy, now=UNTIL)
    assert sorted(f.rule for f in late.failures) == [
        "boot_applications.valid_until",
        "pcrs.sha256.11.valid_until",
    ]
    msg = next(f for f in late.failures if f.rule == "pcrs.sha256.11.valid_until").message
    assert "phase enter-initrd:leave-initrd:sysinit:ready" in msg and "2027-01-31" in msg
    assert _appraise(labs["B"], policy, now=UNTIL + timedelta(days=30)).status == "affirming"


def test_cli_pcr11_json_from_systemd_measure(
    tmp_path: Path, labs: dict[str, Lab], ukis: dict[str, Path]
) -> None:
    work = ukis["B"].parent
    measured = tmp_path / "uki-B.pcr11.json"
    measured.write_bytes(
        subprocess.run(
            _measure(work, "B", "calculate", "--json=short", "--bank=sha256"),
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
    )
    out = tmp_path / "r2.yaml"
    result = CliRunner().invoke(
        cli,
        [
            "policy", "predict", "--eventlog", str(labs["A"].log_path),
            "--systemd-boot", str(SDBOOT), "--kernel", str(ukis["B"]),
            "--pcr11-json", str(measured), "--valid-until", "2027-01-31T00:00:00Z",
            "-o", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(systemd-measure)" in result.output
    revised = Policy.load(out)
    assert _appraise(labs["B"], revised).status == "affirming"
    assert _appraise(labs["C"], revised).status == "contraindicated"
    bad = tmp_path / "bad.json"
    bad.write_text('{"sha256": [{"phase": "enter-initrd", "pcr": 11, "hash": "00"}]}')
    result = CliRunner().invoke(
        cli,
        [
            "policy", "predict", "--eventlog", str(labs["A"].log_path), "--pcr11-json",
            str(bad), "--valid-until", "2027-01-31T00:00:00Z", "-o", str(tmp_path / "x.yaml"),
        ],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "bad.json" in result.output and "sha256[0].hash" in result.output
    assert "Traceback" not in result.output


# -- .pcrlock ------------------------------------------------------------------------------


def _record(pcr: int, digests: dict[str, bytes]) -> dict[str, object]:
    return {"pcr": pcr, "digests": [{"hashAlg": b, "digest": d.hex()} for b, d in digests.items()]}


def _uki_pcrlock(uki: bytes) -> dict[str, object]:
    """What `systemd-pcrlock lock-uki` records for a UKI: its PCR 4 Authenticode digest and
    the stub's PCR 11 extends (section name, then contents)."""
    records = [_record(4, {"sha256": authenticode_digest(uki)})]
    for _, measured in _stub_events(uki):
        records.append(_record(11, {"sha256": hashlib.sha256(measured).digest()}))
    return {"records": records}


def _phase(word: str) -> dict[str, object]:
    return {"records": [_record(11, {"sha256": hashlib.sha256(word.encode()).digest()})]}


@pytest.fixture
def pcrlock_dir(tmp_path: Path, ukis: dict[str, Path]) -> Path:
    """A pcrlock.d as a distribution ships it: the kernel component with two variants
    (A and B installed side by side), the phases systemd ships, and its separator file."""
    d = tmp_path / "pcrlock.d"
    (d / "650-kernel.pcrlock.d").mkdir(parents=True)
    for n in ("A", "B"):
        path = d / "650-kernel.pcrlock.d" / f"6.1.0-{n}.pcrlock"
        path.write_text(json.dumps(_uki_pcrlock(ukis[n].read_bytes())))
    for i, word in ((750, "enter-initrd"), (800, "leave-initrd"), (850, "sysinit"),
                    (900, "ready"), (950, "shutdown")):  # fmt: skip
        (d / f"{i}-{word}.pcrlock").write_text(json.dumps(_phase(word)))
    sep = hashlib.sha256(b"\0\0\0\0").digest()
    (d / "500-separator.pcrlock").write_text(
        json.dumps({"records": [_record(p, {"sha256": sep}) for p in range(7)]})
    )
    return d


def _components(d: Path) -> list:  # type: ignore[type-arg]
    return [load_component(p) for p in sorted(d.iterdir())]


def test_pcrlock_states_are_the_uki_phases(pcrlock_dir: Path, ukis: dict[str, Path]) -> None:
    states = dict(pcr_states(_components(pcrlock_dir), 11, "sha256"))
    for n in ("A", "B"):
        ours, _ = uki_pcr11(ukis[n].read_bytes(), n)
        assert {v.value for v in ours} <= set(states)
    assert len(states) == 8  # 2 variants x 4 phases (shutdown is past 940-)
    label = next(lbl for v, lbl in states.items() if v == uki_pcr11(ukis["B"].read_bytes(), "B")
                 [0][-1].value)  # fmt: skip
    assert "650-kernel (6.1.0-B.pcrlock)" in label and "900-ready" in label


def test_pcrlock_prediction_affirms_both_variants(pcrlock_dir: Path, labs: dict[str, Lab]) -> None:
    policy, predictions = predict_policy(
        _base(labs["A"]), [], cmdline=None, valid_until=UNTIL,
        pcrlock=_components(pcrlock_dir),
    )  # fmt: skip
    text = "\n".join(map(str, predictions))
    assert "boot application 650-kernel/6.1.0-B.pcrlock" in text
    assert "6.1.0-B.pcrlock records[0]" in text
    for n in "AB":
        r = _appraise(labs[n], policy)
        assert r.status == "affirming", (n, [str(f) for f in r.failures])
    c = _appraise(labs["C"], policy)
    assert sorted(f.rule for f in c.failures) == ["boot_applications", "pcrs.sha256.11"]
    # A is still a variant: its boot application keeps no end; its PCR 11 values are in the
    # prediction too, so nothing of A expires
    assert _appraise(labs["A"], policy, now=UNTIL + timedelta(days=1)).status == "affirming"
    # without A's variant, A is windowed
    (pcrlock_dir / "650-kernel.pcrlock.d" / "6.1.0-A.pcrlock").unlink()
    policy, _ = predict_policy(
        _base(labs["A"]), [], cmdline=None, valid_until=UNTIL, pcrlock=_components(pcrlock_dir)
    )
    assert _appraise(labs["A"], policy).status == "affirming"
    late = _appraise(labs["A"], policy, now=UNTIL)
    assert sorted(f.rule for f in late.failures) == [
        "boot_applications.valid_until",
        "pcrs.sha256.11.valid_until",
    ]


def test_cli_pcrlock(tmp_path: Path, pcrlock_dir: Path, labs: dict[str, Lab]) -> None:
    out = tmp_path / "r.yaml"
    args = ["policy", "predict", "--eventlog", str(labs["A"].log_path)]
    for p in sorted(pcrlock_dir.iterdir()):
        args += ["--pcrlock", str(p)]
    result = CliRunner().invoke(
        cli, [*args, "--valid-until", "2027-01-31T00:00:00Z", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert _appraise(labs["B"], Policy.load(out)).status == "affirming"


def test_pcrlock_record_nothing_can_allow_is_refused(
    pcrlock_dir: Path, labs: dict[str, Lab]
) -> None:
    bad = pcrlock_dir / "620-secureboot-authority.pcrlock"
    bad.write_text(json.dumps({"records": [_record(7, {"sha256": b"\x11" * 32})]}))
    with pytest.raises(ConfigError, match=r"620-secureboot-authority.pcrlock records\[0\]: PCR 7"):
        predict_policy(
            _base(labs["A"]), [], cmdline=None, valid_until=UNTIL,
            pcrlock=_components(pcrlock_dir),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        pytest.param(b"{", "json", "Expecting", id="fail/json"),
        pytest.param(b"[]", "(top)", "expected an object", id="fail/top"),
        pytest.param(b'{"records": {}}', "records", "expected a list", id="fail/records"),
        pytest.param(b'{"x": 1}', "x", "unknown key", id="fail/key"),
        pytest.param(
            b'{"records": [{"pcr": 24, "digests": []}]}', "records[0].pcr", "0..23", id="fail/pcr"
        ),
        pytest.param(
            b'{"records": [{"pcr": 4, "digests": []}]}',
            "records[0].digests",
            "non-empty",
            id="fail/digests",
        ),
        pytest.param(
            b'{"records": [{"pcr": 4, "digests": [{"hashAlg": "md5", "digest": "00"}]}]}',
            "records[0].digests[0].hashAlg",
            "md5",
            id="fail/bank",
        ),
        pytest.param(
            b'{"records": [{"pcr": 4, "digests": [{"hashAlg": "sha256", "digest": "00"}]}]}',
            "records[0].digests[0].digest",
            "64 hex digits",
            id="fail/digest",
        ),
    ],
)
def test_bad_pcrlock_names_file_and_field(doc: bytes, field: str, message: str) -> None:
    with pytest.raises(ParseError, match=message) as exc:
        parse_pcrlock(doc, "650-kernel.pcrlock")
    assert exc.value.field == field
    assert "650-kernel.pcrlock" in str(exc.value)


def test_a_real_systemd_shipped_pcrlock_parses() -> None:
    # 750-enter-initrd.pcrlock as systemd ships it (its sha256 record is sha256("enter-initrd"))
    records = parse_pcrlock(json.dumps(_phase("enter-initrd")).encode(), "750-enter-initrd")
    assert records[0].digests["sha256"].hex() == (
        "51e6b92f405d1f98d96e3de343d61d420ad6923b25de21d766f9298192f14fed"
    )
    assert parse_pcrlock(b'{"records":[]}', "600-absent.pcrlock") == ()


def test_not_a_uki_and_bad_measure_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \.linux section"):
        uki_pcr11(SDBOOT.read_bytes(), "systemd-bootx64.efi")
    for doc, field in (
        (b'{"sha256": [{"phase": "x", "pcr": 7, "hash": ""}]}', "sha256[0].pcr"),
        (b'{"sha256": [{"phase": "a b", "pcr": 11, "hash": ""}]}', "sha256[0].phase"),
        (b'{"md5": []}', "md5"),
        (b"[1]", "(top)"),
    ):
        with pytest.raises(ParseError) as exc:
            parse_measure_json(doc, "m.json")
        assert exc.value.field == field and "m.json" in str(exc.value)


def test_windowed_pcr_values_in_the_schema() -> None:
    h = "ab" * 32
    doc = {"version": 1, "pcrs": {"sha256": {"11": [h, {"value": "cd" * 32,
           "valid_until": "2027-01-31T00:00:00Z", "note": "old UKI"}]}}}  # fmt: skip
    policy = Policy.from_dict(doc)
    assert policy.to_dict() == doc
    assert policy.expiries == (UNTIL,)
    for bad, field in (
        ({"value": "cd" * 32, "valid_until": "2027-01-31"}, "valid_until"),
        ({"valid_until": "2027-01-31T00:00:00Z"}, "value"),
        ({"value": "cd" * 31}, "value"),
        ({"value": "cd" * 32, "x": 1}, "x"),
    ):
        with pytest.raises(ParseError) as exc:
            Policy.from_dict({"version": 1, "pcrs": {"sha256": {"11": [h, bad]}}})
        assert exc.value.field == f"policy.pcrs.sha256.11[1].{field}"


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_only_parse_and_config_errors_escape(data: bytes) -> None:
    for reader in (
        lambda: parse_pcrlock(data, "x"),
        lambda: parse_measure_json(data, "x"),
        lambda: check_pcrsig(data, None, (), "x"),
        lambda: uki_pcr11(data, "x"),
    ):
        with contextlib.suppress(ParseError, ConfigError):
            reader()


def test_deep_json_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="recursion"):
        parse_pcrlock(b"[" * 100_000, "deep.pcrlock")


def test_pcr11_only_from_a_policy_base(pcrlock_dir: Path, ukis: dict[str, Path]) -> None:
    """A base policy pinning PCR 11 alone (no boot applications) and only the phase
    components: the new values are added, the old ones windowed, nothing else touched."""
    old = "ab" * 32
    base = Policy.from_dict({"version": 1, "pcrs": {"sha256": {"11": old}}})
    phases = [load_component(p) for p in sorted(pcrlock_dir.glob("[789]*.pcrlock"))]
    policy, predictions = predict_policy(base, [], cmdline=None, valid_until=UNTIL, pcrlock=phases)
    values = policy.to_dict()["pcrs"]["sha256"]["11"]
    assert values[0] == {"value": old, "valid_until": "2027-01-31T00:00:00Z",
                         "note": "PCR 11 of the base (a base policy value); accepted until"
                         " 2027-01-31T00:00:00Z"}  # fmt: skip
    ready = hashlib.sha256(bytes(32) + hashlib.sha256(b"enter-initrd").digest()).digest()
    assert values[1]["value"] == ready.hex()  # (after 750-enter-initrd, from zero)
    assert "boot_applications" not in policy.to_dict()
    assert len(predictions) == 4
