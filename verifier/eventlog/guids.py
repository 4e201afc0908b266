"""EFI_GUID formatting and the well-known GUIDs that appear in event logs.

UEFI Specification 2.10: EFI_GUID is {u32, u16, u16, u8[8]} little-endian for
the first three fields (Appendix A); EFI_GLOBAL_VARIABLE (§3.3),
EFI_IMAGE_SECURITY_DATABASE_GUID (§32.6.1), EFI_CERT_*_GUID (§32.4.1); shim's
SHIM_LOCK_GUID (MokList, MokListX, MokSBState, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

__all__ = ["GUID_NAMES", "format_guid", "guid_name"]


def format_guid(raw: bytes) -> str:
    """Canonical lower-case text form of a 16-byte EFI_GUID.

    The first three fields are little-endian (byte-reversed in the text), the
    last eight bytes are in order (as ``str(uuid.UUID(bytes_le=raw))``, without
    building a UUID). Memoised: logs repeat a few GUIDs (owners, signature
    types) hundreds of times.
    """
    return _format_guid(bytes(raw))


@lru_cache(maxsize=4096)
def _format_guid(raw: bytes) -> str:
    if len(raw) != 16:
        raise ValueError(f"an EFI_GUID is 16 bytes, not {len(raw)}")
    return (
        f"{raw[3::-1].hex()}-{raw[5:3:-1].hex()}-{raw[7:5:-1].hex()}-"
        f"{raw[8:10].hex()}-{raw[10:].hex()}"
    )


EFI_GLOBAL_VARIABLE = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY_DATABASE = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
SHIM_LOCK = "605dab50-e046-4300-abb6-3dd810dd8b23"
EFI_CERT_X509 = "a5c059a1-94e4-4aa7-87b5-ab155c2bf072"
EFI_CERT_SHA256 = "c1c41626-504c-4092-aca9-41f936934328"

GUID_NAMES: Mapping[str, str] = MappingProxyType(
    {
        EFI_GLOBAL_VARIABLE: "EFI_GLOBAL_VARIABLE",
        EFI_IMAGE_SECURITY_DATABASE: "EFI_IMAGE_SECURITY_DATABASE_GUID",
        SHIM_LOCK: "SHIM_LOCK_GUID",
        EFI_CERT_X509: "EFI_CERT_X509_GUID",
        EFI_CERT_SHA256: "EFI_CERT_SHA256_GUID",
        "3c5766e8-269c-4e34-aa14-ed776e85b3b6": "EFI_CERT_RSA2048_GUID",
        "e2b36190-879b-4a3d-ad8d-f2e7bba32784": "EFI_CERT_RSA2048_SHA256_GUID",
        "826ca512-cf10-4ac9-b187-be01496631bd": "EFI_CERT_SHA1_GUID",
        "67f8444f-8743-48f1-a328-1eaab8736080": "EFI_CERT_RSA2048_SHA1_GUID",
        "0b6e5233-a65c-44c9-9407-d9ab83bfc8bd": "EFI_CERT_SHA224_GUID",
        "ff3e5307-9fd0-48c9-85f1-8ad56c701e01": "EFI_CERT_SHA384_GUID",
        "093e0fae-a6c4-4f50-9f1b-d41e2b89c19a": "EFI_CERT_SHA512_GUID",
        "3bd2a492-96c0-4079-b420-fcf98ef103ed": "EFI_CERT_X509_SHA256_GUID",
        "7076876e-80c2-4ee6-aad2-28b349a6865b": "EFI_CERT_X509_SHA384_GUID",
        "446dbf63-2502-4cda-bcfa-2465d2b0fe9d": "EFI_CERT_X509_SHA512_GUID",
        "4aafd29d-68df-49ee-8aa9-347d375665a7": "EFI_CERT_TYPE_PKCS7_GUID",
    }
)


def guid_name(guid: str) -> str | None:
    return GUID_NAMES.get(guid)
