"""IMA entries for the tests, built the way the kernel builds them, read by the real parser.

:class:`Entry` is a specification with the attribute names of
``verifier.ima.entries.ImaEntry`` (appraisal accepts either); ``to_bytes``
serialises it on its own, independently of the parser, as the kernel does
(security/integrity/ima/ima_template_lib.c: each field as a little-endian
u32 length and its data; ``d-ng`` is ``<algo>:\\0<digest>``, ``n-ng`` the
path with its NUL), template digests per bank as newer kernels extend
(``ima_calc_field_array_hash``: the bank's hash over the template data; all
ones for a violation). The Keylime agreement tests feed the same entries to
Keylime as ASCII lines, whose template hash Keylime recomputes: a wrong
serialisation here would fail there.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from verifier.ima.entries import ImaEntry
from verifier.ima.parse import parse_list

BANK_HASH = {"sha1": "sha1", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512"}


@dataclass(frozen=True)
class Entry:
    template_name: str
    path: str
    digest_algo: str
    digest: bytes
    signature: bytes | None = None
    buf: bytes | None = None
    is_violation: bool = False
    pcr: int = 10

    def template_data(self) -> bytes:
        def f(data: bytes) -> bytes:
            return struct.pack("<I", len(data)) + data

        dng = f(self.digest_algo.encode() + b":\0" + self.digest)
        nng = f(self.path.encode() + b"\0")
        if self.template_name == "ima-ng":
            return dng + nng
        if self.template_name == "ima-sig":
            return dng + nng + f(self.signature or b"")
        if self.template_name == "ima-buf":
            return dng + nng + f(self.buf or b"")
        return dng + nng  # a template the parser does not know: read as opaque fields

    def template_hash(self) -> bytes:
        if self.is_violation:
            return b"\0" * 20
        return hashlib.sha1(self.template_data()).digest()

    def to_bytes(self) -> bytes:
        """The entry as binary_runtime_measurements holds it (ima_fs.c)."""
        name = self.template_name.encode()
        head = struct.pack("<I", self.pcr) + self.template_hash() + struct.pack("<I", len(name))
        return head + name + struct.pack("<I", len(self.template_data())) + self.template_data()

    def parsed(self, index: int = 0) -> ImaEntry:
        """What the real parser makes of ``to_bytes``."""
        (entry,) = parse_list(self.to_bytes(), offset_index=index)
        return entry

    def ascii_line(self) -> str:
        """The line /sys/kernel/security/ima/ascii_runtime_measurements prints."""
        return self.parsed().to_ascii()


def extend_values(entry: Entry) -> dict[str, bytes]:
    """What the kernel extends PCR 10 with for ``entry``, per bank."""
    out = {}
    for bank, name in BANK_HASH.items():
        size = hashlib.new(name).digest_size
        out[bank] = (
            b"\xff" * size
            if entry.is_violation
            else hashlib.new(name, entry.template_data()).digest()
        )
    return out


def replay(
    entries: list[Entry],
    banks: tuple[str, ...] = ("sha256",),
    start: dict[str, bytes] | None = None,
) -> dict[str, bytes]:
    pcr = dict(start) if start else {b: bytes(hashlib.new(BANK_HASH[b]).digest_size) for b in banks}
    for e in entries:
        values = extend_values(e)
        for b in banks:
            pcr[b] = hashlib.new(BANK_HASH[b], pcr[b] + values[b]).digest()
    return pcr


def ima_ng(path: str, content: bytes, algo: str = "sha256") -> Entry:
    return Entry("ima-ng", path, algo, hashlib.new(algo, content).digest())
