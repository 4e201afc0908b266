"""The C record walk and bank replay (verifier/eventlog/_native.c) give exactly what
the Python readers give, on real logs, on every truncation of one, and on hostile
mutations; and a wrong argument is a ValueError, never a crash.

The Python path is the reference: with the walk switched off (``MAX_BANKS`` 0 in
parse.py) every record goes through _parse_agile_fast / _parse_agile, the readers
that report the field and byte offset of what is wrong; ``extend_in_python`` is the
replay with hashlib.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CORPUS, REPO
from tests.verifier.eventlog import _build
from verifier.eventlog import EventLog, EventType, Limits, _native, parse
from verifier.eventlog.algorithms import ALGORITHMS, algorithm_by_name
from verifier.eventlog.limits import DEFAULT_LIMITS
from verifier.eventlog.replay import extend_in_python
from vtpm_core.errors import ParseError

pytestmark = pytest.mark.filterwarnings("error")


def _outcome(data: bytes, limits: Limits) -> object:
    """Everything parse decides: the columns, the StartupLocality, quirks, or the error."""
    try:
        log = EventLog.parse(data, limits)
    except ParseError as exc:
        return ("ParseError", str(exc))
    r = log.records
    return (
        log.format,
        log.banks,
        r.offsets,
        r.ends,
        r.data_starts,
        r.pcrs,
        r.types,
        r.digests,
        log.startup_locality,
        log.quirks,
        [r.event(i) for i in range(len(r))],
    )


def _both(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[object, object]:
    native = _outcome(data, limits)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parse, "MAX_BANKS", 0)  # walk = len(algorithms) <= 0: never
        python = _outcome(data, limits)
    return native, python


def _corpus(eventlogs: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(eventlogs.glob("*.bin"))]


def test_every_corpus_log_parses_the_same_with_and_without_the_walk(eventlogs: Path) -> None:
    logs = _corpus(eventlogs)
    assert len(logs) >= 15
    agile = 0
    for data in logs:
        native, python = _both(data)
        assert native == python
        agile += native[0] == "crypto-agile"  # type: ignore[index]
    assert agile >= 10  # the walk ran on most of them


def test_every_truncation_of_a_real_log_fails_the_same_way(eventlogs: Path) -> None:
    data = (eventlogs / "vm_rhel9_qemu_ovmf_secureboot_keylime.bin").read_bytes()
    log = EventLog.parse(data)
    # every byte of the first records, then every record boundary and its neighbours
    cuts = set(range(log.records.ends[0], log.records.ends[4] + 1))
    for end in log.records.ends:
        cuts |= {end - 1, end, end + 1, end + 13}
    errors = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        native, python = _both(data[:cut])
        assert native == python, cut
        errors += native[0] == "ParseError"  # type: ignore[index]
    assert errors > 100  # (most cuts land inside a record)


def test_limits_stop_the_walk_where_python_stops() -> None:
    events = [_build.event2(i % 24, 13, bytes([i]) * (i * 7)) for i in range(30)]
    data = _build.log(*events)
    for limits in (Limits(max_events=10), Limits(max_event_data=100), Limits(max_events=31)):
        native, python = _both(data, limits)
        assert native == python
    assert "more than 10 events" in str(_both(data, Limits(max_events=10))[0])
    assert "exceeds the limit of 100" in str(_both(data, Limits(max_event_data=100))[0])


# hostile mutations of small built logs: banks in any order and number, any field
_BANKS = st.lists(
    st.sampled_from(["sha1", "sha256", "sha384"]), min_size=1, max_size=3, unique=True
)


@st.composite
def _mutated_logs(draw: st.DrawFn) -> bytes:
    banks = draw(_BANKS)
    events = [
        _build.event2(
            draw(st.sampled_from([0, 0, 7, 23, 24, 0xFFFFFFFF])),
            draw(st.sampled_from([3, 13, 0x80000001, 0xFFFFFFFF])),
            draw(st.sampled_from([b"", b"StartupLocality\x00\x03", b"x" * 40])),
            banks=banks,
        )
        for _ in range(draw(st.integers(0, 5)))
    ]
    data = bytearray(_build.log(*events, banks=banks))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["byte", "u32", "cut", "pad"]))
        if kind == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "u32":
            value = draw(st.sampled_from([0, 1, 2, 3, 0x0B, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[at : at + 4] = struct.pack("<I", value)
        elif kind == "cut":
            del data[at:]
        else:
            data += bytes([draw(st.sampled_from([0, 0xFF]))]) * draw(st.integers(1, 40))
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_logs(), st.sampled_from([Limits(), Limits(max_events=3, max_event_data=20)]))
def test_hostile_logs_parse_the_same_with_and_without_the_walk(data: bytes, limits: Limits) -> None:
    native, python = _both(data, limits)
    assert native == python


# --- extend_bank -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([a.name for a in ALGORITHMS]),
    st.lists(
        st.tuples(st.integers(0, 23), st.sampled_from([3, 4, 13]), st.booleans(), st.binary()),
        max_size=30,
    ),
    st.one_of(st.none(), st.integers(0, 4)),
)
def test_extend_bank_equals_hashlib(
    bank: str, events: list[tuple[int, int, bool, bytes]], locality: int | None
) -> None:
    alg = algorithm_by_name(bank)
    assert alg is not None and alg.computable
    pcrs = [e[0] for e in events]
    types = [e[1] for e in events]
    column: list[bytes | None] = [None if e[2] else alg.hash(e[3]) for e in events]
    initial = {} if locality is None else {0: bytes(alg.digest_size - 1) + bytes([locality])}
    got = _native.extend_bank(alg.openssl_name, pcrs, types, column, 3, initial)
    assert got == extend_in_python(alg, pcrs, types, column, initial)
    assert list(got) == sorted(got)


def test_extend_bank_is_the_tpm_extend() -> None:
    digest = hashlib.sha256(b"event").digest()
    got = _native.extend_bank("SHA256", [7, 7], [13, 13], [digest, digest], 3, {})
    once = hashlib.sha256(bytes(32) + digest).digest()
    assert got == {7: hashlib.sha256(once + digest).digest()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("SHA256", [24], [13], [bytes(32)], 3, {}), "PCR or digest size"),
        (("SHA256", [-1], [13], [bytes(32)], 3, {}), "PCR or digest size"),
        (("SHA256", [0], [13], [bytes(31)], 3, {}), "PCR or digest size"),
        (("SHA256", [0], [13], ["x" * 32], 3, {}), "PCR or digest size"),
        (("SHA256", [0], [13, 13], [bytes(32)], 3, {}), "differ in length"),
        (("SHA256", [0.0], [13], [bytes(32)], 3, {}), "PCR and type are ints"),
        (("SHA256", [0], ["13"], [bytes(32)], 3, {}), "PCR and type are ints"),
        (("SHA256", [0], [13], [bytes(32)], 3, {"0": bytes(32)}), "initial values"),
        (("SHA256", [0], [13], [bytes(32)], 3, {24: bytes(32)}), "initial values"),
        (("SHA256", [0], [13], [bytes(32)], 3, {0: bytes(20)}), "initial values"),
    ],
)
def test_extend_bank_refuses_wrong_arguments(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _native.extend_bank(*args)  # type: ignore[arg-type]


def test_extend_bank_says_lookup_error_for_a_digest_openssl_lacks() -> None:
    """(what _replay falls back to hashlib on; a wrong argument is a ValueError instead)"""
    with pytest.raises(LookupError, match="no digest NOSUCH"):
        _native.extend_bank("NOSUCH", [0], [13], [bytes(32)], 3, {})


def test_extend_bank_reads_int_subclasses_by_value() -> None:
    digest = bytes(32)
    plain = _native.extend_bank("SHA256", [0], [13], [digest], 3, {})
    named = _native.extend_bank("SHA256", [0], [EventType.EV_IPL], [digest], 3, {})
    skipped = _native.extend_bank("SHA256", [0], [EventType.EV_NO_ACTION], [digest], 3, {})
    assert plain == named and skipped == {}


def test_extend_bank_refuses_a_pcr_beyond_a_c_long() -> None:
    with pytest.raises(OverflowError):
        _native.extend_bank("SHA256", [1 << 70], [13], [bytes(32)], 3, {})


# --- walk_records ------------------------------------------------------------------------


def _columns() -> tuple[list[int], list[int], list[int], list[int], list[int], list[list[bytes]]]:
    return [], [], [], [], [], [[]]


def _walk(data: bytes, offset: int, **kw: object) -> tuple[int, bool]:
    args: dict[str, object] = {
        "stop_at": len(data),
        "alg_ids": (0x0B,),
        "sizes": (32,),
        "max_records": 100,
        "max_data": 1 << 20,
        "max_pcr": 23,
    }
    args.update(kw)
    return _native.walk_records(
        data, offset, args["stop_at"], args["alg_ids"], args["sizes"], args["max_records"],
        args["max_data"], args["max_pcr"], 3, parse.STARTUP_LOCALITY, *_columns(),
    )  # type: ignore[arg-type]  # fmt: skip


def test_walk_stops_before_a_record_that_runs_past_the_log() -> None:
    one = _build.event2(0, 13, b"abc", banks=("sha256",))
    header = len(_build.spec_id_header(("sha256",)))
    data = _build.log(one, one, banks=("sha256",))
    assert _walk(data, header) == (len(data), False)
    for size in (4, 0x7FFFFFFF, 0xFFFFFFFF):  # eventSize of the second record
        forged = data[: -3 - 4] + struct.pack("<I", size) + b"abc"
        assert _walk(forged, header) == (header + len(one), False)
    assert _walk(data[:-1], header) == (header + len(one), False)


def test_walk_reports_the_startup_locality_event() -> None:
    locality = _build.event2(0, 3, b"StartupLocality\x00\x03", banks=("sha256",))
    header = len(_build.spec_id_header(("sha256",)))
    assert _walk(_build.log(locality, banks=("sha256",)), header)[1] is True
    elsewhere = _build.event2(1, 3, b"StartupLocality\x00\x03", banks=("sha256",))
    assert _walk(_build.log(elsewhere, banks=("sha256",)), header)[1] is False


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"alg_ids": (), "sizes": ()}, "1 to 8 banks"),
        ({"alg_ids": (1,) * 9, "sizes": (20,) * 9}, "1 to 8 banks"),
        ({"sizes": (0,)}, "bad algorithm id, size or column"),
        ({"sizes": (129,)}, "bad algorithm id, size or column"),
        ({"alg_ids": (0x10000,)}, "bad algorithm id, size or column"),
        ({"max_pcr": 24}, "out of range"),
        ({"max_records": -1}, "out of range"),
        ({"alg_ids": ("11",)}, "algorithm ids and sizes are ints"),
        ({"sizes": (32.0,)}, "algorithm ids and sizes are ints"),
    ],
)
def test_walk_refuses_wrong_arguments(kw: dict[str, object], message: str) -> None:
    data = _build.log(_build.event2(0, 13, b"x", banks=("sha256",)), banks=("sha256",))
    with pytest.raises(ValueError, match=message):
        _walk(data, 0, **kw)


@pytest.mark.parametrize("offset", [-1, 10**6])
def test_walk_refuses_an_offset_outside_the_log(offset: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        _walk(b"\x00" * 64, offset)


def test_the_module_is_the_built_extension() -> None:
    """CI runs the C code, not a stand-in: the module is a shared object next to its
    source, built by pip install (setup.py)."""
    path = Path(_native.__file__ or "")
    assert path.suffix == ".so" and path.parent == Path(parse.__file__).parent
    assert _native.MAX_BANKS == 8


def test_the_c_part_is_clean_under_address_and_undefined_behaviour_sanitizers() -> None:
    """fuzz/asan_native.sh builds the module with gcc's ASan and UBSan, runs the event-log
    tests (this one excepted) and 300 mutations of each corpus log through the
    differential check of fuzz/fuzz_native.py; any sanitizer report aborts it."""
    script = REPO / "fuzz" / "asan_native.sh"
    result = subprocess.run(
        [str(script), str(CORPUS / "eventlogs")], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "no sanitizer report, C and Python agree" in result.stdout
    assert "AddressSanitizer" not in result.stderr
