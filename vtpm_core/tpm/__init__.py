"""TPM 2.0 structure layer: frozen values parsed from TPM wire bytes. Pure, no I/O.

Modules follow the spec structure families (TPM 2.0 Library Part 2, rev 1.59):
``algorithms`` (TPM_ALG_ID, TPM_ECC_CURVE), ``public`` (TPMT_PUBLIC),
``templates`` (TCG EK Credential Profile templates), ``attest`` (TPMS_ATTEST),
``signature`` (TPMT_SIGNATURE), ``pcr`` (TPML_PCR_SELECTION, PCR value files).
tpm2-pytss is used only inside ``_marshal``. Malformed input raises
``vtpm_core.errors.ParseError`` (structure, field, byte offset).
"""

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
