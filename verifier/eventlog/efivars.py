"""UEFI variables as measured into the event log.

- UEFI_VARIABLE_DATA: TCG PFP v1.05 §10.4.4 (VariableName GUID,
  UnicodeNameLength u64, VariableDataLength u64, UnicodeName CHAR16[],
  VariableData).
- EFI_SIGNATURE_LIST / EFI_SIGNATURE_DATA (PK, KEK, db, dbx, MokList...):
  UEFI Specification 2.10 §32.4.1.
- EFI_LOAD_OPTION (Boot####) and BootOrder: UEFI Specification 2.10 §3.1.3.
- SecureBoot, SetupMode, AuditMode, DeployedMode: one-byte booleans (§3.3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from verifier.eventlog._reader import Reader
from verifier.eventlog.devicepath import DevicePath, device_path_ok
from verifier.eventlog.guids import format_guid, guid_name
from vtpm_core.errors import ParseError

__all__ = [
    "BootOrder",
    "EfiBoolean",
    "EfiVariable",
    "LoadOption",
    "SignatureData",
    "SignatureDatabase",
    "SignatureList",
    "VariableValue",
    "variable_frame",
    "variable_name",
]

SIGNATURE_DATABASES = frozenset(
    {"PK", "KEK", "db", "dbx", "dbt", "dbr", "MokList", "MokListX", "PKDefault", "KEKDefault"}
)
BOOLEANS = frozenset(
    {"SecureBoot", "SetupMode", "AuditMode", "DeployedMode", "MokSBState", "MokListTrusted"}
)


@dataclass(frozen=True, slots=True)
class SignatureData:
    """EFI_SIGNATURE_DATA: owner GUID (None when the data carried none) and the data."""

    owner: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class SignatureList:
    """EFI_SIGNATURE_LIST: the signature type (GUID and its name) and its entries.

    ``entries`` holds the EFI_SIGNATURE_DATA array as measured: a whole number
    of ``signature_size``-byte entries (checked when parsed). The entries are
    split out on access (``signatures``, ``entry_data``), not when the log is
    decoded: a dbx carries hundreds that most appraisals only count.
    """

    signature_type: str
    type_name: str | None
    header: bytes
    signature_size: int
    entries: bytes

    @property
    def count(self) -> int:
        return len(self.entries) // self.signature_size

    @property
    def signatures(self) -> tuple[SignatureData, ...]:
        """Each EFI_SIGNATURE_DATA: its owner GUID and its data."""
        e, size = self.entries, self.signature_size
        return tuple(
            SignatureData(format_guid(e[i : i + 16]), e[i + 16 : i + size])
            for i in range(0, len(e), size)
        )

    def entry_data(self) -> tuple[bytes, ...]:
        """Each entry's SignatureData (without its owner GUID)."""
        e, size = self.entries, self.signature_size
        return tuple(e[i + 16 : i + size] for i in range(0, len(e), size))


@dataclass(frozen=True, slots=True)
class SignatureDatabase:
    """The content of PK / KEK / db / dbx / MokList: zero or more signature lists."""

    lists: tuple[SignatureList, ...]

    @classmethod
    def parse(cls, data: bytes, *, base: int = 0) -> SignatureDatabase:
        lists: list[SignatureList] = []
        pos, end = 0, len(data)
        while pos < end:
            if pos + 28 <= end:
                raw_type, list_size, header_size, sig_size = _LIST_HEADER.unpack_from(data, pos)
                body = list_size - 28 - header_size
                stop = pos + list_size
                if body >= 0 and sig_size >= 16 and not body % sig_size and stop <= end:
                    sig_type = format_guid(raw_type)
                    start = stop - body  # (list_size >= 28 + header_size: body >= 0)
                    lists.append(
                        SignatureList(
                            sig_type,
                            guid_name(sig_type),
                            data[pos + 28 : start],
                            sig_size,
                            data[start:stop],
                        )
                    )
                    pos = stop
                    continue
            r = Reader(data, "EFI_SIGNATURE_LIST", base=base, start=pos)
            lists.append(_signature_list(r))  # raises, saying which field and where
            pos = r.pos
        return cls(tuple(lists))


_LIST_HEADER = struct.Struct("<16sIII")


def _signature_list(r: Reader) -> SignatureList:
    """One EFI_SIGNATURE_LIST, field by field (the error names the bad one)."""
    at = r.offset
    sig_type = format_guid(r.take(16, "SignatureType"))
    list_size = r.u32("SignatureListSize")
    header_size = r.u32("SignatureHeaderSize")
    sig_size = r.u32("SignatureSize")
    body = list_size - 28 - header_size
    if list_size < 28 or body < 0:
        raise r.error("SignatureListSize", f"{list_size} is too small", at=at + 16)
    if sig_size < 16:
        raise r.error("SignatureSize", f"{sig_size} is below the 16-byte owner GUID")
    if body % sig_size:
        raise r.error(
            "SignatureSize",
            f"{body} bytes of signatures are not a multiple of {sig_size}",
            at=at + 24,
        )
    if body > r.remaining:
        raise r.error("SignatureListSize", f"list of {list_size} bytes runs past the data")
    header = r.take(header_size, "SignatureHeader")
    # body is a whole number of sig_size (>= 16) entries inside the data
    # (checked above): SignatureList splits them when asked
    entries = r.take(body, "Signatures")
    return SignatureList(sig_type, guid_name(sig_type), header, sig_size, entries)


@dataclass(frozen=True, slots=True)
class LoadOption:
    """EFI_LOAD_OPTION (a Boot#### variable)."""

    attributes: int
    description: str
    device_path: DevicePath
    optional_data: bytes

    @property
    def active(self) -> bool:
        return bool(self.attributes & 0x1)  # LOAD_OPTION_ACTIVE

    @classmethod
    def parse(cls, data: bytes, *, base: int = 0, max_nodes: int = 256) -> LoadOption:
        r = Reader(data, "EFI_LOAD_OPTION", base=base)
        attributes = r.u32("Attributes")
        path_len = r.u16("FilePathListLength")
        description = r.char16z("Description").decode("utf-16-le", errors="replace")
        path_at = r.offset
        path = DevicePath.parse(r.take(path_len, "FilePathList"), base=path_at, max_nodes=max_nodes)
        return cls(attributes, description, path, r.rest())


@dataclass(frozen=True, slots=True)
class BootOrder:
    """BootOrder: the Boot#### numbers in boot order."""

    entries: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"Boot{n:04X}" for n in self.entries)


@dataclass(frozen=True, slots=True)
class EfiBoolean:
    """A one-byte boolean variable (SecureBoot...): None when the variable was empty."""

    value: int | None

    @property
    def enabled(self) -> bool:
        return self.value == 1


VariableValue = SignatureDatabase | SignatureData | LoadOption | BootOrder | EfiBoolean


@dataclass(frozen=True, slots=True)
class EfiVariable:
    """UEFI_VARIABLE_DATA with the variable's content decoded where we know it.

    ``trailing`` holds bytes after VariableData that the structure does not
    account for (old shim appends one); ``value`` is None for variables we do
    not decode (their raw content is ``data``).
    """

    variable_guid: str
    name: str
    data: bytes
    value: VariableValue | None
    trailing: bytes
    raw: bytes

    @property
    def vendor(self) -> str | None:
        return guid_name(self.variable_guid)

    @property
    def covered_bytes(self) -> bytes:
        """The UEFI_VARIABLE_DATA structure without any trailing bytes."""
        return self.raw[: len(self.raw) - len(self.trailing)]

    @classmethod
    def parse(
        cls, raw: bytes, *, base: int = 0, authority: bool = False, max_nodes: int = 256
    ) -> EfiVariable:
        size = len(raw)
        if size >= 32:
            guid_raw, name_len, data_len = _VARIABLE_HEADER.unpack_from(raw)
            data_at = 32 + 2 * name_len
            if name_len <= (size - 32) // 2 and data_at + data_len <= size:
                name = raw[32:data_at].decode("utf-16-le", errors="replace").rstrip("\x00")
                data = raw[data_at : data_at + data_len]
                value = _decode_value(name, data, base + data_at, authority, max_nodes)
                return cls(format_guid(guid_raw), name, data, value, raw[data_at + data_len :], raw)
        # short or inconsistent: read it field by field to say which field and where
        r = Reader(raw, "UEFI_VARIABLE_DATA", base=base)
        guid = format_guid(r.take(16, "VariableName"))
        name_len = r.u64("UnicodeNameLength")
        data_len = r.u64("VariableDataLength")
        if name_len > r.remaining // 2:
            raise r.error("UnicodeNameLength", f"{name_len} characters run past the event data")
        name_bytes = r.take(2 * name_len, "UnicodeName")
        name = name_bytes.decode("utf-16-le", errors="replace").rstrip("\x00")
        data_at = r.offset
        data = r.take(data_len, "VariableData")
        trailing = r.rest()
        value = _decode_value(name, data, data_at, authority, max_nodes)
        return cls(guid, name, data, value, trailing, raw)


_VARIABLE_HEADER = struct.Struct("<16sQQ")


def _decode_value(
    name: str, data: bytes, base: int, authority: bool, max_nodes: int
) -> VariableValue | None:
    if authority:
        # EV_EFI_VARIABLE_AUTHORITY: VariableData is one EFI_SIGNATURE_DATA (the
        # db entry that authorised an image); shim logs a bare certificate.
        if len(data) > 16 and data[16] == 0x30:
            return SignatureData(format_guid(data[:16]), data[16:])
        if data[:1] == b"\x30":
            return SignatureData(None, data)
        return None
    if name in SIGNATURE_DATABASES:
        return SignatureDatabase.parse(data, base=base)
    if name in BOOLEANS:
        if len(data) > 1:
            raise ParseError(
                "UEFI_VARIABLE_DATA",
                "VariableData",
                base,
                f"{name} is {len(data)} bytes, expected 1",
            )
        return EfiBoolean(data[0] if data else None)
    if name == "BootOrder":
        if len(data) % 2:
            raise ParseError(
                "UEFI_VARIABLE_DATA", "VariableData", base, "BootOrder has an odd length"
            )
        return BootOrder(
            tuple(int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2))
        )
    if len(name) == 8 and name.startswith(("Boot", "Driver", "SysPrep")) and _is_hex(name[-4:]):
        return LoadOption.parse(data, base=base, max_nodes=max_nodes)
    return None


def _is_hex(text: str) -> bool:
    return all(c in "0123456789ABCDEFabcdef" for c in text)


# --- the appraisal path's check: what parse() would say, without building anything ------


def variable_frame(
    raw: bytes, *, authority: bool = False, max_nodes: int = 256
) -> tuple[int, int] | None:
    """Where VariableData lies in ``raw`` (start, end) when ``EfiVariable.parse`` with
    these arguments returns; None when it would raise (or might: the caller then
    parses, which says why). Builds no object: a verifier that only checks the digest
    parses the variable when a rule reads it.
    """
    size = len(raw)
    if size < 32:
        return None
    _, name_len, data_len = _VARIABLE_HEADER.unpack_from(raw)
    data_at = 32 + 2 * name_len
    data_end = data_at + data_len
    if name_len > (size - 32) // 2 or data_end > size:
        return None  # (parse's header check, the fast path's and the field reader's)
    if authority:
        return data_at, data_end  # _decode_value never raises for an authority
    name = raw[32:data_at].decode("utf-16-le", errors="replace").rstrip("\x00")
    if name in SIGNATURE_DATABASES:
        ok = _signature_database_ok(raw, data_at, data_end)
    elif name in BOOLEANS:
        ok = data_len <= 1
    elif name == "BootOrder":
        ok = not data_len % 2
    elif len(name) == 8 and name.startswith(("Boot", "Driver", "SysPrep")) and _is_hex(name[-4:]):
        ok = _load_option_ok(raw[data_at:data_end], max_nodes)
    else:
        ok = True  # not decoded
    return (data_at, data_end) if ok else None


def variable_name(raw: bytes) -> str | None:
    """The ``name`` of the EfiVariable that ``raw`` parses to (None if its header does
    not parse), without parsing the rest (for rules that look for one variable)."""
    size = len(raw)
    if size < 32:
        return None
    _, name_len, data_len = _VARIABLE_HEADER.unpack_from(raw)
    data_at = 32 + 2 * name_len
    if name_len > (size - 32) // 2 or data_at + data_len > size:
        return None
    return raw[32:data_at].decode("utf-16-le", errors="replace").rstrip("\x00")


def _signature_database_ok(raw: bytes, pos: int, end: int) -> bool:
    """SignatureDatabase.parse(raw[pos:end]) returns: every list passes its fast-path
    test (a list that fails it is one the field-by-field reader rejects)."""
    unpack = _LIST_HEADER.unpack_from
    while pos < end:
        if pos + 28 > end:
            return False
        _, list_size, header_size, sig_size = unpack(raw, pos)
        body = list_size - 28 - header_size
        stop = pos + list_size
        if body < 0 or sig_size < 16 or body % sig_size or stop > end:
            return False
        pos = stop
    return True


def _load_option_ok(data: bytes, max_nodes: int) -> bool:
    """LoadOption.parse(data) returns: Attributes, FilePathListLength, a NUL-terminated
    Description, then a FilePathList that fits and whose nodes are well formed."""
    if len(data) < 6:
        return False
    path_len = int.from_bytes(data[4:6], "little")
    at = data.find(b"\x00\x00", 6)
    while at >= 0 and (at - 6) % 2:
        at = data.find(b"\x00\x00", at + 1)
    if at < 0:
        return False
    start = at + 2
    if start + path_len > len(data):
        return False
    return device_path_ok(data[start : start + path_len], max_nodes)
