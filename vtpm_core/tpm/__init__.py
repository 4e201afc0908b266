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
from vtpm_core.tpm.public import (
    EccParameters,
    EccPoint,
    ObjectAttributes,
    Public,
    RsaParameters,
    SymmetricDefinition,
)
from vtpm_core.tpm.templates import (
    EK_TEMPLATES,
    EkTemplate,
    match_ek_template,
    require_ek_template,
)

__all__ = [
    "EK_TEMPLATES",
    "EccCurve",
    "EccParameters",
    "EccPoint",
    "EkTemplate",
    "ObjectAttributes",
    "Public",
    "RsaParameters",
    "SymmetricDefinition",
    "TpmAlg",
    "cryptography_hash",
    "digest_size",
    "hash_alg",
    "hash_name",
    "hashlib_new",
    "match_ek_template",
    "require_ek_template",
]
