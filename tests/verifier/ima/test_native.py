"""The C walk, replay and policy lookup (verifier/ima/_native.c) give exactly what the
plain Python path gives: on every published list (as binary), on this project's VM's
list, on every template the parser knows, on every truncation, and on hostile
mutations; and a wrong argument is a ValueError, never a crash.

The plain path is the reference: ``parse.WALK = False`` reads every entry with the
plain reader (the one that names entry index, field and byte offset), and a plain
tuple of entries sends ``advance`` and ``appraise_entries`` through their Python
loops (``extend_values`` per entry, ``_appraise_one`` per entry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.verifier.ima.test_parse import SAMPLES, raw_entry
from verifier.ima import _native, appraise, parse
from verifier.ima.appraise import advance, appraise_entries
from verifier.ima.entries import TEMPLATE_FORMATS, ImaEntry
from verifier.ima.limits import DEFAULT_IMA_LIMITS, ImaLimits
from verifier.ima.parse import ImaList, parse_binary, parse_list
from verifier.ima.policy import Digest, ExcludeList, RuntimePolicy, ViolationMode
from verifier.ima.replay import ExtendMode, extend_values, replay
from verifier.ima.signature import TrustedKey, TrustedKeys
from vtpm_core.errors import ParseError, VerificationError

pytestmark = pytest.mark.filterwarnings("error")
DATA = Path(__file__).resolve().parents[2] / "data" / "ima"
SAMPLE_LIST = b"".join(b for _, b in SAMPLES)


def _published() -> list[tuple[str, bytes, str]]:
    """Every list in tests/data/ima, in the binary form (name, bytes, template-hash algo)."""
    out = [("vtpm-guest/ima.bin", (DATA / "vtpm-guest" / "ima.bin").read_bytes(), "sha1")]
    for path in sorted(DATA.glob("*.ascii")):
        entries = parse_list(path.read_bytes())
        out.append(
            (path.name, b"".join(e.to_bytes() for e in entries), entries[0].template_hash_algo)
        )
    out.append(("samples", SAMPLE_LIST, "sha1"))
    return out


PUBLISHED = _published()


def _outcome(data: bytes, limits: ImaLimits, algo: str) -> object:
    try:
        entries = parse_binary(data, limits=limits, template_hash_algo=algo)
    except (ParseError, VerificationError) as exc:
        return (type(exc).__name__, str(exc))
    assert isinstance(entries, ImaList)
    return ("ok", tuple(entries), [entries[i] for i in range(-len(entries), 0)])


def _both(
    data: bytes, limits: ImaLimits = DEFAULT_IMA_LIMITS, algo: str = "sha1"
) -> tuple[object, object]:
    walked = _outcome(data, limits, algo)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parse, "WALK", False)
        plain = _outcome(data, limits, algo)
    return walked, plain


@pytest.mark.parametrize(("name", "data", "algo"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_every_published_list_parses_the_same_with_and_without_the_walk(
    name: str, data: bytes, algo: str
) -> None:
    walked, plain = _both(data, algo=algo)
    assert walked == plain
    assert walked[0] == "ok"  # type: ignore[index]


def test_the_walk_takes_the_common_templates_and_leaves_the_rest_to_the_reader() -> None:
    entries = parse_binary(SAMPLE_LIST)
    by_reader = {entries[i].template_name for i in entries._extra}
    assert by_reader >= {"ima", "ima-ngv2", "d-ng|n-ng|buf"}
    assert len(entries._extra) < len(entries) // 2
    assert set(parse.WALKED_TEMPLATES) == {"ima-ng", "ima-sig", "ima-buf", "ima-modsig", "evm-sig"}


def test_a_sha256_template_hash_list_walks_the_same() -> None:
    fields = [b"sha256:\0" + b"\1" * 32, b"/bin/x\0"]
    data = raw_entry("ima-ng", fields, bank="sha256") * 3
    walked, plain = _both(data, algo="sha256")
    assert walked == plain and walked[0] == "ok"  # type: ignore[index]
    assert len(parse_binary(data, template_hash_algo="sha256")._extra) == 0


def test_every_truncation_fails_the_same_way() -> None:
    guest = PUBLISHED[0][1]
    entries = parse_binary(guest)
    bounds = [e.offset for e in entries] + [len(guest)]
    cuts = set(range(0, bounds[3] + 1))  # every byte of the first entries
    for b in bounds:
        cuts |= {b - 1, b, b + 1, b + 9}
    errors = 0
    for data in (guest, SAMPLE_LIST):
        limit = len(SAMPLE_LIST) + 1 if data is SAMPLE_LIST else len(data) + 1
        for cut in sorted(
            c for c in (cuts if data is guest else range(limit)) if 0 <= c <= len(data)
        ):
            walked, plain = _both(data[:cut])
            assert walked == plain, cut
            errors += walked[0] != "ok"  # type: ignore[index]
    assert errors > 1000


def test_limits_stop_the_walk_where_the_reader_stops() -> None:
    data = PUBLISHED[0][1]
    for limits in (ImaLimits(max_entries=10), ImaLimits(max_template_data=80)):
        walked, plain = _both(data, limits)
        assert walked == plain and walked[0] == "ParseError"  # type: ignore[index]


def test_a_forged_entry_is_named_the_same_way() -> None:
    data = bytearray(PUBLISHED[0][1])
    entries = parse_binary(bytes(data))
    data[entries[20].offset + 4] ^= 1  # its template hash
    walked, plain = _both(bytes(data))
    assert walked == plain
    assert walked[0] == "VerificationError" and "entry 20 at byte" in walked[1]  # type: ignore[index]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    picks = draw(st.lists(st.sampled_from(range(len(SAMPLES))), min_size=0, max_size=6))
    data = bytearray(b"".join(SAMPLES[i][1] for i in picks))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["byte", "u32", "cut", "pad"]))
        if kind == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "u32":
            value = draw(
                st.sampled_from([0, 1, 2, 8, 10, 23, 24, 255, 256, 0x7FFFFFFF, 0xFFFFFFFF])
            )
            data[at : at + 4] = struct.pack("<I", value)
        elif kind == "cut":
            del data[at:]
        else:
            data += bytes([draw(st.sampled_from([0, 0xFF, 10]))]) * draw(st.integers(1, 40))
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated(), st.sampled_from([ImaLimits(), ImaLimits(max_entries=3, max_template_data=64)]))
def test_hostile_lists_parse_the_same_with_and_without_the_walk(
    data: bytes, limits: ImaLimits
) -> None:
    walked, plain = _both(data, limits)
    assert walked == plain


# fields in and out of shape, under a template hash that matches them (a mutation of a
# real entry's data breaks its hash, so the walk would stop there whatever it checks)
_FIELDS = [
    b"sha256:\0" + b"\2" * 32, b"sha256:\0" + b"\2" * 31, b"sha256:\0" + b"\2" * 33,
    b"sha1:\0" + b"\3" * 20, b"sm3-256:\0" + b"\4" * 32, b"sm3_256:\0" + b"\4" * 32,
    b"md4:\0" + b"\5" * 16, b"SHA256:\0" + b"\2" * 32, b":\0" + b"\2" * 32,
    b"sha256\0" + b"\2" * 32, b"\6" * 20, b"\6" * 16, b"", b"ima:sha256:\0" + b"\2" * 32,
    b"verity:sha256:\0" + b"\2" * 32, b"sha256:\0:\0" + b"\2" * 30,
    b"/usr/bin/x\0", b"/usr/bin/x", b"\0", b"/a\0b\0", b"\xff\xfe/\0", b"boot_aggregate\0",
    bytes.fromhex("030204aabbccdd0004") + b"\1\2\3\4", b"\1\0", b"\1\0\0\0", b"\1" * 8, b"\1" * 3,
]  # fmt: skip
_NAMES = [*parse.WALKED_TEMPLATES, "ima-ngv2", "ima-sigv2", "d-ng|n-ng|buf", "ima-ng2"]


_KINDS = {
    "d-ng": _FIELDS[:16], "d-modsig": _FIELDS[:16], "n-ng": _FIELDS[16:22],
    "sig": [b"", _FIELDS[22]], "iuid": [*_FIELDS[23:27], b""], "igid": [b"", b"\1\0\0\0"],
    "imode": [b"", b"\1\0"],
}  # fmt: skip


@st.composite
def _odd_entries(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(_NAMES))
        fmt = TEMPLATE_FORMATS.get(name, ("d-ng", "n-ng", "buf"))
        fields = [
            draw(
                st.sampled_from(_FIELDS if draw(st.integers(0, 4)) == 0 else _KINDS.get(f, _FIELDS))
            )
            for f in fmt
        ]
        if draw(st.integers(0, 5)) == 0:
            fields = (
                fields[:-1] if draw(st.booleans()) else [*fields, draw(st.sampled_from(_FIELDS))]
            )
        data = b"".join(struct.pack("<I", len(f)) + f for f in fields)
        data += draw(st.sampled_from([b"", b"", b"", b"\0", b"\1\0\0"]))
        th = bytes(20) if draw(st.integers(0, 9)) == 0 else hashlib.sha1(data).digest()
        pcr = draw(st.sampled_from([10, 10, 10, 0, 23, 24]))
        raw = name.encode()
        out += struct.pack("<I", pcr) + th + struct.pack("<I", len(raw)) + raw
        out += struct.pack("<I", len(data)) + data
    return out


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_odd_entries())
def test_fields_out_of_shape_parse_the_same_with_and_without_the_walk(data: bytes) -> None:
    walked, plain = _both(data)
    assert walked == plain


def test_the_odd_fields_reach_the_walk() -> None:
    """(the strategy above is not all refused before the walk checks a field)"""
    head = b"sha256:\0" + b"\2" * 32, b"/usr/bin/x\0"
    ok = raw_entry("ima-sig", [*head, b""])
    assert len(parse_binary(ok)._extra) == 0
    for bad in (
        [head[0], b"/usr/bin/x"],
        [head[0], b"/a\0b\0"],
        [b"sha256:\0" + b"\2" * 31, head[1]],
        [b"sha256:\0" + b"\2" * 33, head[1]],
    ):
        assert _both(raw_entry("ima-ng", bad))[0][0] == "ParseError"  # type: ignore[index]
    for modsig in (b"sha256:\0" + b"\2" * 31, b"sha256\0" + b"\2" * 32, b"\6" * 20):
        walked, plain = _both(raw_entry("ima-modsig", [*head, b"", modsig, b"x"]))
        assert walked == plain


# --- replay and appraisal ----------------------------------------------------------------


def _policies(entries: tuple[ImaEntry, ...]) -> list[RuntimePolicy]:
    """Learned from the list (all pass), with a third of the paths dropped, one digest
    changed, excludes, trusted keys, violations ignored, and kernel modules by digest."""
    files: dict[str, set[Digest]] = {"/never/measured": {("sha256", bytes(32))}}
    bufs: dict[str, set[Digest]] = {}
    for e in entries:
        if not e.is_violation and e.path:
            target = bufs if e.template_name == "ima-buf" else files
            target.setdefault(e.path, set()).add((e.digest_algo, e.digest))
    learned = RuntimePolicy(digests=files, ima_buf=bufs, name="learned")
    paths = sorted(files)
    dropped = {p: files[p] for i, p in enumerate(paths) if i % 3 or p == "/never/measured"}
    changed = dict(files)
    changed[paths[-1]] = {("sha256", b"\x11" * 32)}
    pem = (DATA / "keylime-rsa2048.pub.pem").read_bytes()
    keys = TrustedKeys.of([TrustedKey.load(pem, name="rsa")])
    modules = {d for p, ds in files.items() if ".ko" in p for d in ds}
    return [
        learned,
        dataclasses.replace(learned, digests=dropped),
        dataclasses.replace(learned, digests=changed),
        dataclasses.replace(learned, excludes=ExcludeList(("/usr/lib/.*", "/etc/(pass|fs)"))),
        dataclasses.replace(learned, signing_keys=keys),
        dataclasses.replace(learned, violations=ViolationMode.IGNORE_WITH_FLAG),
        dataclasses.replace(
            learned,
            digests={p: d for p, d in files.items() if ".ko" not in p},
            kernel_modules=modules,
        ),
    ]


def _step(
    entries: object, policy: RuntimePolicy, banks: tuple[str, ...], mode: ExtendMode, at: int
) -> object:
    whole = tuple(entries)  # type: ignore[call-overload]
    quoted = replay(whole[:at], banks, mode=mode)
    try:
        step = advance(
            None, reset_count=1, start_index=0, entries=entries, quoted_pcr10=quoted,  # type: ignore[arg-type]
            policy=policy, extend_values=extend_values(mode, banks),
        )  # fmt: skip
    except VerificationError as exc:
        return ("VerificationError", str(exc))
    return (step.appraisal, step.state, step.proven, step.pending)


@pytest.mark.parametrize(("name", "data", "algo"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_advance_and_appraisal_agree_with_the_python_loops(
    name: str, data: bytes, algo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(appraise, "FAST_LOOKUP_MIN", 0)  # the lookup on short lists too
    walked = parse_binary(data, template_hash_algo=algo)
    plain = tuple(walked)
    assert isinstance(walked, ImaList)
    for policy in _policies(plain):
        assert appraise_entries(walked, policy, first_index=5) == appraise_entries(
            plain, policy, first_index=5
        )
        assert appraise_entries(walked[2:], policy) == appraise_entries(plain[2:], policy)
        for banks in (("sha1",), ("sha256",), ("sha1", "sha256", "sha384", "sha512")):
            for mode in ExtendMode:
                for at in {len(plain), len(plain) // 2, 0}:
                    assert _step(walked, policy, banks, mode, at) == _step(
                        plain, policy, banks, mode, at
                    ), (policy.name, banks, mode, at)


def test_a_quote_no_prefix_reaches_is_refused_the_same_way() -> None:
    walked = parse_binary(PUBLISHED[0][1])
    plain = tuple(walked)
    policy = _policies(plain)[0]
    wrong = {"sha256": b"\x01" * 32}
    outcomes = []
    for entries in (walked, plain):
        with pytest.raises(VerificationError) as exc:
            advance(
                None, reset_count=1, start_index=0, entries=entries, quoted_pcr10=wrong,
                policy=policy, extend_values=extend_values(ExtendMode.PER_BANK, ("sha256",)),
            )  # fmt: skip
        outcomes.append(str(exc.value))
    assert outcomes[0] == outcomes[1] and "no prefix of the 46 entries" in outcomes[0]


def test_extend_entries_is_the_kernel_extend() -> None:
    entries = parse_binary(SAMPLE_LIST)
    for banks in (("sha256",), ("sha1", "sha384")):
        for mode in ExtendMode:
            end = replay(tuple(entries), banks, mode=mode)
            zeros = [bytes(hashlib.new(b).digest_size) for b in banks]
            taken, values = entries.extend_pcr10(
                banks, mode is ExtendMode.SHA1_PADDED, zeros, [end[b] for b in banks]
            )
            assert taken == len(entries) and values == tuple(end[b] for b in banks)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _native.walk_entries(b"", 1, 0, 9, 20, "sha1", 9, (), ()), "out of range"),
        (
            lambda: _native.walk_entries(b"", 0, 0, 9, 20, "sha1", 9, ((b"x", b"OO"),), ()),
            "templates",
        ),
        (
            lambda: _native.walk_entries(b"", 0, 0, 9, 20, "sha1", 9, (), ((b"sha1", 0),)),
            "digest size",
        ),
        (
            lambda: _native.extend_entries(
                b"",
                b"",
                b"\0" * 5,
                0,
                0,
                20,
                False,
                ("sha1",),
                (False,),
                (bytes(20),),
                (bytes(20),),
            ),
            "out of range",
        ),
        (
            lambda: _native.extend_entries(
                b"", b"", b"", 0, 1, 20, False, ("sha1",), (False,), (bytes(20),), (bytes(20),)
            ),
            "out of range",
        ),
        (
            lambda: _native.extend_entries(
                b"", b"", b"", 0, 0, 20, False, ("sha1",), (False,), (bytes(19),), (bytes(20),)
            ),
            "value sizes",
        ),
        (
            lambda: _native.extend_entries(
                b"",
                b"",
                struct.pack("<6I", 0, 99, 1, 0, 10, 0),
                0,
                1,
                20,
                False,
                ("sha1",),
                (False,),
                (bytes(20),),
                (bytes(20),),
            ),
            "out of its buffer",
        ),
        (lambda: _native.unmatched_entries(b"", b"", 0, 1, 10, b"", set()), "span range"),
        (lambda: _native.unmatched_entries(b"", b"", 0, 0, 10, b"", {}), "key set"),
    ],
)
def test_wrong_arguments_are_value_errors(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_a_digest_openssl_lacks_is_a_lookup_error() -> None:
    with pytest.raises(LookupError, match="no 20-byte OpenSSL digest nosuch"):
        _native.walk_entries(b"", 0, 0, 9, 20, "nosuch", 9, (), ())
    with pytest.raises(LookupError, match="no digest nosuch"):
        _native.extend_entries(
            b"", b"", b"", 0, 0, 20, False, ("nosuch",), (False,), (bytes(20),), (bytes(20),)
        )
