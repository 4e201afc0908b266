"""Parse IMA measurement lists: ``binary_runtime_measurements`` and the ASCII form.

Source of the formats: Linux security/integrity/ima/ima_fs.c
(``ima_measurements_show``, ``ima_ascii_measurements_show``) and
ima_template_lib.c (the template fields). The binary form, per entry, all
integers little-endian (x86, arm64, or any host with ``ima_canonical_fmt``):

    u32 pcr | template hash (20 bytes SHA-1; the bank's size in the
    binary_runtime_measurements_<algo> files of newer kernels) |
    u32 name length | template name |
    ``ima``: 20-byte digest, u32 name length, name (no NUL)
    others: u32 template-data length | template data (each field as a u32
    length and its data)

The ASCII form is one line per entry: ``PCR template-hash name field...``,
every field after a space (an empty field leaves an empty token), digests as
``algo:hex``, names as they are (the kernel turns spaces in names into
``_`` when it records them), binary fields in hex.

Every entry's template hash is checked against its template data here: a
mismatch is a forged entry, and :func:`parse_list` raises VerificationError
rather than return it. A violation entry (all-zero template hash) has no
hash to check; replay extends it as all ones. Malformed input raises
ParseError naming the entry index and the byte offset.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import overload

try:
    from verifier.ima import _native
except ImportError:  # a tree whose C part is not built yet (scripts/setup.sh builds it)
    _native = None  # type: ignore[assignment]
from verifier.ima.entries import TEMPLATE_FORMATS, ImaEntry, hash_name
from verifier.ima.limits import DEFAULT_IMA_LIMITS, ImaLimits
from verifier.ima.policy import DIGEST_SIZES, canonical_algorithm
from vtpm_core.errors import ParseError, VerificationError

__all__ = [
    "DIGEST_FIELDS",
    "FIELD_IDS",
    "WALKED_TEMPLATES",
    "ImaList",
    "parse_ascii",
    "parse_binary",
    "parse_list",
    "template_hash_algorithm",
]

# ima_template.c supported_fields
FIELD_IDS = frozenset(
    {
        "d", "n", "d-ng", "n-ng", "d-ngv2", "sig", "buf", "d-modsig", "modsig", "evmsig",
        "xattrnames", "xattrlengths", "xattrvalues", "iuid", "igid", "imode",
    }
)  # fmt: skip
DIGEST_FIELDS = ("d-ng", "d-ngv2", "d")
NAME_FIELDS = ("n-ng", "n")
STRING_FIELDS = frozenset({"n", "n-ng", "xattrnames"})
UINT_SIZES = {"iuid": 4, "igid": 4, "imode": 2}
# crypto/hash_info.c names beyond the policy's table (sizes for the shape check)
_EXTRA_SIZES = {
    "md4": 16, "rmd160": 20, "sha224": 28, "wp256": 32, "wp384": 48, "wp512": 64,
    "tgr128": 16, "tgr160": 20, "tgr192": 24,
}  # fmt: skip
ALGO_SIZES = {**_EXTRA_SIZES, **DIGEST_SIZES, "sm3-256": 32}
_HASH_BY_SIZE = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}
MAX_TEMPLATE_NAME = 255  # a custom template is named by its fmt string
MAX_PCRS = 24  # TPM 2.0 PC Client: PCRs 0-23 (the first byte tells binary from ASCII)
MAX_FIELDS = 32  # IMA_TEMPLATE_NUM_FIELDS_MAX is 15
IMA_NAME_MAX = 255  # IMA_EVENT_NAME_LEN_MAX: the legacy "ima" template pads to 256
_U32 = struct.Struct("<I")
# the "<algo>:" prefixes of d-ng fields, read without decoding (the hot path)
_DNG_PREFIXES = {
    name.encode(): (canonical_algorithm(name), size) for name, size in ALGO_SIZES.items()
}
_DIGEST_TYPES = ("ima", "verity")

# The C walk (verifier/ima/_native.c): the templates whose fields it checks, as
# (name, one code per field: D d-ng, N n-ng, M d-modsig, U integer, S sig, O opaque),
# and the d-ng prefixes it knows. Everything else goes to the plain reader.
_WALK_CODES = {
    "d-modsig": b"M", "iuid": b"U", "igid": b"U", "imode": b"U", "sig": b"S", "buf": b"O",
    "modsig": b"O", "evmsig": b"O", "xattrnames": b"O", "xattrlengths": b"O",
    "xattrvalues": b"O",
}  # fmt: skip
_WALK_TABLE = tuple(
    (name.encode(), b"DN" + b"".join(_WALK_CODES[f] for f in fmt[2:]))
    for name, fmt in TEMPLATE_FORMATS.items()
    if fmt[:2] == ("d-ng", "n-ng") and all(f in _WALK_CODES for f in fmt[2:])
)
WALKED_TEMPLATES = tuple(name.decode() for name, _ in _WALK_TABLE)
"""The templates the C walk reads, in the order of :meth:`ImaList.unmatched`'s ``eligible``."""
_WALK_PREFIXES = tuple((prefix, size) for prefix, (_, size) in _DNG_PREFIXES.items())
_WALK_HASHES = frozenset({"sha1", "sha256", "sha384", "sha512"})
NATIVE = _native is not None  # without it: the plain reader and loops, same results, slower
WALK = NATIVE  # tests switch the walk off to compare with the plain reader alone
SPAN_WORDS = 6  # _native.c SPAN_WORDS
INFO_VIOLATION = 0x100
INFO_SIDE = 0x400
_SPAN = struct.Struct(f"<{SPAN_WORDS}I")
_SPAN_BYTES = _SPAN.size
_INFO_COMPLEX = 0xFF  # template id of an entry the plain reader made
_HSIZE = ALGO_SIZES


def _where(index: int) -> str:
    return f"ima_entry[{index}]"


def template_hash_algorithm(name: str) -> Callable[[bytes], bytes]:
    """A fast ``data -> digest`` for a template-hash algorithm (ParseError if unknown)."""
    name = hash_name(name)
    constructor = getattr(hashlib, name, None)
    if constructor is not None:
        return lambda data: constructor(data).digest()
    try:
        hashlib.new(name)
    except ValueError:
        raise ParseError("ima_list", "template_hash", 0, f"no {name} here") from None
    return lambda data: hashlib.new(name, data).digest()


def parse_list(
    data: bytes,
    *,
    offset_index: int = 0,
    limits: ImaLimits = DEFAULT_IMA_LIMITS,
    template_hash_algo: str | None = None,
) -> Sequence[ImaEntry]:
    """Parse a whole list or a delta of one, binary or ASCII (told apart by the first byte).

    ``offset_index`` is the list index of the first entry in ``data`` (an
    attester sending the entries after the first N passes N). The template
    hash is SHA-1 in the default files; pass ``template_hash_algo`` for a
    ``binary_runtime_measurements_<algo>`` file (for ASCII it is told from
    the hash length when not given). Guarantees: every entry returned is
    well formed and its template hash matches its data (or it is a
    violation). Raises ParseError (malformed, over a limit) or
    VerificationError (a template hash that does not match: a forged entry).
    """
    if len(data) > limits.max_list_bytes:
        raise ParseError(
            "ima_list", "list", limits.max_list_bytes,
            f"{len(data)} bytes exceeds the {limits.max_list_bytes}-byte limit",
        )  # fmt: skip
    if offset_index < 0:
        raise ParseError("ima_list", "offset_index", 0, f"negative start index {offset_index}")
    if not data:
        return ()
    if data[0] in b"0123456789 ":  # a binary list starts with the PCR index (< 24)
        return parse_ascii(
            data, offset_index=offset_index, limits=limits, template_hash_algo=template_hash_algo
        )
    return parse_binary(
        data,
        offset_index=offset_index,
        limits=limits,
        template_hash_algo=template_hash_algo or "sha1",
    )


def parse_binary(
    data: bytes,
    *,
    offset_index: int = 0,
    limits: ImaLimits = DEFAULT_IMA_LIMITS,
    template_hash_algo: str = "sha1",
) -> ImaList:
    """The binary form (see the module docstring); same guarantees as :func:`parse_list`.

    The entries the C walk accepts (``_native.walk_entries``: the templates in
    :data:`WALKED_TEMPLATES` with SHA-family template hashes) stay bytes in the
    returned :class:`ImaList`; every other entry, and every entry the walk stops
    at, is read by :func:`_read_entry`, the plain reader, which names what is
    wrong (entry index, field, byte offset) or returns the entry.
    """
    algo = canonical_algorithm(template_hash_algo)
    hsize = ALGO_SIZES.get(algo)
    if hsize is None:
        raise ParseError("ima_list", "template_hash", 0, f"unknown algorithm {algo!r}")
    reader = _Reader(algo, hsize, limits)
    walk = WALK and algo in _WALK_HASHES and len(data) <= 0xFFFFFFFF
    chunks: list[bytes] = []
    side: list[bytes] = []
    side_len = 0
    extra: dict[int, ImaEntry] = {}
    pos = 0
    count = 0
    end = len(data)
    while pos < end:
        if walk:
            stop, spans = _native.walk_entries(
                data, pos, count, limits.max_entries, hsize, algo, limits.max_template_data,
                _WALK_TABLE, _WALK_PREFIXES,
            )  # fmt: skip
            if spans:
                chunks.append(spans)
                count += len(spans) // _SPAN_BYTES
            pos = stop
            if pos >= end:
                break
        entry, pos = reader.read(data, pos, offset_index + count, count)
        extra[count] = entry
        td = entry.template_data
        info = _INFO_COMPLEX | INFO_SIDE | (INFO_VIOLATION if entry.is_violation else 0)
        chunks.append(_SPAN.pack(entry.offset, side_len, len(td), 0, entry.pcr, info))
        side.append(td)
        side_len += len(td)
        count += 1
    return ImaList(data, b"".join(side), b"".join(chunks), extra, offset_index, algo, reader)


class _Reader:
    """The plain reader of one binary entry (the reference the C walk is tested against)."""

    __slots__ = ("algo", "hasher", "head", "hsize", "limits", "names", "zero")

    def __init__(self, algo: str, hsize: int, limits: ImaLimits) -> None:
        self.algo = algo
        self.hsize = hsize
        self.head = 8 + hsize
        self.zero = bytes(hsize)
        self.hasher = template_hash_algorithm(algo)
        self.limits = limits
        self.names: dict[bytes, str] = {}  # each distinct template name is checked once

    def read(self, data: bytes, pos: int, index: int, count: int) -> tuple[ImaEntry, int]:
        """The entry at ``pos`` (the ``count``-th of the input) and where the next begins."""
        limits = self.limits
        unpack = _U32.unpack_from
        hsize = self.hsize
        end = len(data)
        start = pos
        if count >= limits.max_entries:
            raise ParseError(
                _where(index), "entry", pos, f"more than the {limits.max_entries}-entry limit"
            )
        if pos + self.head > end:
            raise _truncated(index, "header", pos, self.head, end - pos)
        (pcr,) = unpack(data, pos)
        th = data[pos + 4 : pos + 4 + hsize]
        (name_len,) = unpack(data, pos + 4 + hsize)
        if pcr >= MAX_PCRS:
            raise ParseError(_where(index), "pcr", pos, f"PCR {pcr} (a TPM has {MAX_PCRS})")
        pos += self.head
        if not 0 < name_len <= MAX_TEMPLATE_NAME:
            raise ParseError(
                _where(index), "template_name_len", pos - 4,
                f"{name_len} (expected 1..{MAX_TEMPLATE_NAME})",
            )  # fmt: skip
        if pos + name_len > end:
            raise _truncated(index, "template_name", pos, name_len, end - pos)
        raw_name = data[pos : pos + name_len]
        names = self.names
        name = names.get(raw_name) or names.setdefault(
            raw_name, _template_name(raw_name, index, pos)
        )
        pos += name_len
        if name == "ima":
            # ima_measurements_show: "d" without its length, "n" without its NUL
            if pos + 24 > end:
                raise _truncated(index, "template_data", pos, 24, end - pos)
            digest = data[pos : pos + 20]
            (nlen,) = unpack(data, pos + 20)
            if nlen > IMA_NAME_MAX:
                raise ParseError(
                    _where(index), "n", pos + 20, f"name of {nlen} bytes (at most {IMA_NAME_MAX})"
                )
            pos += 24
            if pos + nlen > end:
                raise _truncated(index, "n", pos, nlen, end - pos)
            raw_name = data[pos : pos + nlen]
            pos += nlen
            fields: tuple[tuple[str, bytes], ...] = (("d", digest), ("n", raw_name + b"\0"))
            template_data = _ima_hash_input(digest, raw_name)
            data_at = start
        else:
            if pos + 4 > end:
                raise _truncated(index, "template_data_len", pos, 4, end - pos)
            (dlen,) = unpack(data, pos)
            if dlen > limits.max_template_data:
                raise ParseError(
                    _where(index), "template_data_len", pos,
                    f"{dlen} exceeds the {limits.max_template_data}-byte limit",
                )  # fmt: skip
            pos += 4
            if pos + dlen > end:
                raise _truncated(index, "template_data", pos, dlen, end - pos)
            template_data = data[pos : pos + dlen]
            data_at = pos
            fields = _split_fields(template_data, name, index, pos)
            pos += dlen
        entry = _entry(index, start, pcr, th, self.algo, name, template_data, fields, data_at,
                       th == self.zero, self.hasher)  # fmt: skip
        return entry, pos


class ImaList(Sequence[ImaEntry]):
    """The entries of a binary list, checked, most of them kept as bytes.

    What :func:`parse_binary` returns: a sequence of :class:`ImaEntry` with
    the guarantees of :func:`parse_list` (every entry well formed, its
    template hash checked). An entry the C walk accepted is made when it is
    read, by the plain reader (so it is exactly what that reader gives);
    ``advance`` and ``appraise_entries`` read the bytes directly
    (:meth:`extend_pcr10`, :meth:`unmatched`) and make only the entries that
    need the full rules. Slicing gives an ImaList over the same bytes.
    """

    __slots__ = ("_algo", "_data", "_extra", "_first", "_hi", "_lo", "_reader", "_side", "_spans")

    def __init__(
        self,
        data: bytes,
        side: bytes,
        spans: bytes,
        extra: dict[int, ImaEntry],
        first: int,
        algo: str,
        reader: _Reader,
        lo: int = 0,
        hi: int | None = None,
    ) -> None:
        self._data = data
        self._side = side
        self._spans = spans
        self._extra = extra  # by position in the input: the entries the plain reader made
        self._first = first  # the list index of position 0
        self._algo = algo
        self._reader = reader
        self._lo = lo
        self._hi = len(spans) // _SPAN_BYTES if hi is None else hi

    @property
    def template_hash_algo(self) -> str:
        return self._algo

    def __len__(self) -> int:
        return self._hi - self._lo

    @overload
    def __getitem__(self, i: int) -> ImaEntry: ...
    @overload
    def __getitem__(self, i: slice) -> ImaList: ...
    def __getitem__(self, i: int | slice) -> ImaEntry | ImaList:
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                raise ValueError("an ImaList slice has step 1")
            return ImaList(
                self._data, self._side, self._spans, self._extra, self._first, self._algo,
                self._reader, self._lo + lo, self._lo + max(lo, hi),
            )  # fmt: skip
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("ImaList index out of range")
        at = self._lo + i
        entry = self._extra.get(at)
        if entry is None:
            offset = _SPAN.unpack_from(self._spans, at * _SPAN_BYTES)[0]
            entry, _ = self._reader.read(self._data, offset, self._first + at, 0)
        return entry

    def __iter__(self) -> Iterator[ImaEntry]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ImaList | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<ImaList of {len(self)} entries from index {self._first + self._lo}>"

    def extend_pcr10(
        self,
        banks: Sequence[str],
        padded: bool,
        start: Sequence[bytes],
        targets: Sequence[bytes],
    ) -> tuple[int | None, tuple[bytes, ...]]:
        """Extend ``start`` (PCR 10 per bank) entry by entry, the kernel's way (per-bank
        template digests, or the SHA-1 one zero-padded), until every bank equals
        ``targets``: (how many entries that took, or None; the values there or at the end).
        Banks are hashlib names of the SHA family."""
        reuse = tuple(self._algo == ("sha1" if padded else b) for b in banks)
        proven, values = _native.extend_entries(
            self._data, self._side, self._spans, self._lo, self._hi, _HSIZE[self._algo],
            padded, tuple(banks), reuse, tuple(start), tuple(targets),
        )  # fmt: skip
        return (None if proven < 0 else proven), values

    def unmatched(self, eligible: bytes, keys: AbstractSet[bytes]) -> list[int]:
        """Positions (in this slice) of the entries the policy's fast lookup does not pass:
        not PCR 10, a violation, read by the plain reader, a template whose byte in
        ``eligible`` (by :data:`WALKED_TEMPLATES` position) is 0, or 2 with a signature,
        or a (d-ng, n-ng) head whose bytes are not in ``keys``."""
        if not isinstance(keys, set | frozenset):
            raise TypeError("keys must be a set or frozenset of bytes")
        out = _native.unmatched_entries(
            self._data, self._spans, self._lo, self._hi, 10, eligible, keys
        )
        return [i - self._lo for i in out]


def parse_ascii(
    data: bytes,
    *,
    offset_index: int = 0,
    limits: ImaLimits = DEFAULT_IMA_LIMITS,
    template_hash_algo: str | None = None,
) -> tuple[ImaEntry, ...]:
    """The ASCII form (``ascii_runtime_measurements``): the fields are read back into the
    bytes the kernel hashed, so the template hash is checked as for the binary form."""
    out: list[ImaEntry] = []
    pos = 0
    end = len(data)
    algo: str | None = canonical_algorithm(template_hash_algo) if template_hash_algo else None
    hasher: Callable[[bytes], bytes] | None = None
    names: dict[bytes, str] = {}  # each distinct template name is checked once
    while pos < end:
        index = offset_index + len(out)
        if len(out) >= limits.max_entries:
            raise ParseError(
                _where(index), "entry", pos, f"more than the {limits.max_entries}-entry limit"
            )
        nl = data.find(b"\n", pos)
        line_end = end if nl < 0 else nl
        line = data[pos:line_end]
        start = pos
        pos = line_end + 1
        if len(line) > 2 * limits.max_template_data + 256:
            raise ParseError(
                _where(index), "line", start,
                f"line of {len(line)} bytes exceeds the template-data limit",
            )  # fmt: skip
        lead = 1 if line[:1] == b" " else 0  # "%2d " pads PCRs below 10
        tokens = line[lead:].split(b" ", 3)
        if len(tokens) < 4:
            what = "empty line" if not line else f"{len(tokens)} of 4 columns"
            raise ParseError(_where(index), "line", start, f"{what} (pcr, hash, template, data)")
        pcr_text, th_hex, name_raw, rest = tokens
        offsets = _token_offsets(start + lead, tokens)
        if not pcr_text.isdigit() or int(pcr_text) >= MAX_PCRS:
            raise ParseError(_where(index), "pcr", start, f"not a PCR number: {pcr_text[:16]!r}")
        th = _unhex(th_hex, index, "template_hash", offsets[1])
        if algo is None:
            algo = _HASH_BY_SIZE.get(len(th))
            if algo is None:
                raise ParseError(
                    _where(index), "template_hash", offsets[1],
                    f"{len(th)}-byte hash: which algorithm? (give template_hash_algo)",
                )  # fmt: skip
        if hasher is None:
            hasher = template_hash_algorithm(algo)
        if len(th) != ALGO_SIZES.get(algo):
            raise ParseError(
                _where(index), "template_hash", offsets[1],
                f"{len(th)} bytes, expected {ALGO_SIZES.get(algo)} ({algo})",
            )  # fmt: skip
        name = names.get(name_raw) or names.setdefault(
            name_raw, _template_name(name_raw, index, offsets[2])
        )
        fmt = _format_of(name)
        if fmt is None:
            raise ParseError(
                _where(index), "template_name", offsets[2],
                f"unknown template {name!r}: its fields cannot be read back from ASCII",
            )  # fmt: skip
        values = rest.split(b" ", len(fmt) - 1)
        if len(values) != len(fmt):
            raise ParseError(
                _where(index), "template_data", offsets[3],
                f"{len(values)} fields, template {name!r} has {len(fmt)}",
            )  # fmt: skip
        value_at = _token_offsets(offsets[3], values)
        fields = tuple(
            (fid, _ascii_field(fid, value, index, at))
            for fid, value, at in zip(fmt, values, value_at, strict=True)
        )
        if name == "ima":
            digest, name_field = fields[0][1], fields[1][1]
            if len(digest) != 20 or len(name_field) - 1 > IMA_NAME_MAX:
                raise ParseError(
                    _where(index), "template_data", offsets[3],
                    "the ima template holds a 20-byte digest and a name of at most 255 bytes",
                )  # fmt: skip
            template_data = _ima_hash_input(digest, name_field[:-1])
        else:
            template_data = b"".join(_U32.pack(len(v)) + v for _, v in fields)
            if len(template_data) > limits.max_template_data:
                raise ParseError(
                    _where(index), "template_data", offsets[3],
                    f"{len(template_data)} bytes exceeds the {limits.max_template_data}-byte limit",
                )  # fmt: skip
        out.append(
            _entry(index, start, int(pcr_text), th, algo, name, template_data, fields,
                   offsets[3], not any(th), hasher)
        )  # fmt: skip
    return tuple(out)


# -- pieces ----------------------------------------------------------------------------


def _truncated(index: int, field: str, offset: int, need: int, left: int) -> ParseError:
    return ParseError(
        _where(index), field, offset, f"truncated: need {need} bytes, only {left} left"
    )


def _template_name(raw: bytes, index: int, offset: int) -> str:
    if not raw or not all(0x21 <= b < 0x7F for b in raw):
        raise ParseError(
            _where(index), "template_name", offset, f"not a template name: {raw[:32]!r}"
        )
    return raw.decode("ascii")


def _format_of(name: str) -> tuple[str, ...] | None:
    fmt = TEMPLATE_FORMATS.get(name)
    if fmt is not None:
        return fmt
    parts = tuple(name.split("|"))  # ima_fs.c: a custom template is listed by its fmt
    if len(parts) <= MAX_FIELDS and all(p in FIELD_IDS for p in parts):
        return parts
    return None


def _ima_hash_input(digest: bytes, name: bytes) -> bytes:
    """ima_calc_field_array_hash for the ``ima`` template: the digest, then the name in a
    zeroed buffer of IMA_EVENT_NAME_LEN_MAX + 1 bytes, no lengths."""
    return digest + name + bytes(IMA_NAME_MAX + 1 - len(name))


def _split_fields(
    template_data: bytes, name: str, index: int, base: int
) -> tuple[tuple[str, bytes], ...]:
    fmt = _format_of(name)
    out: list[tuple[str, bytes]] = []
    p = 0
    n = len(template_data)
    unpack = _U32.unpack_from
    if fmt is not None:  # a known layout (at most MAX_FIELDS, _format_of checks): the hot path
        for fid in fmt:
            if p + 4 > n:
                raise _truncated(index, f"{fid}.len", base + p, 4, n - p)
            (flen,) = unpack(template_data, p)
            p += 4
            q = p + flen
            if q > n:
                raise ParseError(
                    _where(index), fid, base + p,
                    f"field of {flen} bytes runs past the template data ({n - p} left)",
                )  # fmt: skip
            out.append((fid, template_data[p:q]))
            p = q
    count = len(out)
    while fmt is None and p < n:  # an opaque template: fields as far as they go
        fid = "?"
        if count >= MAX_FIELDS:
            raise ParseError(
                _where(index), "template_data", base + p, f"more than {MAX_FIELDS} fields"
            )
        if p + 4 > n:
            raise _truncated(index, f"{fid}.len", base + p, 4, n - p)
        (flen,) = unpack(template_data, p)
        p += 4
        if p + flen > n:
            raise ParseError(
                _where(index), fid, base + p,
                f"field of {flen} bytes runs past the template data ({n - p} left)",
            )  # fmt: skip
        out.append((fid, template_data[p : p + flen]))
        p += flen
        count += 1
    if p != n:
        raise ParseError(
            _where(index), "template_data", base + p,
            f"{n - p} bytes after the {len(out)} fields of template {name!r}",
        )  # fmt: skip
    return tuple(out)


def _digest_field(fid: str, data: bytes, index: int, offset: int) -> tuple[str, bytes, str | None]:
    """(algorithm, digest, digest type) of a d / d-ng / d-ngv2 / d-modsig field."""
    if fid == "d-ng":
        cut = data.find(b":\0")
        known = _DNG_PREFIXES.get(data[:cut]) if cut > 0 else None
        if known is not None and len(data) == cut + 2 + known[1]:
            return known[0], data[cut + 2 :], None
    if fid != "d":
        cut = data.find(b":\0")
        if cut > 0 and cut < 40:
            prefix = data[:cut].decode("ascii", "replace")
            digest = data[cut + 2 :]
            dtype: str | None = None
            if fid == "d-ngv2":
                dtype, _, prefix = prefix.partition(":")
                if dtype not in _DIGEST_TYPES:
                    raise ParseError(_where(index), fid, offset, f"unknown digest type {dtype!r}")
            algo = canonical_algorithm(prefix)
            size = ALGO_SIZES.get(algo)
            if size is None:
                raise ParseError(_where(index), fid, offset, f"unknown hash algorithm {prefix!r}")
            if len(digest) != size:
                raise ParseError(
                    _where(index), fid, offset,
                    f"{algo} digest of {len(digest)} bytes, expected {size}",
                )  # fmt: skip
            return algo, digest, dtype
        if fid == "d-ngv2":
            raise ParseError(_where(index), fid, offset, "no 'type:algorithm:' prefix")
    # DATA_FMT_DIGEST: SHA-1 (or MD5) without a prefix
    if len(data) == 20:
        return "sha1", data, None
    if len(data) == 16:
        return "md5", data, None
    raise ParseError(
        _where(index), fid, offset, f"digest of {len(data)} bytes without an algorithm prefix"
    )


def _name_field(fid: str, data: bytes, index: int, offset: int) -> str:
    if data.find(b"\0") != len(data) - 1:
        raise ParseError(_where(index), fid, offset, "name is not one NUL-terminated string")
    return data[:-1].decode("utf-8", "surrogateescape")


def _entry(
    index: int,
    start: int,
    pcr: int,
    th: bytes,
    algo: str,
    name: str,
    template_data: bytes,
    fields: tuple[tuple[str, bytes], ...],
    data_at: int,
    violation: bool,
    hasher: Callable[[bytes], bytes],
) -> ImaEntry:
    digest_algo, digest, dtype, path = "", b"", None, ""
    signature = buf = None
    rest = fields
    if len(fields) >= 2 and fields[0][0] == "d-ng" and fields[1][0] == "n-ng":
        # ima-ng, ima-sig, ima-buf, ima-modsig: the common head, read without the search
        digest_algo, digest, dtype = _digest_field("d-ng", fields[0][1], index, data_at)
        path = _name_field("n-ng", fields[1][1], index, data_at)
        rest = fields[2:]
    for fid, value in rest:
        if fid in DIGEST_FIELDS and not digest_algo:
            digest_algo, digest, dtype = _digest_field(fid, value, index, data_at)
        elif fid in NAME_FIELDS and not path:
            path = _name_field(fid, value, index, data_at)
        elif fid == "sig":
            signature = value
        elif fid == "buf":
            buf = value
        elif fid == "d-modsig" and value:
            _digest_field(fid, value, index, data_at)
        elif fid in UINT_SIZES and value and len(value) not in (2, 4, 8):
            raise ParseError(_where(index), fid, data_at, f"integer of {len(value)} bytes")
    if not violation:
        actual = hasher(template_data)
        if not hmac.compare_digest(actual, th):
            raise VerificationError(
                "ima.template_hash",
                f"entry {index} at byte {start} ({name} {path[:120]!r}): template hash "
                f"{th.hex()} is not the {algo} of its data ({actual.hex()}): a forged entry",
            )
    # positional, in ImaEntry's field order (keywords cost a third of the time here)
    return ImaEntry(
        index, start, pcr, th, algo, name, template_data, fields, digest_algo, digest, path,
        signature, buf, dtype, violation,
    )  # fmt: skip


def _token_offsets(base: int, tokens: list[bytes]) -> list[int]:
    out = []
    at = base
    for token in tokens:
        out.append(at)
        at += len(token) + 1
    return out


def _unhex(text: bytes, index: int, field: str, offset: int) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ParseError(_where(index), field, offset, f"not hex: {text[:40]!r}") from None


def _ascii_field(fid: str, value: bytes, index: int, offset: int) -> bytes:
    """One ASCII field back into the bytes the kernel stored (ima_template_lib.c show)."""
    if fid in ("d-ng", "d-ngv2", "d-modsig"):
        if not value:
            return b""
        prefix, colon, hexpart = value.rpartition(b":")
        raw = _unhex(hexpart, index, fid, offset)
        return prefix + b":\0" + raw if colon else raw
    if fid == "d":
        return _unhex(value, index, fid, offset)
    if fid in STRING_FIELDS:
        if b"\0" in value:
            raise ParseError(_where(index), fid, offset, "NUL in a name")
        return value + b"\0" if (value or fid != "xattrnames") else b""
    if fid in UINT_SIZES:
        if not value:
            return b""
        if not value.isdigit() or len(value) > 20:
            raise ParseError(_where(index), fid, offset, f"not a number: {value[:24]!r}")
        number = int(value)
        size = UINT_SIZES[fid]
        if number >= 1 << (8 * size):
            raise ParseError(_where(index), fid, offset, f"{number} does not fit {size} bytes")
        return number.to_bytes(size, "little")
    return _unhex(value, index, fid, offset)  # sig, buf, modsig, evmsig, xattr lengths/values
