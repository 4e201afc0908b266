"""`vtpm ek request` and `vtpm ek import`: EK certificates from a third-party CA (issue 8).

The request is not a PKCS#10 CSR: an EK is a restricted decryption key and
cannot sign one (TCG EK Credential Profile 2.x, 2.1). See docs/ek-external.md.

Import runs the checks in this order: (1) the file is one X.509 certificate;
(2) its key is exactly one of the vTPM's EKs (vtpm_core.ek_external); (3) it
chains to an anchor of ``--chain`` with valid signatures and is within its
validity (verifier.ekcert, as at registration); (4) the TCG EK profile, as
the verifier applies it (``--profile warn`` reports failures instead); then
vtpm_core writes it to NV and write-locks it. The profile and chain checks
live here because ``vtpm_core`` must not import ``verifier``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from verifier.ekcert import (
    ChainOptions,
    TrustStore,
    build_path,
    check_ek_profile,
    load_certificates,
    parse_certificate,
    validate_ek_certificate,
)
from vtpm_cli.quote_cmds import ek_group
from vtpm_cli.vtpm_cmds import _open_store, _store_option
from vtpm_core.ek_external import import_certificate, load_certificate, match_ek, write_requests
from vtpm_core.errors import ConfigError, VerificationError

__all__ = ["register"]

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def check_imported_certificate(
    der: bytes, chain: Path | None, *, ek_public: object, profile: str, at: datetime
) -> list[str]:
    """Steps (3)-(4) of the module doc; returns warnings, raises VerificationError."""
    warnings: list[str] = []
    if chain is None:
        leaf = parse_certificate(der)
        try:
            check_ek_profile(leaf, exempt_eku_and_san=False)
        except VerificationError as exc:
            if profile != "warn":
                raise
            warnings.append(f"profile: {exc}")
        warnings.append("chain not checked (--no-chain)")
        return warnings
    certs = load_certificates(chain)
    if not certs:
        raise ConfigError(f"--chain {chain}: no certificate in it")
    anchors = tuple(c for c in certs if c.self_issued) or (certs[-1],)
    intermediates = tuple(c for c in certs if c not in anchors)
    trust = TrustStore(anchors, intermediates)
    try:
        result = validate_ek_certificate(der, trust, ek_public=ek_public)  # type: ignore[arg-type]
    except VerificationError as exc:
        if not (exc.check.startswith("ek.profile") and profile == "warn"):
            raise
        # validate_ek_certificate checks the chain and validity before the profile
        build_path(parse_certificate(der), trust, at, ChainOptions())
        warnings.append(f"profile: {exc}")
        return warnings
    warnings.extend(result.warnings)
    return warnings


@click.command("request")
@click.argument("name")
@_store_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write the request to (default: ./NAME-ek-request).",
)
@click.option("--json", "as_json", is_flag=True, help="Print request.json.")
def ek_request(name: str, store_path: Path, out_dir: Path | None, as_json: bool) -> None:
    """Export what a third-party CA needs to certify each EK of vTPM NAME.

    Per EK: KIND.ek.pub (TPM2B_PUBLIC), KIND.ek.pem (SubjectPublicKeyInfo);
    and request.json (template, NV index, VM identity, TPM attributes for
    the SAN). Not a PKCS#10 CSR: an EK cannot sign.
    """
    store = _open_store(store_path)
    record = store.get(name)
    out = out_dir or Path(f"{name}-ek-request")
    path = write_requests(record, out)
    if as_json:
        click.echo(path.read_text().rstrip("\n"))
        return
    doc = json.loads(path.read_text())
    for ek in doc["eks"]:
        state = "already certified" if ek["certified"] else "to certify"
        click.echo(
            f"{ek['kind']}: {out / ek['ek_public_file']} {out / ek['ek_pem_file']} "
            f"(template {ek['template']}, NV {ek['nv_index']}, {state})"
        )
    click.echo(f"summary: {path}")


@click.command("import")
@click.argument("name")
@click.argument("cert", type=_FILE)
@_store_option
@click.option(
    "--chain",
    type=_FILE,
    default=None,
    help="PEM bundle of the issuing CA chain; self-signed certificates in it are the anchors.",
)
@click.option("--no-chain", is_flag=True, help="Import without a chain check (say so explicitly).")
@click.option(
    "--profile",
    type=click.Choice(["refuse", "warn"]),
    default="refuse",
    show_default=True,
    help="What a TCG EK profile failure does.",
)
@click.option("--ek", "kind", default=None, help="Import for this EK kind only (default: by key).")
def ek_import(
    name: str,
    cert: Path,
    store_path: Path,
    chain: Path | None,
    no_chain: bool,
    profile: str,
    kind: str | None,
) -> None:
    """Check CERT (PEM or DER) for vTPM NAME, write it to its EK's NV index and lock it.

    Refused: a key that is not one of NAME's EKs, a chain that does not
    verify, a profile failure (unless --profile warn), an EK whose
    certificate is already locked in NV.
    """
    if chain is None and not no_chain:
        raise ConfigError("--chain CHAIN is required (or --no-chain to skip the chain check)")
    if chain is not None and no_chain:
        raise ConfigError("give either --chain or --no-chain")
    store = _open_store(store_path)
    record = store.get(name)
    der = load_certificate(_read(cert), str(cert))  # (1)
    ek = match_ek(record, der, kind=kind)  # (2)
    from vtpm_core.tpm.public import Public

    warnings = check_imported_certificate(
        der,
        chain,
        ek_public=Public.parse_tpm2b(ek.public).public_key(),
        profile=profile,
        at=datetime.now(UTC),
    )  # (3)-(4)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    chain_pem = _read(chain) if chain is not None else b""
    result = import_certificate(store, name, der, chain_pem=chain_pem, kind=ek.kind)
    what = "already locked in NV (unchanged)" if result.already_there else "written"
    click.echo(
        f"{name}: {result.ek.kind} EK certificate {what} at NV 0x{result.nv_index:08x} "
        f"({len(der)} bytes, attributes 0x{result.nv_attributes:08x}, write-locked)"
    )


def register(cli: click.Group) -> None:
    """Add ``request`` and ``import`` to the ``vtpm ek`` group (made by quote_cmds)."""
    del cli
    ek_group.add_command(ek_request)
    ek_group.add_command(ek_import)
