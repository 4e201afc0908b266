"""Offline checks of TPM evidence: `vtpm verify-quote` and the `vtpm ek` group.

Exit codes: 0 valid; 1 a check failed (one line ``invalid: <check>: <why>``
on stderr; with ``--json`` a report on stdout too); 2 the input could not be
read or parsed.

``ek_group`` is module-level so that other areas can add commands to
``vtpm ek`` (e.g. ``ek request``/``ek import``) with ``ek_group.add_command``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

if TYPE_CHECKING:
    # (verifier.ekcert, ~30 ms of imports with cryptography.x509, only for `vtpm ek
    # verify`: imported there, so `vtpm verify-quote` starts without it)
    from verifier.ekcert import ParsedCertificate, PublicKey, ValidatedEkCertificate
    from verifier.eventlog import ReplayedLog
    from verifier.policy import Policy
from verifier.quote import QUOTE_CHECKS, VerifiedQuote, verify_quote
from vtpm_core.errors import ConfigError, ParseError, VerificationError
from vtpm_core.tpm import Attest, PcrSelection, PcrValues, Public

__all__ = ["ek_group", "register"]

EXIT_INVALID = 1
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_FILE_OR_DIR = click.Path(exists=True, path_type=Path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def load_public_key_file(path: Path) -> PublicKey:
    """A public key from PEM/DER SubjectPublicKeyInfo or a TPM2B_PUBLIC file."""
    data = _read(path)
    key: object
    if b"-----BEGIN" in data:
        try:
            key = load_pem_public_key(data)
        except ValueError as exc:
            raise ParseError("PublicKey", "pem", 0, f"{path}: {exc}") from None
    elif data[:1] == b"\x30":
        try:
            key = load_der_public_key(data)
        except ValueError as exc:
            raise ParseError("PublicKey", "der", 0, f"{path}: {exc}") from None
    else:
        key = Public.load(data).public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ParseError("PublicKey", "algorithm", 0, f"{path}: neither RSA nor EC")
    return key


def _cert_json(cert: ParsedCertificate) -> dict[str, Any]:
    return {
        "subject": cert.subject,
        "issuer": cert.issuer,
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "sha256": cert.fingerprint_sha256,
        "strict_der": cert.strict_error is None,
    }


def ek_report(result: ValidatedEkCertificate) -> dict[str, Any]:
    """The JSON report of a valid EK certificate."""
    vm = result.vm_identity
    return {
        "valid": True,
        "tpm": {
            "manufacturer": result.tpm_manufacturer,
            "model": result.tpm_model,
            "version": result.tpm_version,
            "key_type": result.profile.key_type,
        },
        "chain": [_cert_json(c) for c in result.chain],
        "revocation": [
            {"subject": s.subject, "serial": f"{s.serial_number:x}", "checked_by": s.checked_by}
            for s in result.revocation
        ],
        "vm_identity": None if vm is None else {"oid": vm.oid, "value": vm.value.hex()},
        "warnings": list(result.warnings),
    }


def _parse_at(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--at {value!r} is not an ISO 8601 date/time") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@click.group("ek")
def ek_group() -> None:
    """Endorsement Key certificates."""


@ek_group.command("verify")
@click.argument("cert", type=_FILE)
@click.option(
    "--roots",
    "roots",
    multiple=True,
    type=_FILE_OR_DIR,
    help="Trust anchors: a directory of certificates or a PEM bundle (repeatable).",
)
@click.option(
    "--intermediates",
    "intermediates",
    multiple=True,
    type=_FILE_OR_DIR,
    help="Untrusted intermediate CA certificates (file, bundle or directory; repeatable).",
)
@click.option(
    "--ek-public",
    type=_FILE,
    help="The EK public presented (TPM2B_PUBLIC from tpm2_createek -u, or PEM).",
)
@click.option("--crl", "crls", multiple=True, type=_FILE, help="A CRL (DER or PEM; repeatable).")
@click.option("--allow-sha1", is_flag=True, help="Accept SHA-1 signatures in the chain.")
@click.option("--allow-expired-intermediates", is_flag=True, help="Accept expired CA certificates.")
@click.option("--allow-expired-ek", is_flag=True, help="Accept an EK certificate past notAfter.")
@click.option("--at", "at", help="Check validity at this ISO 8601 time instead of now.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def ek_verify(
    cert: Path,
    roots: Sequence[Path],
    intermediates: Sequence[Path],
    ek_public: Path | None,
    crls: Sequence[Path],
    allow_sha1: bool,
    allow_expired_intermediates: bool,
    allow_expired_ek: bool,
    at: str | None,
    as_json: bool,
) -> None:
    """Validate the EK certificate CERT (DER, PEM, or raw NV contents).

    Builds a path to a trust anchor given with --roots, checks the TCG EK
    profile, the key against --ek-public and revocation against --crl.
    """
    from verifier.ekcert import (
        CertificateRevocationList,
        EkValidationOptions,
        TrustStore,
        validate_ek_certificate,
    )

    if not roots:
        raise ConfigError("--roots is required (a directory or PEM bundle of trust anchors)")
    trust = TrustStore.load(roots, intermediates)
    when = _parse_at(at)
    options = EkValidationOptions(
        allow_sha1=allow_sha1,
        allow_expired_intermediates=allow_expired_intermediates,
        allow_expired_ek=allow_expired_ek,
    )
    if when is not None:
        options = dataclasses.replace(options, clock=lambda: when)
    key = load_public_key_file(ek_public) if ek_public is not None else None
    revocation_lists = tuple(CertificateRevocationList.load(p) for p in crls)
    try:
        result = validate_ek_certificate(
            _read(cert), trust, ek_public=key, crls=revocation_lists, options=options
        )
    except VerificationError as exc:
        if as_json:
            click.echo(
                json.dumps(
                    {"valid": False, "failed_check": exc.check, "message": exc.message}, indent=2
                )
            )
        click.echo(f"invalid: {exc}", err=True)
        raise SystemExit(EXIT_INVALID) from None
    if as_json:
        click.echo(json.dumps(ek_report(result), indent=2))
        return
    click.echo("EK certificate valid")
    click.echo(
        f"  TPM: manufacturer {result.tpm_manufacturer}, model {result.tpm_model},"
        f" version {result.tpm_version} ({result.profile.key_type.upper()} EK)"
    )
    for index, link in enumerate(result.chain):
        role = "EK" if index == 0 else ("anchor" if index == len(result.chain) - 1 else "CA")
        click.echo(f"  {role}: {link.subject or '(empty subject)'}")
    for warning in result.warnings:
        click.echo(f"  warning: {warning}")


def _load_ak(path: Path) -> Public | PublicKey:
    """The AK: TPM2B_PUBLIC / TPMT_PUBLIC (attributes known) or a PEM/DER key (not)."""
    data = _read(path)
    if data[:1] == b"\x30":
        return load_public_key_file(path)
    return Public.load(data)  # a PEM gives from_pem=True: no attributes


def _load_pcrs(data: bytes, message: bytes) -> PcrValues:
    """JSON or a serialized tpm2-tools file on their own; else the ``-F values`` form,
    which has no indices and is read in the quote's own selection order."""
    try:
        return PcrValues.load(data)
    except ParseError:
        selection: PcrSelection | None = None
        try:
            quote = Attest.parse(message).quote
            selection = quote.pcr_select if quote is not None else None
        except ParseError:
            pass
        if selection is None:
            raise
        return PcrValues.load(data, selection)


def _parse_nonce(value: str) -> bytes:
    try:
        nonce = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise ConfigError(f"--nonce {value!r} is not hex") from None
    if not nonce:
        raise ConfigError("--nonce is empty")
    return nonce


def _quote_json(quote: VerifiedQuote) -> dict[str, Any]:
    clock = quote.clock_info
    return {
        "qualified_signer": quote.qualified_signer.hex(),
        "clock_info": {
            "clock": clock.clock,
            "reset_count": clock.reset_count,
            "restart_count": clock.restart_count,
            "safe": clock.safe,
        },
        "firmware_version": f"{quote.firmware_version:#018x}",
        "pcr_selection": str(quote.pcr_selection),
        "pcrs": {
            bank: {str(i): v.hex() for i, v in values.items()}
            for bank, values in quote.pcrs.as_mapping().items()
        },
    }


def _checks_report(
    checks: Sequence[str], failed: VerificationError | None, skipped: set[str]
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    seen_failure = False
    for check in checks:
        entry = {"check": check}
        if failed is not None and check == failed.check:
            entry.update(status="failed", message=failed.message)
            seen_failure = True
        elif check in skipped:
            entry["status"] = "skipped"
        elif seen_failure or (failed is not None and failed.check not in checks):
            entry["status"] = "not_run"
        else:
            entry["status"] = "passed"
        out.append(entry)
    return out


@click.command("verify-quote")
@click.option(
    "--ak",
    "ak_file",
    required=True,
    type=_FILE,
    help="AK public: TPM2B_PUBLIC (tpm2_createak -u, tpm2_readpublic -o) or PEM.",
)
@click.option(
    "--message",
    "message_file",
    required=True,
    type=_FILE,
    help="The quoted TPMS_ATTEST (tpm2_quote -m).",
)
@click.option(
    "--signature",
    "signature_file",
    required=True,
    type=_FILE,
    help="The TPMT_SIGNATURE (tpm2_quote -s).",
)
@click.option(
    "--pcrs",
    "pcrs_file",
    required=True,
    type=_FILE,
    help="PCR values: tpm2_quote -o (serialized or -F values) or JSON {bank: {index: hex}}.",
)
@click.option("--nonce", required=True, help="The nonce the verifier issued, hex.")
@click.option(
    "--eventlog",
    "eventlog_file",
    type=_FILE,
    help="TCG PC Client event log that must replay to the quoted PCRs it covers.",
)
@click.option(
    "--policy",
    "policy_file",
    type=_FILE,
    help="Reference-value policy (YAML/JSON) the replayed log must satisfy; needs --eventlog.",
)
@click.option(
    "--ak-attributes-verified",
    is_flag=True,
    help="The AK's TPM attributes were checked elsewhere (needed for a PEM --ak).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report with every check.")
def verify_quote_command(
    ak_file: Path,
    message_file: Path,
    signature_file: Path,
    pcrs_file: Path,
    nonce: str,
    eventlog_file: Path | None,
    policy_file: Path | None,
    ak_attributes_verified: bool,
    as_json: bool,
) -> None:
    """Verify a TPM2_Quote made by tpm2_quote (and, with --eventlog, replay the log).

    Checks: ak.attributes, quote.signature, quote.magic, quote.type,
    quote.nonce, quote.pcr_select, quote.pcr_digest, eventlog.replay and,
    with --policy, every rule of the policy over the replayed events
    (all failing rules are reported).
    """
    policy = None
    if policy_file is not None:
        from verifier.policy import Policy

        if eventlog_file is None:
            raise click.UsageError("--policy needs --eventlog (the policy reads its events)")
        policy = Policy.load(_read(policy_file))
    expected_nonce = _parse_nonce(nonce)
    ak = _load_ak(ak_file)
    message = _read(message_file)
    signature = _read(signature_file)
    pcr_data = _read(pcrs_file)
    pcrs = _load_pcrs(pcr_data, message)
    log = None
    if eventlog_file is not None:
        from verifier.eventlog import EventLog

        log = EventLog.parse(_read(eventlog_file))
    checks = [
        *QUOTE_CHECKS,
        *(["eventlog.replay"] if log is not None else []),
        *(["policy"] if policy is not None else []),
    ]
    skipped = {"ak.attributes"} if ak_attributes_verified else set()
    report: dict[str, Any] = {}
    try:
        quote = verify_quote(
            ak,
            message,
            signature,
            pcrs,
            expected_nonce,
            require_ak_attributes=not ak_attributes_verified,
        )
        report["quote"] = _quote_json(quote)
        if log is not None:
            replayed = log.verify(quote.pcrs.as_mapping())
            report["eventlog"] = {
                "events": len(replayed.events),
                "verified": {bank: sorted(pcrs) for bank, pcrs in replayed.verified.items()},
                "warnings": list(replayed.warnings),
            }
            if policy is not None:
                _check_policy(policy, replayed, report)
    except VerificationError as exc:
        if as_json:
            click.echo(
                json.dumps(
                    {"valid": False, "checks": _checks_report(checks, exc, skipped), **report},
                    indent=2,
                )
            )
        click.echo(f"invalid: {exc}", err=True)
        raise SystemExit(EXIT_INVALID) from None
    if as_json:
        click.echo(
            json.dumps(
                {"valid": True, "checks": _checks_report(checks, None, skipped), **report}, indent=2
            )
        )
        return
    q = report["quote"]
    click.echo("quote valid")
    click.echo(f"  signer: {q['qualified_signer']}")
    c = q["clock_info"]
    click.echo(
        f"  clock: {c['clock']} ms, resetCount {c['reset_count']},"
        f" restartCount {c['restart_count']}, safe {c['safe']}"
    )
    click.echo(f"  firmware: {q['firmware_version']}")
    click.echo(f"  PCRs: {q['pcr_selection']}")
    if ak_attributes_verified:
        click.echo("  AK attributes: not checked here (--ak-attributes-verified)")
    if "eventlog" in report:
        e = report["eventlog"]
        covered = "+".join(f"{b}:{','.join(map(str, p))}" for b, p in e["verified"].items())
        click.echo(f"  event log: {e['events']} events replay to the quoted {covered}")
        for warning in e["warnings"]:
            click.echo(f"  warning: {warning}")
    if "policy" in report:
        click.echo(f"  policy: {report['policy']['id']} satisfied")


def _check_policy(policy: Policy, replayed: ReplayedLog, report: dict[str, Any]) -> None:
    """Run every rule of ``policy`` over the replayed, quote-proven events.

    Records each failing rule in ``report["policy"]`` and raises one
    VerificationError("policy", ...) naming how many failed and the first.
    """
    from verifier.policy import BootEvidence, PolicyViolationError, rules_for

    evidence = BootEvidence(replayed, replayed.pcrs, replayed.verified)
    try:
        rules_for(policy).check(evidence)
    except PolicyViolationError as exc:
        report["policy"] = {
            "id": policy.id,
            "satisfied": False,
            "failures": [f.to_json() for f in exc.failures],
        }
        first = exc.failures[0] if exc.failures else "unknown rule"
        raise VerificationError(
            "policy", f"{len(exc.failures)} rule(s) failed; first: {first}"
        ) from None
    report["policy"] = {"id": policy.id, "satisfied": True, "failures": []}


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
    cli.add_command(verify_quote_command)
    cli.add_command(ek_group)
