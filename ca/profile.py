"""The EK certificate profile: a checked, frozen configuration built once at start-up.

Rules come from the TCG EK Credential Profile for TPM Family 2.0, Level 0,
Version 2.5 (section 3.2 "EK Certificate", 3.2.x per field) and RFC 5280
(section 4.1.2.2 serial numbers, 4.2.1.6 subjectAltName). Each rule is
quoted beside the field that enforces it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from vtpm_core.errors import ConfigError

__all__ = ["EkProfile", "TpmSpecification", "parse_subject", "render_tpm_id"]

# 2.23.133.2.* (TCG EK Credential Profile, section 3.1 "Object identifiers")
OID_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
OID_TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
OID_TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")
OID_TPM_SPECIFICATION = x509.ObjectIdentifier("2.23.133.2.16")
OID_TCG_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")

# "2.0": the family; level and revision of TPM 2.0 Library spec that libtpms
# 0.9 (swtpm) implements; swtpm_setup writes the same numbers by default.
DEFAULT_SPEC = ("2.0", 0, 164)


@dataclass(frozen=True, slots=True)
class TpmSpecification:
    family: str
    level: int
    revision: int


def render_tpm_id(value: int | str, what: str) -> str:
    """``id:%08X`` of a 32-bit TPM property (TCG EK profile 3.2.9: "id:" + hex)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower().startswith("id:"):
            hexpart = text[3:]
            if (
                not hexpart
                or len(hexpart) > 8
                or any(c not in "0123456789abcdefABCDEF" for c in hexpart)
            ):
                raise ConfigError(f"{what}: expected id:XXXXXXXX (hex), got {value!r}")
            return "id:" + hexpart.upper()
        try:
            value = int(text, 0)
        except ValueError as exc:
            raise ConfigError(f"{what}: expected an integer or id:XXXXXXXX, got {value!r}") from exc
    if not 0 <= value <= 0xFFFFFFFF:
        raise ConfigError(f"{what}: {value} does not fit 32 bits")
    return f"id:{value:08X}"


_SUBJECT_KEYS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
}


def parse_subject(text: str) -> x509.Name:
    """A DN like ``CN=vTPM CA,O=Example,C=DE`` (comma separated, one attribute per RDN)."""
    if not text.strip():
        return x509.Name([])
    attributes = []
    for part in text.split(","):
        key, sep, value = part.partition("=")
        oid = _SUBJECT_KEYS.get(key.strip().upper())
        if not sep or oid is None or not value.strip():
            raise ConfigError(
                f"subject: cannot read {part.strip()!r} (use KEY=value with KEY in "
                f"{', '.join(_SUBJECT_KEYS)})"
            )
        if oid == NameOID.COUNTRY_NAME and len(value.strip()) != 2:
            raise ConfigError(f"subject: C must be two letters, got {value.strip()!r}")
        attributes.append(x509.NameAttribute(oid, value.strip()))
    return x509.Name(attributes)


@dataclass(frozen=True, slots=True)
class EkProfile:
    """What every EK certificate of this CA looks like. Build with :meth:`from_config`."""

    # TCG EK profile 3.2.4: "the subject field MAY be empty"; when empty the
    # SAN MUST be critical (RFC 5280 4.2.1.6), otherwise it SHOULD NOT be.
    subject: x509.Name
    validity: dt.timedelta
    # RFC 5280 4.1.2.2 / CA/B BR: serial positive, at least 64 bits of randomness.
    serial_random_bits: int
    spec: TpmSpecification
    default_manufacturer: str
    default_model: str
    default_version: str
    crl_url: str | None
    ocsp_url: str | None
    ca_issuers_url: str | None
    # "shape": pkilint-lint the first certificate of each distinct shape, then
    #          structurally check every instance against that linted shape;
    # "every": pkilint every certificate (slow; see docs/ca.md).
    lint: str
    # A bare (non-TPM2B) public key is certified only when the request says so.
    allow_bare_keys: bool

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> EkProfile:
        """Check the ``ek_profile`` section of the CA config; raises :class:`ConfigError`."""
        known = {
            "subject",
            "validity_days",
            "serial_bits",
            "tpm_spec",
            "tpm_manufacturer",
            "tpm_model",
            "tpm_version",
            "crl_url",
            "ocsp_url",
            "ca_issuers_url",
            "lint",
            "allow_bare_keys",
        }
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"ek_profile: unknown keys {sorted(unknown)}")
        validity_days = int(raw.get("validity_days", 365 * 20))
        if not 1 <= validity_days <= 365 * 100:
            raise ConfigError(f"ek_profile.validity_days: {validity_days} not in 1..36500")
        serial_bits = int(raw.get("serial_bits", 126))
        # RFC 5280 4.1.2.2: at most 20 octets; one bit stays 0 to keep it positive.
        if not 64 <= serial_bits <= 158:
            raise ConfigError(f"ek_profile.serial_bits: {serial_bits} not in 64..158")
        spec = raw.get("tpm_spec", list(DEFAULT_SPEC))
        if not (isinstance(spec, list | tuple) and len(spec) == 3):
            raise ConfigError("ek_profile.tpm_spec: expected [family, level, revision]")
        lint = str(raw.get("lint", "shape"))
        if lint not in ("shape", "every"):
            raise ConfigError(f"ek_profile.lint: {lint!r} is neither 'shape' nor 'every'")
        urls = {}
        for key in ("crl_url", "ocsp_url", "ca_issuers_url"):
            value = raw.get(key)
            if value is not None and not str(value).startswith(("http://", "https://")):
                raise ConfigError(f"ek_profile.{key}: {value!r} is not an http(s) URL")
            urls[key] = str(value) if value else None
        return cls(
            subject=parse_subject(str(raw.get("subject", ""))),
            validity=dt.timedelta(days=validity_days),
            serial_random_bits=serial_bits,
            spec=TpmSpecification(str(spec[0]), int(spec[1]), int(spec[2])),
            default_manufacturer=render_tpm_id(
                raw.get("tpm_manufacturer", 0x49424D00), "tpm_manufacturer"
            ),
            default_model=str(raw.get("tpm_model", "swtpm")),
            default_version=render_tpm_id(raw.get("tpm_version", 0x20191023), "tpm_version"),
            crl_url=urls["crl_url"],
            ocsp_url=urls["ocsp_url"],
            ca_issuers_url=urls["ca_issuers_url"],
            lint=lint,
            allow_bare_keys=bool(raw.get("allow_bare_keys", True)),
        )
