"""`vtpm ca ...`: the certificate authority (issue 3). See docs/ca.md."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vtpm_core.errors import ConfigError

if TYPE_CHECKING:
    from ca.home import OpenedCa

PASSPHRASE_HELP = "file whose first line is the CA key passphrase (default: $VTPM_CA_PASSPHRASE)"  # noqa: S105
PIN_HELP = "file with the PKCS#11 user PIN (default: $VTPM_CA_PKCS11_PIN)"

_home = click.option(
    "--home",
    "home",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="CA home directory",
)
_passphrase = click.option(
    "--passphrase-file", type=click.Path(dir_okay=False, path_type=Path), help=PASSPHRASE_HELP
)
_pin = click.option("--pin-file", type=click.Path(dir_okay=False, path_type=Path), help=PIN_HELP)
_db = click.option("--db", "database", help="ledger URL (overrides the CA config)")


def _secrets(home: Path, passphrase_file: Path | None, pin_file: Path | None) -> dict[str, Any]:
    """The passphrase or PIN the home's key backend needs (read only that one)."""
    from ca.home import CaHome
    from ca.keys import PIN_ENV, read_passphrase

    config = CaHome(home).load_config()
    if (config.get("key") or {}).get("backend") == "pkcs11":
        return {"pin": read_passphrase(pin_file, PIN_ENV).decode()}
    return {"passphrase": read_passphrase(passphrase_file)}


def _open(
    home: Path, passphrase_file: Path | None, pin_file: Path | None, database: str | None
) -> OpenedCa:
    from ca.home import CaHome

    return CaHome(home).open(database=database, **_secrets(home, passphrase_file, pin_file))


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""

    @cli.group("ca")
    def ca_group() -> None:
        """The EK certificate authority: init, issue, revoke, CRL/OCSP, HTTP API."""

    @ca_group.command("init")
    @_home
    @click.option(
        "--key-type",
        type=click.Choice(["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072"]),
        default="ecdsa-p256",
        show_default=True,
    )
    @click.option("--subject", default="CN=vtpm-trust EK CA,O=vtpm-trust", show_default=True)
    @click.option("--validity-years", type=int, default=20, show_default=True)
    @click.option("--subordinate", is_flag=True, help="make a CSR for a parent CA instead")
    @click.option("--csr-out", type=click.Path(dir_okay=False, path_type=Path))
    @_passphrase
    @click.option("--pkcs11-module", help="PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so)")
    @click.option("--pkcs11-token", help="token label")
    @click.option("--pkcs11-key-label", default="vtpm-ca", show_default=True)
    @_pin
    @_db
    @click.option("--ek-subject", default="", help="EK certificate subject DN (default: empty)")
    @click.option("--crl-url", help="CRL distribution point written into EK certificates")
    @click.option("--ocsp-url", help="OCSP URL written into EK certificates (AIA)")
    @click.option("--ca-issuers-url", help="caIssuers URL written into EK certificates (AIA)")
    def init(
        home: Path,
        key_type: str,
        subject: str,
        validity_years: int,
        subordinate: bool,
        csr_out: Path | None,
        passphrase_file: Path | None,
        pkcs11_module: str | None,
        pkcs11_token: str | None,
        pkcs11_key_label: str,
        pin_file: Path | None,
        database: str | None,
        ek_subject: str,
        crl_url: str | None,
        ocsp_url: str | None,
        ca_issuers_url: str | None,
    ) -> None:
        """Create a CA home: a self-signed root, or (--subordinate) a key and a CSR."""
        from ca.home import CaHome
        from ca.keys import PIN_ENV, Pkcs11Config, read_passphrase

        if subordinate and csr_out is None:
            raise ConfigError("--subordinate needs --csr-out FILE")
        if csr_out is not None and not subordinate:
            raise ConfigError("--csr-out is only for --subordinate")
        profile: dict[str, Any] = {}
        for key, value in (
            ("subject", ek_subject),
            ("crl_url", crl_url),
            ("ocsp_url", ocsp_url),
            ("ca_issuers_url", ca_issuers_url),
        ):
            if value:
                profile[key] = value
        pkcs11 = None
        pin = None
        passphrase = None
        if pkcs11_module or pkcs11_token:
            if not (pkcs11_module and pkcs11_token):
                raise ConfigError("PKCS#11 needs both --pkcs11-module and --pkcs11-token")
            pkcs11 = Pkcs11Config(pkcs11_module, pkcs11_token, pkcs11_key_label)
            pin = read_passphrase(pin_file, PIN_ENV).decode()
        else:
            passphrase = read_passphrase(passphrase_file)
        csr = CaHome(home).init(
            key_type=key_type,
            subject=subject,
            validity_years=validity_years,
            passphrase=passphrase,
            pkcs11=pkcs11,
            pin=pin,
            database=database,
            subordinate=subordinate,
            ek_profile=profile,
        )
        if csr is not None and csr_out is not None:
            csr_out.write_bytes(csr)
            click.echo(f"subordinate CA key created in {home}; CSR written to {csr_out}")
        else:
            click.echo(f"root CA created in {home} ({key_type}, {subject})")

    @ca_group.command("import-chain")
    @_home
    @click.argument("ca_pem", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.argument("chain_pem", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @_passphrase
    @_pin
    def import_chain(
        home: Path,
        ca_pem: Path,
        chain_pem: Path,
        passphrase_file: Path | None,
        pin_file: Path | None,
    ) -> None:
        """Install the parent-signed CA certificate (CA_PEM) and the parent chain (CHAIN_PEM)."""
        from ca.home import CaHome

        secrets = _secrets(home, passphrase_file, pin_file)
        cert = CaHome(home).import_chain(
            ca_pem.read_bytes(),
            chain_pem.read_bytes(),
            secrets.get("passphrase"),
            secrets.get("pin"),
        )
        click.echo(f"CA certificate installed: {cert.subject.rfc4514_string()}")

    @ca_group.command("issue-ek")
    @_home
    @click.option(
        "--ek-public",
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="TPM2B_PUBLIC (tpm2_createek -u) or a PEM public key (needs --allow-bare-key)",
    )
    @click.option("--vm-id", help="VM UUID (default: a UUID derived from the EK)")
    @click.option("--vm-name", default="")
    @click.option("--vtpm-instance-id", default="")
    @click.option("--tpm-manufacturer", help="TPM_PT_MANUFACTURER: integer or id:XXXXXXXX")
    @click.option("--tpm-model")
    @click.option("--tpm-version", help="firmware version: integer or id:XXXXXXXX")
    @click.option("--clone-of", help="the VM this one is a clone by copy of (same EK)")
    @click.option("--allow-bare-key", is_flag=True, help="certify a PEM key (not EK-checked)")
    @click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
    @_passphrase
    @_pin
    @_db
    def issue_ek(
        home: Path,
        ek_public: Path,
        vm_id: str | None,
        vm_name: str,
        vtpm_instance_id: str,
        tpm_manufacturer: str | None,
        tpm_model: str | None,
        tpm_version: str | None,
        clone_of: str | None,
        allow_bare_key: bool,
        out: Path,
        passphrase_file: Path | None,
        pin_file: Path | None,
        database: str | None,
    ) -> None:
        """Certify one EK; the same EK again gives the same certificate (same serial)."""
        from ca.ek import CertifiableEk
        from ca.issuance import IssueRequest
        from ca.profile import render_tpm_id
        from vtpm_core.vm_identity import VM_IDENTITY_UUID

        def as_uuid(text: str | None, what: str) -> uuid.UUID | None:
            if text is None:
                return None
            try:
                return uuid.UUID(text)
            except ValueError:
                raise ConfigError(f"{what}: not a UUID: {text!r}") from None

        ek = CertifiableEk.load(ek_public.read_bytes(), allow_bare_key=allow_bare_key)
        ca = _open(home, passphrase_file, pin_file, database)
        try:
            if ca.profile.allow_bare_keys is False and ek.template == "bare-pem":
                raise ConfigError("this CA does not certify bare keys")
            vm = as_uuid(vm_id, "--vm-id") or uuid.uuid5(VM_IDENTITY_UUID, ek.spki_sha256)
            result = ca.issuance.issue(
                IssueRequest(
                    ek=ek,
                    vm_id=vm,
                    vm_name=vm_name,
                    vtpm_instance_id=vtpm_instance_id,
                    tpm_manufacturer=render_tpm_id(tpm_manufacturer, "--tpm-manufacturer")
                    if tpm_manufacturer
                    else None,
                    tpm_model=tpm_model,
                    tpm_version=render_tpm_id(tpm_version, "--tpm-version")
                    if tpm_version
                    else None,
                    clone_of=as_uuid(clone_of, "--clone-of"),
                )
            )
        finally:
            ca.close()
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        pem = x509.load_der_x509_certificate(result.certificate_der).public_bytes(
            serialization.Encoding.PEM
        )
        out.write_bytes(pem)
        state = "existing certificate" if result.reissued else "issued"
        click.echo(
            f"{state}: serial {result.record.serial:x} for VM {vm} "
            f"({ek.key_type}, {ek.template}, {result.binding}) -> {out}"
        )

    @ca_group.command("revoke")
    @_home
    @click.argument("serial")
    @click.option(
        "--reason",
        required=True,
        type=click.Choice(
            [
                "unspecified",
                "key-compromise",
                "ca-compromise",
                "affiliation-changed",
                "superseded",
                "cessation-of-operation",
                "certificate-hold",
                "privilege-withdrawn",
                "aa-compromise",
            ]
        ),
    )
    @_passphrase
    @_pin
    @_db
    def revoke(
        home: Path,
        serial: str,
        reason: str,
        passphrase_file: Path | None,
        pin_file: Path | None,
        database: str | None,
    ) -> None:
        """Revoke the certificate with SERIAL (hex, as openssl prints it; colons allowed)."""
        try:
            value = int(serial.replace(":", ""), 16)
        except ValueError:
            raise ConfigError(f"SERIAL: not hex: {serial!r}") from None
        ca = _open(home, passphrase_file, pin_file, database)
        try:
            record = ca.revocation.revoke(value, reason)
        finally:
            ca.close()
        click.echo(f"revoked {record.serial:x} ({reason}) at {record.revoked_at}")

    @ca_group.command("crl")
    @_home
    @click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
    @_passphrase
    @_pin
    @_db
    def crl(
        home: Path,
        out: Path,
        passphrase_file: Path | None,
        pin_file: Path | None,
        database: str | None,
    ) -> None:
        """Write a fresh CRL (DER) of every revoked certificate."""
        ca = _open(home, passphrase_file, pin_file, database)
        try:
            out.write_bytes(ca.revocation.crl())
            count = len(ca.ledger.revoked())
        finally:
            ca.close()
        click.echo(f"CRL with {count} revoked certificate(s) -> {out}")

    @ca_group.command("list")
    @_home
    @_db
    @click.option("--json", "as_json", is_flag=True)
    def list_(home: Path, database: str | None, as_json: bool) -> None:
        """List the ledger (no key needed)."""
        from ca.home import CaHome
        from ca.ledger import Ledger

        store = CaHome(home)
        ledger = Ledger(database or store.database_url(store.load_config()))
        try:
            ledger.create_schema()
            records = ledger.all_records()
        finally:
            ledger.close()
        rows = [
            {
                "serial": f"{r.serial:x}",
                "status": r.status,
                "vm_id": r.vm_id,
                "key_type": r.key_type,
                "ek_template": r.ek_template,
                "not_after": r.not_after.isoformat(),
            }
            for r in records
        ]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            click.echo(
                f"{row['serial']}  {row['status']:8}  {row['key_type']:14} "
                f"{row['ek_template']:9} {row['vm_id']}"
            )

    @ca_group.command("show")
    @_home
    @click.argument("serial")
    @_db
    def show(home: Path, serial: str, database: str | None) -> None:
        """Show one ledger row and its certificate (PEM); no key needed."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from ca.home import CaHome
        from ca.ledger import Ledger

        try:
            value = int(serial.replace(":", ""), 16)
        except ValueError:
            raise ConfigError(f"SERIAL: not hex: {serial!r}") from None
        store = CaHome(home)
        ledger = Ledger(database or store.database_url(store.load_config()))
        try:
            ledger.create_schema()
            record = ledger.get(value)
            clones = ledger.bindings_of(record)
        finally:
            ledger.close()
        for name in (
            "status",
            "vm_id",
            "vm_name",
            "vtpm_instance_id",
            "key_type",
            "ek_template",
            "ek_name",
            "ek_public_sha256",
            "not_before",
            "not_after",
            "revoked_at",
            "revocation_reason",
        ):
            click.echo(f"{name}: {getattr(record, name)}")
        click.echo(f"serial: {record.serial:x}")
        click.echo("bindings: " + ", ".join(f"{vm} ({kind})" for vm, kind in clones.items()))
        if record.certificate_der:
            cert = x509.load_der_x509_certificate(record.certificate_der)
            click.echo(cert.public_bytes(serialization.Encoding.PEM).decode(), nl=False)

    @ca_group.command("add-token")
    @_home
    @click.option("--name", required=True)
    @click.option("--role", required=True, type=click.Choice(["provisioner", "admin", "reader"]))
    def add_token(home: Path, name: str, role: str) -> None:
        """Create an API bearer token (printed once; only its SHA-256 is stored)."""
        from ca.home import CaHome

        click.echo(CaHome(home).add_token(name, role))

    @ca_group.command("serve")
    @_home
    @click.option("--bind", default="127.0.0.1:8443", show_default=True, help="HOST:PORT")
    @click.option("--workers", type=int, default=2, show_default=True)
    @_passphrase
    @_pin
    @_db
    def serve(
        home: Path,
        bind: str,
        workers: int,
        passphrase_file: Path | None,
        pin_file: Path | None,
        database: str | None,
    ) -> None:
        """Serve the HTTP API with gunicorn (foreground; stop with SIGTERM)."""
        from ca.http import CaServerConfig
        from ca.http import serve as run

        secrets = _secrets(home, passphrase_file, pin_file)
        run(
            CaServerConfig(home, secrets.get("passphrase"), secrets.get("pin"), database or None),
            bind,
            workers,
        )


__all__ = ["register"]
