"""Deprecated: the TPM structure types now live in ``vtpm_core.tpm``.

This module only re-exports them for code written against the interim
readers; import from ``vtpm_core.tpm`` (or ``verifier.quote``) instead.
"""

from vtpm_core.tpm import (
    Attest,
    ClockInfo,
    ObjectAttributes,
    PcrSelection,
    PcrValues,
    Public,
    QuoteInfo,
    Signature,
)

__all__ = [
    "Attest",
    "ClockInfo",
    "ObjectAttributes",
    "PcrSelection",
    "PcrValues",
    "Public",
    "QuoteInfo",
    "Signature",
]
