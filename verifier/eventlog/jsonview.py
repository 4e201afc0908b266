"""JSON-ready and one-line text views of events and their decoded data.

Used by ``vtpm eventlog show`` and by anything that reports events (HTTP
appraisal reports). Bytes become lower-case hex; decoded values become
objects with a ``structure`` naming their type; raw copies of structures are left
out (the event's own data is there as ``data``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from verifier.eventlog.algorithms import HashAlgorithm
from verifier.eventlog.decode import (
    Decoded,
    FirmwareBlob,
    GptEvent,
    HandoffTables,
    ImageLoad,
    IplString,
    NoActionEvent,
    Separator,
    TaggedEvent,
    Text,
)
from verifier.eventlog.devicepath import DevicePath, DevicePathNode
from verifier.eventlog.efivars import (
    BootOrder,
    EfiBoolean,
    EfiVariable,
    LoadOption,
    SignatureData,
    SignatureDatabase,
    SignatureList,
)
from verifier.eventlog.parse import SpecIdEvent, StartupLocality

__all__ = ["decoded_summary", "to_jsonable"]

_SKIP = frozenset({"raw"})


def to_jsonable(value: object) -> Any:
    """Turn decoded event data (frozen dataclasses, bytes, tuples) into JSON values."""
    if value is None or isinstance(value, bool | int | str | float):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, HashAlgorithm):
        return {"name": value.name, "alg_id": value.alg_id, "digest_size": value.digest_size}
    if isinstance(value, DevicePath):
        return {"text": value.text, "nodes": [to_jsonable(n) for n in value.nodes]}
    if isinstance(value, DevicePathNode):  # its text is a property, rendered on access
        return {
            "structure": "DevicePathNode",
            "type": value.type,
            "subtype": value.subtype,
            "data": value.data.hex(),
            "text": value.text,
        }
    if isinstance(value, SignatureList):  # its entries are split on access
        return {
            "structure": "SignatureList",
            "signature_type": value.signature_type,
            "type_name": value.type_name,
            "header": value.header.hex(),
            "signatures": [to_jsonable(s) for s in value.signatures],
        }
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {"structure": type(value).__name__}
        for f in dataclasses.fields(value):
            if f.name not in _SKIP:
                out[f.name] = to_jsonable(getattr(value, f.name))
        return out
    return repr(value)


def decoded_summary(decoded: Decoded | None, limit: int = 110) -> str:
    """A one-line human summary of decoded data (for the timeline view)."""
    text = ""
    if decoded is None:
        text = ""
    elif isinstance(decoded, SpecIdEvent):
        algs = ", ".join(a.name for a in decoded.algorithms)
        text = (
            f"{decoded.signature}: platform class {decoded.platform_class}, spec "
            f"{decoded.spec_version_major}.{decoded.spec_version_minor} errata "
            f"{decoded.spec_errata}, banks {algs}"
        )
    elif isinstance(decoded, StartupLocality):
        text = f"StartupLocality {decoded.locality}"
    elif isinstance(decoded, NoActionEvent):
        text = f"{decoded.signature!r} ({len(decoded.body)} bytes)"
    elif isinstance(decoded, Text):
        text = repr(decoded.text)
    elif isinstance(decoded, IplString):
        text = f"{decoded.kind}: {decoded.value!r}"
    elif isinstance(decoded, Separator):
        text = "ERROR (0x00000001)" if decoded.is_error else f"0x{decoded.value:08x}"
    elif isinstance(decoded, TaggedEvent):
        text = f"tag 0x{decoded.tag_id:08x} {decoded.tag_name or ''} ({len(decoded.data)} bytes)"
    elif isinstance(decoded, FirmwareBlob):
        prefix = f"{decoded.description} " if decoded.description else ""
        text = f"{prefix}blob at 0x{decoded.base:x}, 0x{decoded.length:x} bytes"
    elif isinstance(decoded, HandoffTables):
        text = ", ".join(t.vendor_name or t.vendor_guid for t in decoded.tables)
    elif isinstance(decoded, ImageLoad):
        text = f"image 0x{decoded.length:x} bytes from {decoded.path_text or '(no device path)'}"
    elif isinstance(decoded, GptEvent):
        names = ", ".join(p.name or p.type_guid for p in decoded.partitions)
        text = f"GPT disk {decoded.disk_guid}: {names}"
    elif isinstance(decoded, EfiVariable):
        text = f"{decoded.name} = {_value_summary(decoded)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _value_summary(var: EfiVariable) -> str:
    value = var.value
    if isinstance(value, EfiBoolean):
        return "(empty)" if value.value is None else str(value.value)
    if isinstance(value, BootOrder):
        return ",".join(value.names)
    if isinstance(value, LoadOption):
        return f"{value.description!r} {value.device_path.text}"
    if isinstance(value, SignatureDatabase):
        if not value.lists:
            return "(empty)"
        count = sum(sl.count for sl in value.lists)
        kinds = sorted({sl.type_name or sl.signature_type for sl in value.lists})
        return f"{count} signature(s) in {len(value.lists)} list(s) {', '.join(kinds)}"
    if isinstance(value, SignatureData):
        return f"signature data ({len(value.data)} bytes, owner {value.owner})"
    return f"{len(var.data)} bytes"
