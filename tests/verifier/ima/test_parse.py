# ruff: noqa: E501  (the tables of cases keep one case per line)
"""The IMA measurement-list parser: every template, both forms, forged and hostile input."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.verifier.ima._entries import Entry, ima_ng
from verifier.ima.limits import ImaLimits
from verifier.ima.parse import parse_ascii, parse_binary, parse_list
from vtpm_core.errors import ConfigError, ParseError, VerificationError

HAS_SM3 = "sm3" in hashlib.algorithms_available


def _f(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _dng(algo: str, digest: bytes) -> bytes:
    return algo.encode() + b":\0" + digest


def raw_entry(name: str, fields: list[bytes], *, pcr: int = 10, bank: str = "sha1") -> bytes:
    """One binary entry built here, field by field (ima_template_lib.c), hash over the data."""
    data = b"".join(_f(x) for x in fields)
    th = hashlib.new(bank, data).digest()
    return struct.pack("<I", pcr) + th + _f(name.encode()) + _f(data)


def legacy_ima(path: bytes, digest: bytes) -> bytes:
    """The ``ima`` template: no data length, 'd' bare, 'n' without NUL; hashed padded."""
    th = hashlib.sha1(digest + path + bytes(256 - len(path))).digest()
    return struct.pack("<I", 10) + th + _f(b"ima") + digest + _f(path)


SIG = bytes.fromhex("030204aabbccdd0004") + b"\x01\x02\x03\x04"
CERT = b"0\x82\x01\x00" + b"k" * 16


# fmt: off
def _samples() -> list[tuple[str, bytes]]:
    d256 = hashlib.sha256(b"bash").digest()
    out = [
        ("ima", legacy_ima(b"/init", hashlib.sha1(b"init").digest())),
        ("ima-ng/sha1", raw_entry("ima-ng", [_dng("sha1", bytes(range(20))), b"/bin/sh\0"])),
        ("ima-ng/sha256", raw_entry("ima-ng", [_dng("sha256", d256), b"/usr/bin/bash\0"])),
        ("ima-ng/sha384", raw_entry("ima-ng", [_dng("sha384", b"\3" * 48), b"/a\0"])),
        ("ima-ng/sha512", raw_entry("ima-ng", [_dng("sha512", b"\5" * 64), b"/b\0"])),
        ("ima-sig", raw_entry("ima-sig", [_dng("sha256", d256), b"/usr/bin/bash\0", SIG])),
        ("ima-sig/unsigned", raw_entry("ima-sig", [_dng("sha256", d256), b"/x\0", b""])),
        ("ima-buf", raw_entry("ima-buf", [_dng("sha256", hashlib.sha256(CERT).digest()),
                                          b".ima\0", CERT])),
        ("ima-modsig", raw_entry("ima-modsig", [
            _dng("sha256", d256), b"/lib/modules/e1000.ko\0", b"",
            _dng("sha256", b"\7" * 32), b"\x30\x80pkcs7",
        ])),
        ("evm-sig", raw_entry("evm-sig", [
            _dng("sha256", d256), b"/etc/passwd\0", b"\x05\x02sig",
            b"security.ima|security.selinux\0", struct.pack("<II", 3, 4), b"abcdefg",
            struct.pack("<I", 1000), struct.pack("<I", 100), struct.pack("<H", 0o100644),
        ])),
        ("ima-ngv2", raw_entry("ima-ngv2", [b"verity:sha256:\0" + d256, b"/v\0"])),
        ("custom-fmt", raw_entry("d-ng|n-ng|buf", [_dng("sha256", d256), b"/c\0", b"x"])),
        ("violation", struct.pack("<I", 10) + bytes(20) + _f(b"ima-ng")
         + _f(_f(_dng("sha256", bytes(32))) + _f(b"/tmp/x\0"))),
        ("boot_aggregate", raw_entry("ima-ng", [_dng("sha256", b"\xba" * 32), b"boot_aggregate\0"])),
    ]
    if HAS_SM3:
        out.append(("ima-ng/sm3", raw_entry("ima-ng", [_dng("sm3", b"\6" * 32), b"/s\0"])))
    return out


# fmt: on
SAMPLES = _samples()
LIST = b"".join(b for _, b in SAMPLES)


@pytest.mark.parametrize(("name", "data"), SAMPLES, ids=[n for n, _ in SAMPLES])
def test_round_trip_binary_and_ascii(name: str, data: bytes) -> None:
    (entry,) = parse_list(data, offset_index=7)
    assert entry.index == 7 and entry.offset == 0 and entry.pcr == 10
    assert entry.to_bytes() == data
    line = entry.to_ascii()
    (again,) = parse_list(line.encode() + b"\n", offset_index=7)
    assert again.template_data == entry.template_data
    assert again.fields == entry.fields
    assert again.to_ascii() == line
    assert (again.path, again.digest_algo, again.digest) == (
        entry.path,
        entry.digest_algo,
        entry.digest,
    )


def test_fields_read() -> None:
    by = {n: parse_list(d)[0] for n, d in SAMPLES}
    assert (by["ima"].template_name, by["ima"].path, by["ima"].digest_algo) == (
        "ima",
        "/init",
        "sha1",
    )
    assert by["ima-sig"].signature == SIG and by["ima-sig/unsigned"].signature == b""
    assert by["ima-ng/sha256"].signature is None
    assert by["ima-buf"].buf == CERT and by["ima-buf"].path == ".ima"
    assert by["ima-modsig"].field("modsig") == b"\x30\x80pkcs7"
    assert by["evm-sig"].field("imode") == struct.pack("<H", 0o100644)
    assert "420 " not in by["evm-sig"].to_ascii() and " 33188" in by["evm-sig"].to_ascii()
    assert (by["ima-ngv2"].digest_type, by["ima-ngv2"].digest_algo) == ("verity", "sha256")
    assert by["custom-fmt"].buf == b"x" and by["custom-fmt"].known_template
    assert by["violation"].is_violation and by["violation"].path == "/tmp/x"
    assert by["ima-ng/sha512"].digest == b"\5" * 64
    if HAS_SM3:
        assert by["ima-ng/sm3"].digest_algo == "sm3"


def test_whole_list_indices_and_offsets() -> None:
    entries = parse_list(LIST, offset_index=100)
    assert [e.index for e in entries] == list(range(100, 100 + len(SAMPLES)))
    offsets = [0]
    for _, d in SAMPLES[:-1]:
        offsets.append(offsets[-1] + len(d))
    assert [e.offset for e in entries] == offsets
    text = "".join(e.to_ascii() + "\n" for e in entries).encode()
    assert [e.template_data for e in parse_list(text)] == [e.template_data for e in entries]


def test_per_bank_template_hash_files() -> None:
    """binary_runtime_measurements_sha256: the template hash is the sha256 of the data."""
    data = raw_entry("ima-ng", [_dng("sha256", b"\1" * 32), b"/a\0"], bank="sha256")
    (entry,) = parse_binary(data, template_hash_algo="sha256")
    assert entry.template_hash == entry.template_digest("sha256")
    (line,) = parse_list(entry.to_ascii().encode())
    assert line.template_hash_algo == "sha256"
    with pytest.raises(ParseError):  # read as a SHA-1 file, the framing is off
        parse_binary(data)


def test_unknown_template_is_opaque_in_binary_refused_in_ascii() -> None:
    data = raw_entry("my-template", [b"one", b"two"])
    (entry,) = parse_list(data)
    assert not entry.known_template and entry.path == "" and entry.digest == b""
    assert entry.fields == (("?", b"one"), ("?", b"two"))
    with pytest.raises(ParseError, match=r"^ima_entry\[0\]\.template_name at byte 44: unknown"):
        parse_list(entry.to_ascii().encode())


def test_forged_entry_names_index_and_offset() -> None:
    good = ima_ng("/usr/bin/bash", b"bash").to_bytes()
    forged = bytearray(ima_ng("/usr/bin/bash", b"evil").to_bytes())
    forged[4:24] = good[4:24]  # the template hash of the good file, the data of the evil one
    data = good + bytes(forged)
    with pytest.raises(
        VerificationError,
        match=rf"^ima\.template_hash: entry 41 at byte {len(good)} \(ima-ng '/usr/bin/bash'\):"
        r" template hash [0-9a-f]{40} is not the sha1 of its data .*: a forged entry$",
    ):
        parse_list(data, offset_index=40)
    line = Entry("ima-ng", "/usr/bin/bash", "sha256", hashlib.sha256(b"bash").digest()).ascii_line()
    evil = line.replace(hashlib.sha256(b"bash").hexdigest(), hashlib.sha256(b"evil").hexdigest())
    with pytest.raises(VerificationError, match=r"entry 1 at byte \d+ .*forged"):
        parse_list(f"{line}\n{evil}\n".encode())


def test_truncation_at_every_offset() -> None:
    bounds = {0}
    for _, d in SAMPLES:
        bounds.add(max(bounds) + len(d))
    for cut in range(1, len(LIST)):
        if cut in bounds:
            assert len(parse_list(LIST[:cut])) == sum(1 for b in bounds if 0 < b <= cut)
            continue
        with pytest.raises(
            ParseError, match=r"truncated|runs past|bytes after|template_name"
        ) as info:
            parse_list(LIST[:cut])
        start = max(b for b in bounds if b <= cut)
        assert start <= info.value.offset <= cut, (cut, info.value)
        assert info.value.structure == f"ima_entry[{sorted(bounds).index(start)}]"


# fmt: off
BAD_INPUT = [
    pytest.param(raw_entry("ima-ng", [_dng("sha1", b"\1" * 20), b"/a\0"], pcr=30), ImaLimits(),
                 r"^ima_entry\[0\]\.pcr at byte 0: PCR 30", id="fail/pcr"),
        pytest.param(LIST, ImaLimits(max_list_bytes=100), r"^ima_list\.list at byte 100: \d+ bytes exceeds",
                     id="fail/limit/list-bytes"),
        pytest.param(LIST, ImaLimits(max_entries=3), r"^ima_entry\[3\]\.entry at byte \d+: more than the 3-entry",
                     id="fail/limit/entries"),
        pytest.param(SAMPLES[7][1], ImaLimits(max_template_data=50),
                     r"^ima_entry\[0\]\.template_data_len at byte 35: \d+ exceeds the 50-byte limit",
                     id="fail/limit/template-data"),
        pytest.param(struct.pack("<I", 10) + bytes(20) + struct.pack("<I", 10**6), ImaLimits(),
                     r"^ima_entry\[0\]\.template_name_len at byte 24: 1000000", id="fail/name-len"),
        pytest.param(raw_entry("ima-ng", [_dng("sha256", b"\1" * 31), b"/a\0"]), ImaLimits(),
                     r"sha256 digest of 31 bytes, expected 32", id="fail/digest-size"),
        pytest.param(raw_entry("ima-ng", [_dng("foo", b"\1" * 32), b"/a\0"]), ImaLimits(),
                     r"unknown hash algorithm 'foo'", id="fail/digest-algo"),
        pytest.param(raw_entry("ima-ng", [_dng("sha1", b"\1" * 20), b"/a"]), ImaLimits(),
                     r"^ima_entry\[0\]\.n-ng at byte \d+: name is not one NUL-terminated", id="fail/name-nul"),
        pytest.param(raw_entry("ima-ng", [_dng("sha1", b"\1" * 20), b"/a\0", b"x"]), ImaLimits(),
                     r"bytes after the 2 fields of template 'ima-ng'", id="fail/extra-field"),
        pytest.param(raw_entry("ima-sig", [_dng("sha1", b"\1" * 20), b"/a\0"]), ImaLimits(),
                     r"sig\.len at byte \d+: truncated", id="fail/missing-field"),
        pytest.param(b"10 zz ima-ng sha1:00 /a\n", ImaLimits(), r"^ima_entry\[0\]\.template_hash at byte 3: not hex",
                     id="fail/ascii/hex"),
        pytest.param(b"10 " + b"00" * 20 + b" ima-ng /a\n", ImaLimits(), r"1 fields, template 'ima-ng' has 2",
                     id="fail/ascii/columns"),
        pytest.param(b"10 " + b"00" * 19 + b" ima-ng sha1:00 /a\n", ImaLimits(), r"19-byte hash: which algorithm",
                     id="fail/ascii/hash-size"),
        pytest.param(b"10 x\n\n", ImaLimits(), r"^ima_entry\[0\]\.line at byte 0: 2 of 4 columns",
                     id="fail/ascii/short"),
    ]
# fmt: on


@pytest.mark.parametrize(("data", "limits", "pattern"), BAD_INPUT)
def test_bad_input_named(data: bytes, limits: ImaLimits, pattern: str) -> None:
    with pytest.raises(ParseError, match=pattern):
        parse_list(data, limits=limits)


def test_ascii_empty_line_in_the_middle() -> None:
    line = ima_ng("/a", b"a").ascii_line().encode()
    with pytest.raises(ParseError, match=r"^ima_entry\[1\]\.line at byte \d+: empty line"):
        parse_ascii(line + b"\n\n" + line + b"\n")


def test_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="max_entries"):
        ImaLimits(max_entries=0)


def _only_our_errors(data: bytes) -> None:
    try:
        entries = parse_list(data, limits=ImaLimits(max_entries=64, max_template_data=4096))
    except (ParseError, VerificationError):
        return
    for entry in entries:
        assert parse_list(entry.to_bytes())[0].fields == entry.fields
        _ = entry.to_ascii()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_only_parse_errors(data: bytes) -> None:
    _only_our_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(LIST) - 1), st.integers(0, 255), st.integers(1, 4))
def test_mutated_list_only_parse_errors(at: int, value: int, width: int) -> None:
    data = bytearray(LIST)
    data[at : at + width] = bytes([value]) * width
    _only_our_errors(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789abcdef :\n-_/.imangsbufd", max_size=300))
def test_random_ascii_only_parse_errors(text: str) -> None:
    _only_our_errors(b"10 " + text.encode())


# fmt: off
KEYLIME_TEMPLATES = ("ima", "ima-ng/sha1", "ima-ng/sha256", "ima-sig", "ima-sig/unsigned", "ima-buf",
                     "violation", "boot_aggregate")
# fmt: on


@pytest.mark.parametrize("name", KEYLIME_TEMPLATES)
def test_keylime_reads_our_lines_the_same(name: str) -> None:
    """Keylime's own ASCII parser (keylime.ima.ast) on our lines: same template hash check,
    same digest and path. (Keylime has no parser for ima-modsig, evm-sig, ima-ngv2 or
    custom fmt templates: it fails those entries as unparsable; we read them.)"""
    from tests.verifier.ima import keylime_oracle  # noqa: F401, I001  (stubs gpg first)
    from keylime.ima import ast

    (entry,) = parse_list(dict(SAMPLES)[name])
    theirs = ast.Entry(entry.to_ascii())
    failure = theirs.invalid()
    events = {e.event_id for e in failure.events}
    assert "ima.validation.ima_hash" not in events, events  # their hash check agrees
    assert theirs.mode.bytes() == entry.template_data  # the bytes both hash
    digest = theirs.mode.digest  # type: ignore[attr-defined]
    assert (digest.algorithm, digest.hash) == (entry.digest_algo, entry.digest)
    path = getattr(theirs.mode, "path", None) or theirs.mode.name  # type: ignore[attr-defined]
    assert path.name == entry.path
    forged = entry.to_ascii().replace(entry.template_hash.hex(), "11" * 20)
    if not entry.is_violation:
        assert "ima.validation.ima_hash" in {e.event_id for e in ast.Entry(forged).invalid().events}
