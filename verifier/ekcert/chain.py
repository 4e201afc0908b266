"""Certification path building and validation for EK certificates.

RFC 5280 §6 (path validation), simplified to what EK chains need:

1. Candidate issuers of a certificate are the intermediates and trust
   anchors whose subject equals its issuer name (§7.1 comparison); when
   both carry key identifiers, the AKI must equal the issuer's SKI.
2. Each link's signature is verified over the child's original
   tbsCertificate bytes (never a re-encoding).
3. Every CA certificate below the anchor must be a CA (basicConstraints
   cA TRUE, §4.2.1.9), may sign certificates (keyUsage keyCertSign when
   keyUsage is present, §4.2.1.3), respects pathLenConstraint and carries
   no critical extension we do not process (nameConstraints among them).
4. Validity at the checking time; an expired CA certificate only with
   ``allow_expired_intermediates`` (vendors let intermediates lapse while
   their EK certs stay in the field), SHA-1 signatures only with
   ``allow_sha1`` (many vendor chains are SHA-1 signed).
5. The path ends at a certificate the caller put in the trust store as a
   root: a trust anchor (RFC 5280 §6.1.1 (d)); its own signature and
   validity are not checked (``allow_expired_intermediates`` is not needed
   for an anchor).

Alternative paths are tried depth-first, so a cross-signed or re-issued
intermediate does not hide a valid path; the first error seen is reported
if none works.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from verifier.ekcert.parse import (
    ParsedCertificate,
    names_equal,
    parse_certificate,
    verify_signature,
)
from vtpm_core.errors import ConfigError, ParseError, VerificationError

__all__ = ["ChainOptions", "TrustStore", "build_path", "load_certificates"]

MAX_PATH_LENGTH = 8
_CERT_SUFFIXES = (".pem", ".crt", ".cer", ".der")


@dataclass(frozen=True, slots=True)
class ChainOptions:
    """Explicit relaxations; all off by default."""

    allow_sha1: bool = False
    allow_expired_intermediates: bool = False


def _split_pem_bundle(data: bytes) -> list[bytes]:
    blocks: list[bytes] = []
    marker = b"-----BEGIN CERTIFICATE-----"
    end_marker = b"-----END CERTIFICATE-----"
    start = data.find(marker)
    while start != -1:
        end = data.find(end_marker, start)
        if end == -1:
            raise ParseError("PEM", "END CERTIFICATE", start, "unterminated PEM block")
        blocks.append(data[start : end + len(end_marker)])
        start = data.find(marker, end)
    return blocks


def load_certificates(path: Path) -> list[ParsedCertificate]:
    """Every certificate in a file (DER, PEM, PEM bundle) or a directory of them."""
    if path.is_dir():
        out: list[ParsedCertificate] = []
        for child in sorted(path.iterdir()):
            if child.is_file() and child.suffix.lower() in _CERT_SUFFIXES:
                out.extend(load_certificates(child))
        return out
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificates from {path}: {exc.strerror}") from None
    blocks = _split_pem_bundle(data) if b"-----BEGIN CERTIFICATE-----" in data else [data]
    certs = []
    for block in blocks:
        try:
            certs.append(parse_certificate(block))
        except ParseError as exc:
            raise ParseError(
                f"{path.name}:{exc.structure}", exc.field, exc.offset, exc.message
            ) from None
    return certs


@dataclass(frozen=True, slots=True)
class TrustStore:
    """Trust anchors (roots) and untrusted intermediates to build paths with."""

    roots: tuple[ParsedCertificate, ...]
    intermediates: tuple[ParsedCertificate, ...] = ()

    @classmethod
    def load(
        cls, roots: Iterable[Path | str], intermediates: Iterable[Path | str] = ()
    ) -> TrustStore:
        """Load anchors and intermediates from directories, PEM bundles or DER files.

        Everything under ``roots`` becomes a trust anchor, whether self-signed
        or not (as with ``openssl verify -partial_chain``): put only what you
        trust there.
        """
        anchors = [c for p in roots for c in load_certificates(Path(p))]
        if not anchors:
            raise ConfigError("no trust anchors: the roots given hold no certificate")
        inter = [c for p in intermediates for c in load_certificates(Path(p))]
        return cls(tuple(anchors), tuple(inter))

    def with_intermediates(self, extra: Sequence[ParsedCertificate]) -> TrustStore:
        return TrustStore(self.roots, self.intermediates + tuple(extra))


def _is_anchor(cert: ParsedCertificate, store: TrustStore) -> bool:
    return any(cert.der == root.der for root in store.roots)


def _candidates(cert: ParsedCertificate, store: TrustStore) -> list[tuple[ParsedCertificate, bool]]:
    out: list[tuple[ParsedCertificate, bool]] = []
    for pool, anchor in ((store.roots, True), (store.intermediates, False)):
        for issuer in pool:
            if not names_equal(cert.issuer_der, issuer.subject_der):
                continue
            if (
                cert.authority_key_id is not None
                and issuer.subject_key_id is not None
                and cert.authority_key_id != issuer.subject_key_id
            ):
                continue
            if not anchor and _is_anchor(issuer, store):
                continue
            out.append((issuer, anchor))
    # anchors first: the shortest path to trust wins
    return out


def _check_validity(cert: ParsedCertificate, at: datetime, check: str, allowed: bool) -> str | None:
    if cert.not_before <= at <= cert.not_after:
        return None
    when = "not yet valid" if at < cert.not_before else "expired"
    window = f"{cert.not_before:%Y-%m-%d} .. {cert.not_after:%Y-%m-%d}"
    if not allowed:
        raise VerificationError(
            check, f"{cert.subject or cert.issuer!s} {when} ({window}, at {at:%Y-%m-%d})"
        )
    return f"{when} CA certificate accepted by policy: {cert.subject} ({window})"


# critical extensions a CA certificate may carry that this validator understands;
# anything else critical (e.g. nameConstraints, which we do not process) fails
# closed (RFC 5280 §4.2)
_CA_KNOWN_CRITICAL = {"2.5.29.19", "2.5.29.15", "2.5.29.32", "2.5.29.37", "2.5.29.17"}


def _check_ca(cert: ParsedCertificate, below: int) -> None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _CA_KNOWN_CRITICAL:
            raise VerificationError(
                "ek.chain", f"{cert.subject}: unsupported critical extension {ext.oid}"
            )
    if cert.is_ca is not True:
        raise VerificationError("ek.chain", f"{cert.subject} is not a CA (basicConstraints)")
    if cert.key_usage is not None and "key_cert_sign" not in cert.key_usage:
        raise VerificationError("ek.chain", f"{cert.subject} keyUsage lacks keyCertSign")
    if cert.path_length is not None and below > cert.path_length:
        raise VerificationError(
            "ek.chain", f"{cert.subject} pathLenConstraint {cert.path_length}, {below} CAs below it"
        )


def build_path(
    leaf: ParsedCertificate, store: TrustStore, at: datetime, options: ChainOptions
) -> tuple[tuple[ParsedCertificate, ...], tuple[str, ...]]:
    """Return ``(path, warnings)``: leaf first, trust anchor last.

    Raises VerificationError("ek.chain" or "ek.chain.signature" or
    "ek.chain.validity") when no path to an anchor verifies. Does not check
    the leaf's validity or profile (see validate.py) nor revocation.
    """
    first_error: VerificationError | None = None

    def walk(
        path: list[ParsedCertificate], warnings: list[str]
    ) -> tuple[list[ParsedCertificate], list[str]] | None:
        nonlocal first_error
        child = path[-1]
        if len(path) > MAX_PATH_LENGTH:
            first_error = first_error or VerificationError("ek.chain", "path too long")
            return None
        for issuer, anchor in _candidates(child, store):
            if any(issuer.der == p.der for p in path):
                continue
            try:
                verify_signature(
                    "ek.chain.signature",
                    issuer.public_key,
                    child.signature_algorithm,
                    child.signature_parameters,
                    child.signature,
                    child.tbs_bytes,
                    allow_sha1=options.allow_sha1,
                )
                new_warnings = list(warnings)
                if child.signature_algorithm in ("1.2.840.113549.1.1.5", "1.2.840.10045.4.1"):
                    new_warnings.append(
                        f"SHA-1 signature accepted by policy on {child.subject or 'EK'}"
                    )
                if anchor:
                    return [*path, issuer], new_warnings
                _check_ca(issuer, len(path) - 1)
                note = _check_validity(
                    issuer, at, "ek.chain.validity", options.allow_expired_intermediates
                )
                if note:
                    new_warnings.append(note)
            except VerificationError as exc:
                first_error = first_error or exc
                continue
            found = walk([*path, issuer], new_warnings)
            if found is not None:
                return found
        return None

    if _is_anchor(leaf, store):
        raise VerificationError("ek.chain", "the EK certificate itself is a trust anchor")
    result = walk([leaf], [])
    if result is None:
        if first_error is not None:
            raise first_error
        raise VerificationError(
            "ek.chain",
            f"no issuer found for {leaf.subject or 'the EK certificate'} (issuer {leaf.issuer})",
        )
    path, warnings = result
    return tuple(path), tuple(warnings)
