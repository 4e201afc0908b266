"""tpm2-tools' serialized PCR file: parsed values equal what tpm2_checkquote reads from it."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Tools
from vtpm_core.errors import ParseError
from vtpm_core.vm.pcrs_file import parse_pcrs_file

pytestmark = [pytest.mark.vm, pytest.mark.swtpm]

SELECTION = "sha1:0,1,2,16,23+sha256:0,1,2,3,4,5,6,7,8,9,16,23"
AK_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"


@pytest.fixture
def quote_files(tools: Tools, tmp_path: Path) -> tuple[bytes, dict[str, dict[int, bytes]]]:
    tools.run("tpm2_pcrextend", "16:sha1=" + "11" * 20 + ",sha256=" + "22" * 32)
    tools.run("tpm2_pcrextend", "23:sha256=" + "33" * 32)
    tools.run(
        "tpm2_createprimary", "-C", "o", "-G", "rsa2048:rsassa-sha256:null",
        "-a", AK_ATTRS, "-c", "ak.ctx",
    )  # fmt: skip
    tools.run("tpm2_readpublic", "-c", "ak.ctx", "-o", "ak.pub")
    tools.run(
        "tpm2_quote", "-c", "ak.ctx", "-l", SELECTION, "-q", "abcd",
        "-m", "q.msg", "-s", "q.sig", "-o", "q.pcrs", "-g", "sha256",
    )  # fmt: skip
    out = tools.run(
        "tpm2_checkquote", "-u", "ak.pub", "-m", "q.msg", "-s", "q.sig",
        "-f", "q.pcrs", "-g", "sha256", "-q", "abcd",
    ).stdout  # fmt: skip
    checked = yaml.safe_load(out)["pcrs"]
    sizes = {"sha1": 20, "sha256": 32}
    oracle = {
        bank: {int(i): int(v).to_bytes(sizes[bank], "big") for i, v in pcrs.items()}
        for bank, pcrs in checked.items()
    }
    return (tmp_path / "q.pcrs").read_bytes(), oracle


def test_values_equal_tpm2_checkquote(
    quote_files: tuple[bytes, dict[str, dict[int, bytes]]],
) -> None:
    data, oracle = quote_files
    parsed = parse_pcrs_file(data)
    assert parsed == oracle
    assert sorted(parsed["sha256"]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 23]
    assert parsed["sha256"][0] == bytes(32) and parsed["sha256"][23] != bytes(32)


_ALG = {"sha1": 0x0004, "sha256": 0x000B}


def serialize(values: dict[str, dict[int, bytes]]) -> bytes:
    """The file tpm2-tools would write for these values (selection order = dict order)."""
    sel = struct.pack("<I", len(values))
    flat: list[bytes] = []
    for bank, pcrs in values.items():
        bits = sum(1 << i for i in pcrs)
        sel += struct.pack("<HB", _ALG[bank], 3) + bits.to_bytes(4, "little") + b"\0"
        flat += [pcrs[i] for i in sorted(pcrs)]
    sel += bytes(4 + 16 * 8 - len(sel))
    blocks = [flat[i : i + 8] for i in range(0, len(flat), 8)]
    out = sel + struct.pack("<I", len(blocks))
    for block in blocks:
        out += struct.pack("<I", len(block))
        for d in block:
            out += struct.pack("<H", len(d)) + d.ljust(64, b"\0")
        out += bytes(66 * (8 - len(block)))
    return out


def test_serializer_matches_the_tool(
    quote_files: tuple[bytes, dict[str, dict[int, bytes]]],
) -> None:
    data, oracle = quote_files
    assert serialize(oracle) == data  # so the cases below mutate a faithful file


SAMPLE = serialize(
    {
        "sha1": {0: b"\x01" * 20, 16: b"\x02" * 20},
        "sha256": {i: bytes([i]) * 32 for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)},
    }
)
_FIRST_DIGEST = 132 + 4 + 4


def _patched(offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(SAMPLE)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


_CASES = [
    ("fail/truncated/header", SAMPLE[:100], "file too short"),
    ("fail/truncated/values", SAMPLE[:-1], "do not match the file size"),
    ("fail/trailing", SAMPLE + b"\0", "do not match the file size"),
    ("fail/count", _patched(0, "<I", 17), "17 banks"),
    ("fail/bank/unknown", _patched(4, "<H", 0x0099), "unknown bank 0x0099"),
    ("fail/bank/twice", _patched(12, "<H", 0x0004), "bank sha1 twice"),
    ("fail/sizeof-select", _patched(6, "<B", 5), "5 > 4 bytes"),
    ("fail/selection/fewer", _patched(7, "<B", 0x00), "12 values for 11 selected PCRs"),
    ("fail/digest-count", _patched(136, "<I", 9), "9 digests"),
    ("fail/digest-size/bank", _patched(_FIRST_DIGEST, "<H", 32), "32-byte value in the sha1"),
    ("fail/digest-size/huge", _patched(_FIRST_DIGEST, "<H", 65), "65 > 64"),
]


def test_sample_parses() -> None:
    assert parse_pcrs_file(SAMPLE)["sha1"] == {0: b"\x01" * 20, 16: b"\x02" * 20}


@pytest.mark.parametrize(("data", "match"), [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
def test_malformed_files(data: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        parse_pcrs_file(data)


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(0, len(SAMPLE) + 4),
    edits=st.lists(st.tuples(st.integers(0, len(SAMPLE) - 1), st.integers(0, 255)), max_size=6),
)
def test_only_parse_error_escapes(cut: int, edits: list[tuple[int, int]]) -> None:
    data = bytearray(SAMPLE[:cut])
    for off, val in edits:
        if off < len(data):
            data[off] = val
    with contextlib.suppress(ParseError):
        parsed = parse_pcrs_file(bytes(data))
        assert all(len(v) in (20, 32) for bank in parsed.values() for v in bank.values())
