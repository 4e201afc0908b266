"""The VM identity extension (vtpm_core.vm_identity): hand-written DER encoder cross-checked
with asn1crypto, parse errors only, and that OpenSSL and Go-style 31-bit OID readers cope."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from asn1crypto import core
from hypothesis import given, settings
from hypothesis import strategies as st

from vtpm_core.errors import ParseError
from vtpm_core.vm_identity import VM_IDENTITY_OID, VM_IDENTITY_OID_X667, VmIdentity, _tlv

REPO = Path(__file__).resolve().parents[2]
VM = "6f1c2d4e-8a9b-4c3d-9e0f-112233445566"


def _raw(vm_id: str, created: bytes, name: str = "", instance: str = "") -> bytes:
    """A VmIdentity SEQUENCE with these exact field bytes (build() would refuse some)."""
    return _tlv(
        0x30,
        _tlv(0x0C, vm_id.encode())
        + _tlv(0x0C, name.encode())
        + _tlv(0x0C, instance.encode())
        + _tlv(0x18, created),
    )


T = dt.datetime(2026, 11, 26, 22, 0, 5, tzinfo=dt.UTC)


def test_round_trip() -> None:
    vm = uuid.UUID("6f1c2d4e-8a9b-4c3d-9e0f-112233445566")
    value = VmIdentity.build(vm, "web-01 ü", "vtpm-7", T.replace(microsecond=123))
    parsed = VmIdentity.parse(value.to_bytes())
    assert parsed == value
    assert (parsed.vm_id, parsed.vm_name, parsed.created_at) == (vm, "web-01 ü", T)
    seq = core.Sequence.load(value.raw)
    assert [type(core.Asn1Value.load(seq[i].dump())).__name__ for i in range(4)] == [
        "UTF8String",
        "UTF8String",
        "UTF8String",
        "GeneralizedTime",
    ]


def test_oid_arcs_fit_31_bits() -> None:
    """Go's cryptobyte and pkilint's decoder reject arcs >= 2^31; the 2.25 form has one."""
    assert all(int(arc) < 2**31 for arc in VM_IDENTITY_OID.split("."))
    assert any(int(arc) >= 2**31 for arc in VM_IDENTITY_OID_X667.split("."))


@pytest.mark.parametrize(
    ("case", "data", "match"),
    [
        ("fail/vmid/empty", b"", "VmIdentity.der at byte 0"),
        ("fail/vmid/truncated", VmIdentity.build(uuid.uuid4(), "a", "b", T).raw[:-3], "VmIdentity"),
        (
            "fail/vmid/trailing",
            VmIdentity.build(uuid.uuid4(), "a", "b", T).raw + b"\x00",
            "VmIdentity",
        ),
        (
            "fail/vmid/not-uuid",
            b"0\x1a\x0c\x03abc\x0c\x00\x0c\x00\x18\x0f20261126220005Z",
            "VmIdentity.vmId",
        ),
        # a GeneralizedTime without "Z" (local time): asn1crypto's re-encoding raised
        # ValueError, which escaped the parser (found by fuzz/fuzz_vm_identity.py)
        ("fail/vmid/local-time", _raw(VM, b"20261126220005"), "VmIdentity.der"),
        ("fail/vmid/fraction", _raw(VM, b"20261126220005.5Z"), "VmIdentity.createdAt"),
        ("fail/vmid/upper-case", _raw(VM.upper(), b"20261126220005Z"), "lower-case hyphenated"),
        ("fail/vmid/urn", _raw("urn:uuid:" + VM, b"20261126220005Z"), "lower-case hyphenated"),
        ("fail/vmid/braces", _raw("{" + VM + "}", b"20261126220005Z"), "lower-case hyphenated"),
        ("fail/vmid/hex", _raw(VM.replace("-", ""), b"20261126220005Z"), "lower-case hyphenated"),
        ("fail/vmid/long-name", _raw(VM, b"20261126220005Z", "n" * 1025), "VmIdentity.vmName"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("fail/") else "",
)
def test_parse_errors(case: str, data: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        VmIdentity.parse(data)


@given(st.binary(max_size=200))
def test_only_parse_errors_escape(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        VmIdentity.parse(data)


@given(st.uuids(), st.text(max_size=300), st.text(max_size=50))
def test_encoder_agrees_with_asn1crypto(vm: uuid.UUID, name: str, instance: str) -> None:
    value = VmIdentity.build(vm, name, instance, T)
    assert VmIdentity.parse(value.raw) == value


@given(
    st.uuids(),
    st.text(max_size=1024),
    st.text(max_size=60),
    st.datetimes(
        min_value=dt.datetime(1000, 1, 1),
        max_value=dt.datetime(9999, 12, 30),
        timezones=st.just(dt.UTC),
    ),
)
@settings(max_examples=300)
def test_round_trip_is_exact(vm: uuid.UUID, name: str, instance: str, when: dt.datetime) -> None:
    """parse(build(x)) == build(x), and build of the parsed fields is the same bytes."""
    value = VmIdentity.build(vm, name, instance, when)
    parsed = VmIdentity.parse(value.raw)
    assert parsed == value
    assert parsed.created_at == when.replace(microsecond=0)
    again = VmIdentity.build(
        parsed.vm_id, parsed.vm_name, parsed.vtpm_instance_id, parsed.created_at
    )
    assert again.raw == value.raw


def _fuzz_module() -> object:
    sys.path.insert(0, str(REPO / "fuzz"))
    try:
        import fuzz_vm_identity
    finally:
        sys.path.remove(str(REPO / "fuzz"))
    return fuzz_vm_identity


def test_fuzz_target_runs_on_seeds_and_mutations() -> None:
    fuzz = _fuzz_module()
    for seed in fuzz.SEEDS:  # type: ignore[attr-defined]
        data = seed.raw
        for case in (data, data[: len(data) // 2], data + b"\x00", bytes(b ^ 0x55 for b in data)):
            fuzz.TestOneInput(case)  # type: ignore[attr-defined]
    fuzz.TestOneInput(_raw(VM, b"20261126220005"))  # type: ignore[attr-defined]


@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX userland")
def test_atheris_fuzzes_for_a_few_seconds(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "fuzz_vm_identity.py"), "--seeds", str(seeds)],
        check=True,
        timeout=60,
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "fuzz_vm_identity.py"), str(seeds),
         "-max_total_time=3", "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Done" in result.stderr


def test_build_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="year 1000"):
        VmIdentity.build(uuid.uuid4(), "", "", dt.datetime(999, 12, 31, tzinfo=dt.UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        VmIdentity.build(uuid.uuid4(), "", "", dt.datetime(2026, 1, 1))
