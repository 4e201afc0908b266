"""PcrSelection and PcrValues: encodings, digests, JSON, and the algorithm helpers."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes

from vtpm_core.errors import VerificationError
from vtpm_core.tpm import (
    PcrSelection,
    PcrValues,
    TpmAlg,
    cryptography_hash,
    digest_size,
    hash_alg,
    hash_name,
    hashlib_new,
)


def test_selection_wire_round_trip_and_string() -> None:
    sel = PcrSelection.from_string("sha256:0,1,2,16+sha1:7")
    wire = sel.to_bytes()
    assert wire == bytes.fromhex("00000002000b03070001000403800000")
    assert PcrSelection.parse(wire) == sel
    assert str(sel) == "sha256:0,1,2,16+sha1:7"
    assert sel.as_sets() == {"sha256": frozenset({0, 1, 2, 16}), "sha1": frozenset({7})}
    # a 4-byte bitmap re-encodes as read
    four = bytes.fromhex("00000001000b0401000000")
    assert PcrSelection.parse(four).to_bytes() == four
    assert str(PcrSelection(())) == "(none)"


def test_values_digest_is_in_selection_order() -> None:
    v = {i: bytes([i]) * 32 for i in range(4)}
    values = PcrValues({"sha256": v, "sha1": {7: b"\x07" * 20}})
    sel = PcrSelection.from_string("sha256:0,3+sha1:7")
    expected = hashlib.sha256(v[0] + v[3] + b"\x07" * 20).digest()
    assert values.digest(sel, TpmAlg.SHA256) == expected
    assert values.digest(sel, "sha256") == expected
    assert values.select(sel).as_mapping() == {
        "sha256": {0: v[0], 3: v[3]},
        "sha1": {7: b"\x07" * 20},
    }
    assert str(values.selection) == "sha1:7+sha256:0,1,2,3"
    with pytest.raises(VerificationError, match=r"pcr.values: no value for sha256:9"):
        values.digest(PcrSelection.from_string("sha256:9"), TpmAlg.SHA256)
    with pytest.raises(TypeError):
        values.values["sha256"][0] = b""  # type: ignore[index]


def test_values_json_round_trip() -> None:
    obj = {"sha256": {"0": "00" * 32, "10": "ab" * 32}, "sha1": {"7": "0x" + "11" * 20}}
    values = PcrValues.from_json(obj)
    assert values.value("sha1", 7) == b"\x11" * 20
    assert PcrValues.from_json(values.to_json()) == values
    assert values.to_json()["sha256"]["10"] == "ab" * 32


def test_values_form_needs_exact_length() -> None:
    sel = PcrSelection.from_string("sha256:0+sha1:1")
    data = b"\x01" * 32 + b"\x02" * 20
    assert PcrValues.from_tpm2_tools(data, sel).value(TpmAlg.SHA1, 1) == b"\x02" * 20
    with pytest.raises(Exception, match=r"tpm2_tools.pcrs.values.end at byte 52: 1 trailing"):
        PcrValues.from_tpm2_tools(data + b"\0", sel)


@pytest.mark.parametrize(
    ("alg", "name", "size", "crypto"),
    [
        (TpmAlg.SHA1, "sha1", 20, hashes.SHA1),
        (TpmAlg.SHA256, "sha256", 32, hashes.SHA256),
        (TpmAlg.SHA384, "sha384", 48, hashes.SHA384),
        (TpmAlg.SHA512, "sha512", 64, hashes.SHA512),
    ],
)
def test_hash_helpers(alg: TpmAlg, name: str, size: int, crypto: type) -> None:
    assert hash_name(alg) == name and hash_alg(name) == alg and hash_alg(name.upper()) == alg
    assert digest_size(alg) == size == hashlib_new(alg, b"x").digest_size
    assert isinstance(cryptography_hash(alg), crypto)


@pytest.mark.parametrize("bad", [TpmAlg.RSA, 0x9999])
def test_hash_helpers_reject_non_hashes(bad: int) -> None:
    with pytest.raises(ValueError, match="hash algorithm"):
        hash_name(bad)
    with pytest.raises(ValueError, match="hash algorithm"):
        digest_size(bad)
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        hash_alg("md5")
