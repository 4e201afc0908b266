"""TPM 2.0 structure layer: frozen values parsed from TPM wire bytes. Pure, no I/O.

Modules follow the spec structure families (TPM 2.0 Library Part 2, rev 1.59):
``algorithms`` (TPM_ALG_ID, TPM_ECC_CURVE), ``public`` (TPMT_PUBLIC),
``templates`` (TCG EK Credential Profile templates), ``attest`` (TPMS_ATTEST),
``signature`` (TPMT_SIGNATURE), ``pcr`` (TPML_PCR_SELECTION, PCR value files).
tpm2-pytss is used only inside ``_marshal``. Malformed input raises
``vtpm_core.errors.ParseError`` (structure, field, byte offset).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vtpm_core.tpm.algorithms import (
        EccCurve,
        TpmAlg,
        cryptography_hash,
        digest_size,
        hash_alg,
        hash_name,
        hashlib_new,
    )
    from vtpm_core.tpm.attest import (
        ST_ATTEST_CERTIFY,
        ST_ATTEST_CREATION,
        ST_ATTEST_QUOTE,
        TPM_GENERATED_VALUE,
        Attest,
        CertifyInfo,
        ClockInfo,
        CreationInfo,
        QuoteInfo,
        UnknownAttested,
    )
    from vtpm_core.tpm.pcr import PcrSelection, PcrValues
    from vtpm_core.tpm.public import (
        EccParameters,
        EccPoint,
        ObjectAttributes,
        Public,
        RsaParameters,
        SymmetricDefinition,
    )
    from vtpm_core.tpm.signature import Signature
    from vtpm_core.tpm.templates import (
        EK_TEMPLATES,
        EkTemplate,
        match_ek_template,
        read_ek_tpm2b,
        require_ek_template,
    )

# Each name is imported from its module when first read (PEP 562): ``vtpm create``
# reads one TPM2B_PUBLIC (public, templates) and no longer imports attest, pcr and
# signature with it.
_HOME = {
    "Attest": "vtpm_core.tpm.attest",
    "CertifyInfo": "vtpm_core.tpm.attest",
    "ClockInfo": "vtpm_core.tpm.attest",
    "CreationInfo": "vtpm_core.tpm.attest",
    "EK_TEMPLATES": "vtpm_core.tpm.templates",
    "EccCurve": "vtpm_core.tpm.algorithms",
    "EccParameters": "vtpm_core.tpm.public",
    "EccPoint": "vtpm_core.tpm.public",
    "EkTemplate": "vtpm_core.tpm.templates",
    "ObjectAttributes": "vtpm_core.tpm.public",
    "PcrSelection": "vtpm_core.tpm.pcr",
    "PcrValues": "vtpm_core.tpm.pcr",
    "Public": "vtpm_core.tpm.public",
    "QuoteInfo": "vtpm_core.tpm.attest",
    "RsaParameters": "vtpm_core.tpm.public",
    "ST_ATTEST_CERTIFY": "vtpm_core.tpm.attest",
    "ST_ATTEST_CREATION": "vtpm_core.tpm.attest",
    "ST_ATTEST_QUOTE": "vtpm_core.tpm.attest",
    "Signature": "vtpm_core.tpm.signature",
    "SymmetricDefinition": "vtpm_core.tpm.public",
    "TPM_GENERATED_VALUE": "vtpm_core.tpm.attest",
    "TpmAlg": "vtpm_core.tpm.algorithms",
    "UnknownAttested": "vtpm_core.tpm.attest",
    "cryptography_hash": "vtpm_core.tpm.algorithms",
    "digest_size": "vtpm_core.tpm.algorithms",
    "hash_alg": "vtpm_core.tpm.algorithms",
    "hash_name": "vtpm_core.tpm.algorithms",
    "hashlib_new": "vtpm_core.tpm.algorithms",
    "match_ek_template": "vtpm_core.tpm.templates",
    "read_ek_tpm2b": "vtpm_core.tpm.templates",
    "require_ek_template": "vtpm_core.tpm.templates",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'vtpm_core.tpm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "EK_TEMPLATES",
    "ST_ATTEST_CERTIFY",
    "ST_ATTEST_CREATION",
    "ST_ATTEST_QUOTE",
    "TPM_GENERATED_VALUE",
    "Attest",
    "CertifyInfo",
    "ClockInfo",
    "CreationInfo",
    "EccCurve",
    "EccParameters",
    "EccPoint",
    "EkTemplate",
    "ObjectAttributes",
    "PcrSelection",
    "PcrValues",
    "Public",
    "QuoteInfo",
    "RsaParameters",
    "Signature",
    "SymmetricDefinition",
    "TpmAlg",
    "UnknownAttested",
    "cryptography_hash",
    "digest_size",
    "hash_alg",
    "hash_name",
    "hashlib_new",
    "match_ek_template",
    "read_ek_tpm2b",
    "require_ek_template",
]
