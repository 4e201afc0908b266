"""Authenticode digests: against the digests signers embedded, synthetic PE32/PE32+ images, and
malformed input (ParseError only). The VM tests add the third oracle: what OVMF logged in PCR4."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest
from asn1crypto import algos, cms, core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtpm_core.authenticode import PeImage, authenticode_digest
from vtpm_core.errors import ParseError

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
EFI_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")


class _SpcIndirectDataContent(core.Sequence):
    # Authenticode spec, "SpcIndirectDataContent": the signed image digest
    _fields = [("data", core.Any), ("message_digest", algos.DigestInfo)]  # noqa: RUF012


def _tlv_body(der: bytes) -> bytes:
    n = der[1]
    if n < 0x80:
        return der[2 : 2 + n]
    k = n & 0x7F
    length = int.from_bytes(der[2 : 2 + k], "big")
    return der[2 + k : 2 + k + length]


def embedded_digests(data: bytes) -> list[tuple[str, bytes]]:
    """(algorithm, digest) from every WIN_CERTIFICATE's SpcIndirectDataContent."""
    pe = PeImage.parse(data)
    out = []
    pos, end = pe.cert_table_offset, pe.cert_table_offset + pe.cert_table_size
    while pos < end:
        length, _rev, cert_type = struct.unpack_from("<IHH", data, pos)
        assert cert_type == 0x0002  # WIN_CERT_TYPE_PKCS_SIGNED_DATA
        info = cms.ContentInfo.load(data[pos + 8 : pos + length])
        content = info["content"]["encap_content_info"]["content"]
        spc = _SpcIndirectDataContent.load(_tlv_body(content.dump()))
        md = spc["message_digest"]
        out.append((md["digest_algorithm"]["algorithm"].native, md["digest"].native))
        pos += (length + 7) & ~7
    return out


def make_pe(
    *,
    pe32_plus: bool = True,
    sections: tuple[bytes, ...] = (b"code" * 100, b"data" * 50),
    trailer: bytes = b"",
    cert: bytes = b"",
    nrva: int = 16,
) -> bytes:
    """A minimal but well-formed PE image (headers, section table, raw data, cert table)."""
    opt_size = (112 if pe32_plus else 96) + 8 * nrva
    coff = 0x44
    opt = coff + 20
    sect_tbl = opt + opt_size
    soh = (sect_tbl + 40 * len(sections) + 0x1FF) & ~0x1FF
    body = bytearray(soh)
    body[0:2] = b"MZ"
    struct.pack_into("<I", body, 0x3C, 0x40)
    body[0x40:0x44] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", body, coff, 0x8664, len(sections), 0, 0, 0, opt_size, 0x22)
    struct.pack_into("<H", body, opt, 0x20B if pe32_plus else 0x10B)
    struct.pack_into("<I", body, opt + 60, soh)
    struct.pack_into("<I", body, opt + 64, 0xDEADBEEF)  # CheckSum: excluded from the digest
    struct.pack_into("<I", body, opt + opt_size - 8 * nrva - 4, nrva)
    raw = bytearray()
    ptr = soh
    for i, sec in enumerate(sections):
        s = sect_tbl + 40 * i
        body[s : s + 8] = f".s{i}".encode().ljust(8, b"\0")
        padded = sec + b"\0" * (-len(sec) % 0x200)
        struct.pack_into("<II", body, s + 16, len(padded), ptr)
        raw += padded
        ptr += len(padded)
    image = bytes(body) + bytes(raw) + trailer
    if cert and nrva > 4:
        image += b"\0" * (-len(image) % 8)
        dd = opt + opt_size - 8 * nrva + 8 * 4
        image = bytearray(image)
        struct.pack_into("<II", image, dd, len(image), len(cert))
        image = bytes(image) + cert
    return bytes(image)


def expected_digest(img: bytes, pe32_plus: bool, nrva: int, cert_len: int) -> bytes:
    """The spec's steps written out with fixed offsets for make_pe's layout."""
    opt = 0x44 + 20
    opt_size = (112 if pe32_plus else 96) + 8 * nrva
    cks = opt + 64
    soh = struct.unpack_from("<I", img, opt + 60)[0]
    h = hashlib.sha256(img[:cks])
    if nrva > 4:
        dd = opt + opt_size - 8 * nrva + 32
        h.update(img[cks + 4 : dd] + img[dd + 8 : soh])
    else:
        h.update(img[cks + 4 : soh])
    h.update(img[soh : len(img) - cert_len])
    return h.digest()


@pytest.mark.parametrize("pe32_plus", [True, False], ids=["pe32+", "pe32"])
@pytest.mark.parametrize("nrva", [16, 4], ids=["with-cert-dir", "no-cert-dir"])
@pytest.mark.parametrize("trailer", [b"", b"TRAILING" * 3], ids=["no-trailer", "trailer"])
def test_synthetic_images(pe32_plus: bool, nrva: int, trailer: bytes) -> None:
    cert = b"C" * 24 if nrva > 4 else b""
    img = make_pe(pe32_plus=pe32_plus, nrva=nrva, trailer=trailer, cert=cert)
    pe = PeImage.parse(img)
    assert pe.pe32_plus is pe32_plus
    assert pe.cert_table_size == len(cert)
    assert authenticode_digest(img) == expected_digest(img, pe32_plus, nrva, len(cert))


def test_checksum_and_certificates_do_not_change_the_digest() -> None:
    img = bytearray(make_pe(cert=b"X" * 16))
    other = make_pe(cert=b"Y" * 40)
    struct.pack_into("<I", img, 0x44 + 20 + 64, 0)
    assert authenticode_digest(bytes(img)) == authenticode_digest(other)
    changed = bytearray(img)
    changed[0x200] ^= 1  # a byte of section data
    assert authenticode_digest(bytes(changed)) != authenticode_digest(bytes(img))


def test_section_data_is_the_mapped_section() -> None:
    # VirtualSize (section header + 8) cuts the raw data or zero-fills it; 0 means raw size
    img = bytearray(make_pe(sections=(b"kernel" * 100, b"data" * 50)))
    sect = 0x44 + 20 + 112 + 8 * 16
    pe = PeImage.parse(bytes(img))
    assert pe.section_data(pe.sections[0]) == (b"kernel" * 100).ljust(0x400, b"\0")
    struct.pack_into("<I", img, sect + 8, 600)
    struct.pack_into("<I", img, sect + 40 + 8, 0x300)
    pe = PeImage.parse(bytes(img))
    assert [s.virtual_size for s in pe.sections] == [600, 0x300]
    assert pe.section_data(pe.sections[0]) == b"kernel" * 100
    assert pe.section_data(pe.sections[1]) == (b"data" * 50).ljust(0x300, b"\0")


def test_sha1_bank() -> None:
    img = make_pe()
    assert len(authenticode_digest(img, "sha1")) == 20
    assert authenticode_digest(img, "sha1") != authenticode_digest(img, "sha256")[:20]


@pytest.mark.skipif(shutil.which("sbsign") is None, reason="sbsigntool not installed")
@pytest.mark.parametrize("path", [SYSTEMD_BOOT, EFI_STUB], ids=["systemd-boot", "efi-stub"])
def test_equals_the_digest_sbsign_signs(tmp_path: Path, path: Path) -> None:
    from vtpm_core.vm.esp import sign_efi

    signed = sign_efi(path, tmp_path / "signed.efi").read_bytes()
    assert embedded_digests(signed) == [("sha256", authenticode_digest(signed))]
    # sbsign first pads the image to 8 bytes (the certificate table is 8-aligned):
    # that padding is hashed, so an unaligned file's digest changes once signed
    unsigned = path.read_bytes()
    padded = unsigned + bytes(-len(unsigned) % 8)
    assert authenticode_digest(signed) == authenticode_digest(padded)


def _corrupt(offset: int, fmt: str, value: int) -> bytes:
    img = bytearray(make_pe(cert=b"Z" * 16))
    struct.pack_into(fmt, img, offset, value)
    return bytes(img)


_OPT = 0x44 + 20
_SECT0 = _OPT + 112 + 8 * 16
_CASES = [
    ("fail/e_magic", b"ZM" + make_pe()[2:], "e_magic"),
    ("fail/e_lfanew/outside", _corrupt(0x3C, "<I", 1 << 30), "Signature"),
    ("fail/signature", _corrupt(0x40, "<I", 0x454E), "Signature"),
    ("fail/sections/too-many", _corrupt(0x44 + 2, "<H", 500), "NumberOfSections"),
    ("fail/optional-header/too-small", _corrupt(0x44 + 16, "<H", 16), "SizeOfOptionalHeader"),
    ("fail/magic", _corrupt(_OPT, "<H", 0x107), "Magic"),
    ("fail/nrva/too-many", _corrupt(_OPT + 108, "<I", 4000), "NumberOfRvaAndSizes"),
    ("fail/size-of-headers/too-big", _corrupt(_OPT + 60, "<I", 1 << 30), "SizeOfHeaders"),
    ("fail/size-of-headers/too-small", _corrupt(_OPT + 60, "<I", 0x40), "SizeOfHeaders"),
    ("fail/section/outside", _corrupt(_SECT0 + 20, "<I", 1 << 30), "PointerToRawData"),
    ("fail/section/size", _corrupt(_SECT0 + 16, "<I", 1 << 30), "PointerToRawData"),
    ("fail/cert-table/outside", _corrupt(_OPT + 112 + 36, "<I", 1 << 30), "CertificateTable"),
    ("fail/truncated/empty", b"", "e_magic"),
    ("fail/truncated/dos-header", make_pe()[:0x3C], "e_lfanew"),
    ("fail/truncated/coff", make_pe()[:0x48], "NumberOfSections|SizeOfOptionalHeader|Magic"),
    ("fail/truncated/section-table", make_pe()[: _SECT0 + 20], "SectionTable|NumberOfRva"),
]


@pytest.mark.parametrize(("data", "field"), [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
def test_malformed_images_raise_parse_error(data: bytes, field: str) -> None:
    with pytest.raises(ParseError, match=rf"PE/COFF\.\S*({field})"):
        authenticode_digest(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([make_pe(), make_pe(pe32_plus=False, cert=b"q" * 8)]),
    cut=st.integers(min_value=0, max_value=4000),
    edits=st.lists(st.tuples(st.integers(0, 0x400), st.integers(0, 255)), max_size=8),
)
def test_only_parse_error_escapes(base: bytes, cut: int, edits: list[tuple[int, int]]) -> None:
    data = bytearray(base[:cut])
    for off, val in edits:
        if off < len(data):
            data[off] = val
    try:
        digest = authenticode_digest(bytes(data))
    except ParseError:
        return
    assert len(digest) == 32
