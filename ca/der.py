"""Minimal DER (ITU-T X.690) helpers to replace a signature in a signed structure.

X.509 certificates (RFC 5280 section 4.1), CRLs (section 5.1) and OCSP
BasicOCSPResponses (RFC 6960 section 4.2.1) all have the shape
``SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING, ... }``. The CA
builds them with a stand-in key (see :mod:`ca.keys`) and swaps in the real
signature here. Input is always DER we just produced ourselves.
"""

from __future__ import annotations

__all__ = [
    "decode_oid",
    "encode_integer",
    "encode_oid",
    "encode_tlv",
    "read_tlv",
    "replace_signature",
    "tbs_of",
]


def read_tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """Returns (tag, start of content, end of element) of the element at ``offset``."""
    tag = data[offset]
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("DER element runs past the end")
    return tag, pos, end


def encode_tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def replace_signature(signed: bytes, signature: bytes) -> tuple[bytes, bytes]:
    """Swap the BIT STRING signature of a signed SEQUENCE; returns (new DER, tbs DER)."""
    _, content, end = read_tlv(signed, 0)
    _, _, tbs_end = read_tlv(signed, content)
    _, _, alg_end = read_tlv(signed, tbs_end)
    tag, _, sig_end = read_tlv(signed, alg_end)
    if tag != 0x03:
        raise ValueError("third element is not a BIT STRING")
    body = signed[content:alg_end] + encode_tlv(0x03, b"\x00" + signature) + signed[sig_end:end]
    return encode_tlv(0x30, body), signed[content:tbs_end]


def tbs_of(signed: bytes) -> bytes:
    _, content, _ = read_tlv(signed, 0)
    _, _, tbs_end = read_tlv(signed, content)
    return signed[content:tbs_end]


def encode_oid(dotted: str) -> bytes:
    """OBJECT IDENTIFIER (X.690 8.19): the first two arcs as 40 * a + b, each arc in
    base-128 with the high bit set on all but its last byte."""
    try:
        arcs = [int(a) for a in dotted.split(".")]
    except ValueError:
        arcs = []
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39) or min(arcs) < 0:
        raise ValueError(f"not an OID: {dotted!r}")
    body = bytearray()
    for arc in (40 * arcs[0] + arcs[1], *arcs[2:]):
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return encode_tlv(0x06, bytes(body))


def decode_oid(der: bytes) -> str:
    """The dotted form of a DER OBJECT IDENTIFIER (the whole TLV)."""
    tag, start, end = read_tlv(der, 0)
    if tag != 0x06 or end != len(der) or start == end or der[end - 1] & 0x80:
        raise ValueError("not a DER OBJECT IDENTIFIER")
    arcs, value = [], 0
    for byte in der[start:end]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, (first, arcs[0] - 40 * first, *arcs[1:])))


def encode_integer(value: int) -> bytes:
    """INTEGER (X.690 8.3): minimal two's complement."""
    size = (value + (value < 0)).bit_length() // 8 + 1
    return encode_tlv(0x02, value.to_bytes(size, "big", signed=True))
