"""One IMA measurement-list entry, as the kernel wrote it (Linux security/integrity/ima).

An :class:`ImaEntry` is what :func:`verifier.ima.parse.parse_list` returns,
and what appraisal (:mod:`verifier.ima.appraise`), learning
(:mod:`verifier.ima.learn`) and replay (:mod:`verifier.ima.replay`) read.

What a parsed entry guarantees: its fields are in the shape the kernel
writes (ima_template_lib.c), and, unless it is a violation, its listed
template hash is the hash of ``template_data`` (the parser refuses an entry
whose hash does not match: a forged entry). It does *not* guarantee that the
TPM measured it: only a replay that reaches a quoted PCR 10 proves that.
A violation entry (all-zero template hash, extended as all ones) proves
nothing about its data: the kernel could not measure the file.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["TEMPLATE_FORMATS", "ExtendMode", "Extender", "ImaEntry", "hash_name"]


# ima_template.c builtin_templates: name -> field ids ("fmt"). A custom
# template (ima_template_fmt=) is listed under its fmt string.
TEMPLATE_FORMATS = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-ngv2": ("d-ngv2", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-sigv2": ("d-ngv2", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "ima-modsig": ("d-ng", "n-ng", "sig", "d-modsig", "modsig"),
    "evm-sig": (
        "d-ng", "n-ng", "evmsig", "xattrnames", "xattrlengths", "xattrvalues",
        "iuid", "igid", "imode",
    ),
}  # fmt: skip


def hash_name(algo: str) -> str:
    """hashlib's name for an IMA/TPM algorithm name ("sm3_256" and "sm3-256" -> "sm3")."""
    return "sm3" if algo in ("sm3_256", "sm3-256") else algo


@dataclass(frozen=True, slots=True)
class ImaEntry:
    """One entry of the list.

    - ``index``: its position in the whole list (the parser's ``offset_index``
      plus its position in the input), ``offset``: its first byte in the input;
    - ``template_hash``: as listed (``template_hash_algo``; all zeros for a
      violation);
    - ``template_data``: the bytes the kernel hashes for the template digest
      (ima_calc_field_array_hash: every field as a u32 length and its data;
      for the legacy ``ima`` template the digest and the name zero-padded to
      256 bytes);
    - ``fields``: (field id, data) pairs as in the template;
    - ``digest_algo``/``digest``: the file (or buffer) digest; ``path``: the
      name field (a path, ``boot_aggregate``, or an ima-buf buffer name);
      ``signature``: the ``sig`` field where the template has one (may be
      empty); ``buf``: the ``buf`` field of ima-buf; ``digest_type``: "ima"
      or "verity" for the v2 digest field (d-ngv2), else None.
    """

    index: int
    offset: int
    pcr: int
    template_hash: bytes
    template_hash_algo: str
    template_name: str
    template_data: bytes
    fields: tuple[tuple[str, bytes], ...]
    digest_algo: str
    digest: bytes
    path: str
    signature: bytes | None = None
    buf: bytes | None = None
    digest_type: str | None = None
    is_violation: bool = False

    @property
    def known_template(self) -> bool:
        """Whether the fields were read by their ids (a known template or fmt)."""
        return all(fid != "?" for fid, _ in self.fields)

    def field(self, field_id: str) -> bytes | None:
        """The data of the first field with this id, or None."""
        for fid, data in self.fields:
            if fid == field_id:
                return data
        return None

    def template_digest(self, algo: str) -> bytes:
        """The template digest in ``algo`` (what kernels since 5.8 extend that bank with)."""
        return hashlib.new(hash_name(algo), self.template_data).digest()

    def to_bytes(self) -> bytes:
        """The entry as ``binary_runtime_measurements`` holds it (parsing gives it back)."""
        name = self.template_name.encode()
        head = struct.pack("<I", self.pcr) + self.template_hash
        head += struct.pack("<I", len(name)) + name
        if self.template_name == "ima":
            digest, raw_name = self.fields[0][1], self.fields[1][1][:-1]
            return head + digest + struct.pack("<I", len(raw_name)) + raw_name
        return head + struct.pack("<I", len(self.template_data)) + self.template_data

    def to_ascii(self) -> str:
        """The line ``ascii_runtime_measurements`` prints for it (no newline)."""
        parts = [f"{self.pcr:2d} {self.template_hash.hex()} {self.template_name}"]
        for fid, value in self.fields:
            parts.append(_show_ascii(fid, value))
        return " ".join(parts)


def _show_ascii(fid: str, value: bytes) -> str:
    """ima_template_lib.c ``ima_show_template_data_ascii`` for one field."""
    if not value:
        return ""
    if fid in ("d-ng", "d-ngv2", "d-modsig"):
        cut = value.find(b":\0")
        if cut > 0:
            return value[:cut].decode("ascii", "replace") + ":" + value[cut + 2 :].hex()
        return value.hex()
    if fid in ("n", "n-ng", "xattrnames"):
        return value.rstrip(b"\0").decode("utf-8", "surrogateescape")
    if fid in ("iuid", "igid", "imode"):
        return str(int.from_bytes(value, "little"))
    return value.hex()  # d, sig, buf, modsig, evmsig, xattr lengths/values, unknown


class ExtendMode(enum.Enum):
    """How the kernel extends each PCR 10 bank (see verifier.ima.replay)."""

    PER_BANK = "per-bank"
    SHA1_PADDED = "sha1-padded"


@dataclass(frozen=True, slots=True)
class Extender:
    """``entry -> {bank: value}`` (what ``verifier.ima.replay.extend_values`` gives), with
    the mode and banks it computes, so that ``advance`` can replay a parsed binary list
    in C (``ImaList.extend_pcr10``) with the same rule."""

    mode: ExtendMode
    banks: tuple[str, ...]
    values: Callable[[ImaEntry], Mapping[str, bytes]]

    def __call__(self, entry: ImaEntry) -> Mapping[str, bytes]:
        return self.values(entry)
