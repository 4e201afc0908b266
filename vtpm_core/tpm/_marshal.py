"""The one adapter to tpm2-pytss marshalling; no tpm2-pytss object leaves it.

Our parsers frame every field themselves (so errors carry field and offset);
``check`` then has tpm2-tss's libtss2-mu unmarshal the same bytes and requires
it to consume exactly the bytes we consumed and to marshal them back
unchanged. ``marshal_public`` builds TPMT_PUBLIC wire bytes (EK templates)
with tpm2-tss's marshaller.
"""

from __future__ import annotations

import sys
from importlib import machinery, util
from typing import Any

from vtpm_core.errors import ParseError

__all__ = ["check", "marshal_public"]


_STRUCTURES = ("TPMT_PUBLIC", "TPMS_ATTEST", "TPMT_SIGNATURE", "TPML_PCR_SELECTION")
_MARSHAL_BUFFER = 4096  # what tpm2-pytss's TPM_OBJECT.marshal gives the marshaller


class _Mu:
    """libtss2-mu's Unmarshal/Marshal pair of one structure, looked up once.

    tpm2-pytss's ``TYPE.unmarshal(data)`` and ``value.marshal()`` call these same
    two C functions; going through them costs ~4x the C calls themselves (a
    wrapper object per call, ``getattr(lib, name)``, ``ffi.typeof``), so
    ``check`` calls them directly with the same arguments: a zeroed C struct
    to unmarshal into, and a 4096-byte buffer to marshal back into.
    """

    __slots__ = ("ffi", "marshal", "pointer", "unmarshal")

    def __init__(self, structure: str) -> None:
        module = _bindings()
        ffi, lib = module.ffi, module.lib
        self.ffi = ffi
        self.pointer = f"{structure} *"
        self.unmarshal = getattr(lib, f"Tss2_MU_{structure}_Unmarshal")
        self.marshal = getattr(lib, f"Tss2_MU_{structure}_Marshal")


_BINDINGS = "tpm2_pytss._libtpm2_pytss"


def _bindings() -> Any:
    """tpm2-pytss's cffi extension (libtss2-mu's functions), without its package.

    ``import tpm2_pytss._libtpm2_pytss`` first runs ``tpm2_pytss/__init__``, which
    imports ESAPI, FAPI, policy, TCTI and cryptography.x509 (0.13-0.25 s in a fresh
    process, against 7-20 ms for the extension alone). The extension is loaded from
    the package's directory under its own name, so a later ``import tpm2_pytss``
    finds it in ``sys.modules`` and uses this same module: the same C functions.
    """
    module = sys.modules.get(_BINDINGS)
    if module is not None:
        return module
    package = util.find_spec("tpm2_pytss")
    if package is None or not package.submodule_search_locations:
        raise ImportError("tpm2-pytss is not installed")
    spec = machinery.PathFinder.find_spec(_BINDINGS, package.submodule_search_locations)
    if spec is None or spec.loader is None:
        raise ImportError(f"tpm2-pytss has no {_BINDINGS}")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sys.modules.setdefault(_BINDINGS, module)


_MU: dict[str, _Mu] = {}


def _mu(structure: str) -> _Mu:
    mu = _MU.get(structure)
    if mu is None:
        if structure not in _STRUCTURES:
            raise KeyError(structure)
        mu = _MU[structure] = _Mu(structure)
    return mu


def _rejects(structure: str, rc: int) -> ParseError:
    from tpm2_pytss import TSS2_Exception  # what tpm2-pytss raises for this rc

    return ParseError(structure, "tpm2-tss", 0, f"libtss2-mu rejects it: {TSS2_Exception(rc)}")


def check(structure: str, data: bytes) -> None:
    """Raise ParseError unless tpm2-tss reads ``data`` as exactly one ``structure``.

    1. libtss2-mu unmarshals ``data`` (it refuses what it cannot read);
    2. it marshals the value back;
    3. it read exactly ``len(data)`` bytes;
    4. the re-encoding is ``data`` byte for byte.
    """
    mu = _mu(structure)
    ffi = mu.ffi
    data = bytes(data)
    try:
        value = ffi.new(mu.pointer)
        offset = ffi.new("size_t *")
        rc = mu.unmarshal(data, len(data), offset, value)  # step 1
        if rc:
            raise _rejects(structure, rc)
        used = offset[0]
        buffer = ffi.new("uint8_t[]", _MARSHAL_BUFFER)
        offset = ffi.new("size_t *")
        rc = mu.marshal(value, buffer, _MARSHAL_BUFFER, offset)  # step 2
        if rc:
            raise _rejects(structure, rc)
        again = ffi.buffer(buffer, offset[0])[:]
    except ParseError:
        raise
    except Exception as exc:  # cffi errors: never let them escape
        raise ParseError(structure, "tpm2-tss", 0, f"libtss2-mu rejects it: {exc}") from None
    if used != len(data):  # step 3
        raise ParseError(
            structure, "tpm2-tss", used, f"libtss2-mu read {used} of {len(data)} bytes"
        )
    if again != data:  # step 4
        raise ParseError(structure, "tpm2-tss", 0, "libtss2-mu does not re-encode it identically")


def marshal_public(
    *,
    key_type: int,
    name_alg: int,
    attributes: int,
    auth_policy: bytes,
    sym_alg: int,
    sym_bits: int,
    sym_mode: int,
    key_bits: int = 0,
    exponent: int = 0,
    curve: int = 0,
    unique_size: int = 0,
) -> bytes:
    """TPMT_PUBLIC wire bytes of an RSA (``key_bits``) or ECC (``curve``) storage/EK key.

    Scheme (and for ECC the KDF) are TPM_ALG_NULL; unique is ``unique_size``
    zero bytes (the modulus for RSA, each of x and y for ECC).
    """
    from tpm2_pytss import constants as c
    from tpm2_pytss import types as t

    pub = t.TPMT_PUBLIC()
    pub.type = key_type
    pub.nameAlg = name_alg
    pub.objectAttributes = attributes
    pub.authPolicy = t.TPM2B_DIGEST(auth_policy)
    if key_type == c.TPM2_ALG.RSA:
        d = pub.parameters.rsaDetail
        d.scheme.scheme = c.TPM2_ALG.NULL
        d.keyBits = key_bits
        d.exponent = exponent
        pub.unique.rsa = t.TPM2B_PUBLIC_KEY_RSA(b"\0" * unique_size)
    else:
        d = pub.parameters.eccDetail
        d.scheme.scheme = c.TPM2_ALG.NULL
        d.curveID = curve
        d.kdf.scheme = c.TPM2_ALG.NULL
        pub.unique.ecc.x = t.TPM2B_ECC_PARAMETER(b"\0" * unique_size)
        pub.unique.ecc.y = t.TPM2B_ECC_PARAMETER(b"\0" * unique_size)
    d.symmetric.algorithm = sym_alg
    d.symmetric.keyBits.aes = sym_bits
    d.symmetric.mode.aes = sym_mode
    return bytes(pub.marshal())
