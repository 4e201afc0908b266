"""PE/COFF Authenticode image digest: what UEFI firmware measures into PCR4.

Spec: Microsoft, "Windows Authenticode Portable Executable Signature Format"
(version 1.0, March 2008), section "Calculating the PE Image Hash", and the
PE/COFF specification (revision 11), sections 3.3 (COFF file header), 3.4
(optional header, data directories) and 3.5 (section table). UEFI 2.10
section 32.2.4 and the TCG PC Client Platform Firmware Profile 1.05 section
10.4.4 (EV_EFI_BOOT_SERVICES_APPLICATION) use this digest for images loaded
from disk.

The hash covers, in order:

1. the headers up to the optional header's CheckSum field;
2. the rest of the headers up to SizeOfHeaders, skipping CheckSum and the
   Certificate Table data directory entry (index 4, when it exists);
3. each section's raw data, sections sorted by PointerToRawData, empty
   sections skipped;
4. any bytes after the last section, up to the file end minus the size of
   the attribute certificate table (the signatures themselves).

Step 4 follows EDK2's ``HashPeImage`` (what OVMF runs): the certificate table
is assumed to sit at the end of the file, which the Authenticode spec
requires of signed images.

Guarantees: :meth:`PeImage.parse` accepts only images whose header, section
table, section data and certificate table lie inside the file; anything else
raises :class:`ParseError` naming the field and offset. Not checked: the
signatures in the certificate table (use sbverify for that), the section
contents, or that the image would load.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from vtpm_core.errors import ParseError

__all__ = ["PeImage", "PeSection", "authenticode_digest"]

_STRUCT = "PE/COFF"
_PE32 = 0x10B
_PE32_PLUS = 0x20B
_CERT_TABLE_INDEX = 4  # IMAGE_DIRECTORY_ENTRY_SECURITY
_MAX_SECTIONS = 96  # the PE/COFF spec's Windows loader limit
_MAX_ZERO_FILL = 1 << 26  # a section mapped 64 MiB past its file data is no UKI resource


@dataclass(frozen=True, slots=True)
class PeSection:
    """One section table entry (only what the digest needs)."""

    name: bytes
    pointer_to_raw_data: int
    size_of_raw_data: int
    virtual_size: int = 0  # (what a loader maps; 0: SizeOfRawData)


@dataclass(frozen=True, slots=True)
class PeImage:
    """A PE/COFF image parsed far enough to compute its Authenticode digest."""

    raw: bytes
    pe32_plus: bool
    checksum_offset: int
    cert_dir_offset: int | None  # offset of the Certificate Table directory entry
    cert_table_offset: int
    cert_table_size: int
    size_of_headers: int
    sections: tuple[PeSection, ...]

    @classmethod
    def parse(cls, data: bytes) -> PeImage:
        """Parse the headers and section table; raise ParseError on malformed input."""
        n = len(data)

        def u16(off: int, field: str) -> int:
            if off < 0 or off + 2 > n:
                raise ParseError(_STRUCT, field, off, f"truncated (file is {n} bytes)")
            return int(struct.unpack_from("<H", data, off)[0])

        def u32(off: int, field: str) -> int:
            if off < 0 or off + 4 > n:
                raise ParseError(_STRUCT, field, off, f"truncated (file is {n} bytes)")
            return int(struct.unpack_from("<I", data, off)[0])

        if data[:2] != b"MZ":
            raise ParseError(_STRUCT, "e_magic", 0, f"expected 'MZ', got {data[:2]!r}")
        pe = u32(0x3C, "e_lfanew")
        if pe + 4 > n or data[pe : pe + 4] != b"PE\0\0":
            raise ParseError(_STRUCT, "Signature", pe, "no 'PE\\0\\0' signature at e_lfanew")
        coff = pe + 4
        nsect = u16(coff + 2, "NumberOfSections")
        if nsect > _MAX_SECTIONS:
            raise ParseError(
                _STRUCT, "NumberOfSections", coff + 2, f"{nsect} sections (max {_MAX_SECTIONS})"
            )
        opt_size = u16(coff + 16, "SizeOfOptionalHeader")
        opt = coff + 20
        magic = u16(opt, "Magic")
        if magic not in (_PE32, _PE32_PLUS):
            raise ParseError(_STRUCT, "Magic", opt, f"expected 0x10b or 0x20b, got {magic:#x}")
        pe32_plus = magic == _PE32_PLUS
        dd_start = opt + (112 if pe32_plus else 96)
        nrva_off = dd_start - 4
        if opt_size < dd_start - opt:
            raise ParseError(
                _STRUCT,
                "SizeOfOptionalHeader",
                coff + 16,
                f"{opt_size} bytes cannot hold the {'PE32+' if pe32_plus else 'PE32'} fields",
            )
        nrva = u32(nrva_off, "NumberOfRvaAndSizes")
        if dd_start + 8 * nrva > opt + opt_size:
            raise ParseError(
                _STRUCT,
                "NumberOfRvaAndSizes",
                nrva_off,
                f"{nrva} data directories do not fit in the optional header ({opt_size} bytes)",
            )
        checksum_off = opt + 64
        size_of_headers = u32(opt + 60, "SizeOfHeaders")
        sect_tbl = opt + opt_size
        sect_end = sect_tbl + 40 * nsect
        if sect_end > n:
            raise ParseError(_STRUCT, "SectionTable", sect_tbl, "section table runs past the file")
        if size_of_headers > n or size_of_headers < sect_end:
            raise ParseError(
                _STRUCT,
                "SizeOfHeaders",
                opt + 60,
                f"{size_of_headers} is outside [end of section table {sect_end}, file size {n}]",
            )
        cert_dir: int | None = None
        cert_off = cert_size = 0
        if nrva > _CERT_TABLE_INDEX:
            cert_dir = dd_start + 8 * _CERT_TABLE_INDEX
            cert_off = u32(cert_dir, "CertificateTable.VirtualAddress")
            cert_size = u32(cert_dir + 4, "CertificateTable.Size")
            # for this entry VirtualAddress is a file offset (PE/COFF 4.7)
            if cert_off and (cert_off < size_of_headers or cert_off + cert_size > n):
                raise ParseError(
                    _STRUCT,
                    "CertificateTable",
                    cert_dir,
                    f"table [{cert_off}, +{cert_size}) lies outside the file body (size {n})",
                )
            if not cert_off:
                cert_size = 0
        sections = []
        for i in range(nsect):
            s = sect_tbl + 40 * i
            size, ptr = struct.unpack_from("<II", data, s + 16)
            if size and (ptr < size_of_headers or ptr + size > n):
                raise ParseError(
                    _STRUCT,
                    f"Section[{i}].PointerToRawData",
                    s + 20,
                    f"raw data [{ptr}, +{size}) lies outside the file body (size {n})",
                )
            if cert_off and size and ptr + size > cert_off:
                raise ParseError(
                    _STRUCT,
                    f"Section[{i}].SizeOfRawData",
                    s + 16,
                    "section data overlaps the certificate table",
                )
            vsize = int(struct.unpack_from("<I", data, s + 8)[0])
            sections.append(PeSection(data[s : s + 8].rstrip(b"\0"), ptr, size, vsize))
        return cls(
            raw=bytes(data),
            pe32_plus=pe32_plus,
            checksum_offset=checksum_off,
            cert_dir_offset=cert_dir,
            cert_table_offset=cert_off,
            cert_table_size=cert_size,
            size_of_headers=size_of_headers,
            sections=tuple(sections),
        )

    def section_data(self, section: PeSection) -> bytes:
        """The section as a loader maps it: ``VirtualSize`` bytes of its raw data, zero
        filled past ``SizeOfRawData`` (PE/COFF 3.5); all raw data when VirtualSize is 0."""
        size = section.virtual_size or section.size_of_raw_data
        if size - section.size_of_raw_data > _MAX_ZERO_FILL:
            raise ParseError(
                _STRUCT, f"Section {section.name!r}.VirtualSize", 0,
                f"{size} bytes, {size - section.size_of_raw_data} past its raw data",
            )  # fmt: skip
        start = section.pointer_to_raw_data
        raw = self.raw[start : start + min(size, section.size_of_raw_data)]
        return raw + bytes(size - len(raw))

    def digest(self, hash_name: str = "sha256") -> bytes:
        """The Authenticode digest with ``hash_name`` (any hashlib name: sha1, sha256, ...)."""
        data = self.raw
        h = hashlib.new(hash_name)
        # steps 1 and 2: headers without CheckSum and the Certificate Table entry
        h.update(data[: self.checksum_offset])
        if self.cert_dir_offset is not None:
            h.update(data[self.checksum_offset + 4 : self.cert_dir_offset])
            h.update(data[self.cert_dir_offset + 8 : self.size_of_headers])
        else:
            h.update(data[self.checksum_offset + 4 : self.size_of_headers])
        # step 3: section data in file order
        hashed = self.size_of_headers
        for sec in sorted(self.sections, key=lambda s: s.pointer_to_raw_data):
            if sec.size_of_raw_data:
                h.update(
                    data[sec.pointer_to_raw_data : sec.pointer_to_raw_data + sec.size_of_raw_data]
                )
                hashed += sec.size_of_raw_data
        # step 4: trailing data, minus the certificate table (EDK2 HashPeImage)
        end = len(data) - self.cert_table_size
        if end > hashed:
            h.update(data[hashed:end])
        return h.digest()


def authenticode_digest(data: bytes, hash_name: str = "sha256") -> bytes:
    """Authenticode digest of a PE/COFF file's bytes; ParseError if it is not a sane PE."""
    return PeImage.parse(data).digest(hash_name)
