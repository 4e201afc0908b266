"""Reference-value policies and signed results: `vtpm policy ...`, `vtpm result ...`.

Exit status: 0 affirming / valid, 1 a check failed (contraindicated, bad
signature), 2 unreadable input (the root group maps ParseError/ConfigError).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from verifier.appraisal import appraise_log
from verifier.ear import EarSigner, verify_result
from verifier.eventlog import EventLog, Limits
from verifier.policy import Policy, learn_policy
from vtpm_core.errors import ParseError

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _read_log(path: Path) -> EventLog:
    limits = Limits()
    with path.open("rb") as fh:
        data = fh.read(limits.max_log_bytes + 1)
    if len(data) > limits.max_log_bytes:
        raise ParseError(
            "TCG_PCR_EVENT", "log", limits.max_log_bytes, f"{path} is larger than the limit"
        )
    return EventLog.parse(data, limits)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""

    @cli.group("policy")
    def policy() -> None:
        """Reference-value policies over replayed, digest-checked boot events."""

    @policy.command("learn")
    @click.argument("eventlog", metavar="EVENTLOG", type=_FILE)
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                  required=True, help="Where to write the policy (YAML).")  # fmt: skip
    @click.option("--name", default=None, help="A name for the policy (part of its id).")
    @click.option("--runtime", "runtime_file", type=_FILE, default=None,
                  help="Embed this IMA runtime policy (vtpm ima learn's) as runtime:.")  # fmt: skip
    def learn(eventlog: Path, output: Path, name: str | None, runtime_file: Path | None) -> None:
        """Write a policy that the known-good boot in EVENTLOG satisfies.

        Learns secure boot state, S-CRTM version, PCR 0, every boot
        application digest (PCR 4), the kernel command lines, the db entries
        and the dbx size, from events whose data matches its digest. With
        --runtime, the policy also appraises the IMA list (docs/ima.md).
        """
        log = _read_log(eventlog)
        learned = learn_policy(log.verify(log.replay()), name=name)
        if runtime_file is not None:
            from verifier.ima.policy import RuntimePolicy

            doc = learned.to_dict()
            doc["runtime"] = RuntimePolicy.load(runtime_file).to_dict()
            learned = Policy.from_dict(doc)
        output.write_text(learned.to_yaml())
        click.echo(f"wrote {output} ({learned.id})")

    @policy.command("check")
    @click.option("--policy", "policy_file", type=_FILE, required=True, help="Policy (YAML/JSON).")
    @click.option("--eventlog", "log_file", type=_FILE, required=True, help="Binary event log.")
    @click.option("--json", "as_json", is_flag=True, help="Print the full appraisal as JSON.")
    def check(policy_file: Path, log_file: Path, as_json: bool) -> None:
        """Appraise an event log alone against a policy, offline.

        The log is replayed to itself: this says whether that boot would
        satisfy the policy, not that any machine booted it (use
        `vtpm verify-quote --eventlog --policy` for evidence). Every failing
        rule is listed. Exit 0 when affirming, 1 otherwise.
        """
        pol = Policy.load(policy_file)
        result = appraise_log(_read_log(log_file), pol)
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2))
        else:
            click.echo(f"{result.status} ({pol.id})")
            for f in result.failures:
                click.echo(f"  FAIL {f}")
            for w in result.warnings:
                click.echo(f"  warning: {w}")
        if not result.affirming:
            raise SystemExit(1)

    @policy.command("add-boot-app")
    @click.argument("policy_file", metavar="POLICY", type=_FILE)
    @click.argument("images", metavar="FILE...", nargs=-1, required=True, type=_FILE)
    @click.option("--bank", type=click.Choice(["sha1", "sha256", "sha384", "sha512"]),
                  default="sha256", show_default=True, help="Digest bank to record.")  # fmt: skip
    def add_boot_app(policy_file: Path, images: tuple[Path, ...], bank: str) -> None:
        """Allow the EFI images FILE... (shim, GRUB, systemd-boot, kernel, UKI) as boot apps.

        Each image's Authenticode digest (PE/COFF, the digest firmware logs
        in EV_EFI_BOOT_SERVICES_APPLICATION) is added to POLICY, in place.
        """
        from vtpm_core.authenticode import authenticode_digest

        pol = Policy.load(policy_file)
        doc = pol.to_dict()
        apps: list[dict[str, str]] = doc.setdefault("boot_applications", [])
        for image in images:
            digest = authenticode_digest(image.read_bytes(), bank).hex()
            if any(a.get(bank) == digest for a in apps):
                click.echo(f"{image.name}: {bank}:{digest} already allowed")
                continue
            apps.append({"name": image.name, bank: digest})
            click.echo(f"{image.name}: allowed {bank}:{digest}")
        updated = Policy.from_dict(doc)
        policy_file.write_text(updated.to_yaml())
        click.echo(f"wrote {policy_file} ({updated.id})")

    @policy.command("predict")
    @click.option("--eventlog", "log_file", type=_FILE, default=None,
                  help="The attester's last verified event log (binary).")  # fmt: skip
    @click.option("--policy", "policy_file", type=_FILE, default=None,
                  help="Or a (learned) policy to revise.")  # fmt: skip
    @click.option("--kernel", type=_FILE, multiple=True, help="New kernel EFI binary.")
    @click.option("--uki", type=_FILE, multiple=True, help="New unified kernel image.")
    @click.option("--shim", type=_FILE, multiple=True, help="New shim binary.")
    @click.option("--grub", type=_FILE, multiple=True, help="New GRUB binary.")
    @click.option("--systemd-boot", "sdboot", type=_FILE, multiple=True,
                  help="New systemd-boot binary.")  # fmt: skip
    @click.option("--cmdline", default=None, help="The new kernel command line.")
    @click.option("--pcrlock", "pcrlocks", multiple=True,
                  type=click.Path(exists=True, path_type=Path),
                  help="A systemd .pcrlock file or NNN-name.pcrlock.d (variants).")  # fmt: skip
    @click.option("--pcr11-json", "pcr11_json", type=_FILE, multiple=True,
                  help="PCR 11 values from `systemd-measure calculate --json`.")  # fmt: skip
    @click.option("--phase", "phases", multiple=True,
                  help="Boot phase(s) a UKI's PCR 11 is predicted at (default: the four"
                  " systemd-measure uses, enter-initrd ... :ready).")  # fmt: skip
    @click.option("--valid-until", "valid_until", required=True,
                  help="When replaced values stop being accepted (ISO 8601, zone).")  # fmt: skip
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                  required=True, help="Where to write the revised policy (YAML).")  # fmt: skip
    @click.option("--name", default=None, help="The revision's name (part of its id).")
    def predict(
        log_file: Path | None,
        policy_file: Path | None,
        kernel: tuple[Path, ...],
        uki: tuple[Path, ...],
        shim: tuple[Path, ...],
        grub: tuple[Path, ...],
        sdboot: tuple[Path, ...],
        cmdline: str | None,
        pcrlocks: tuple[Path, ...],
        pcr11_json: tuple[Path, ...],
        phases: tuple[str, ...],
        valid_until: str,
        output: Path,
        name: str | None,
    ) -> None:
        """Write a policy revision that allows an update's values before it is booted.

        The new binaries' Authenticode digests and the new command line are allowed
        beside the old values, which are accepted until --valid-until. Every
        predicted value is printed with the artefact it comes from and the event
        (or policy entry) it replaces. systemd's predictions are read as shipped:
        .pcrlock components (PCR 4 boot applications, PCR 11 values) and the PCR 11
        values of a UKI (from --uki itself, held against its .pcrsig, or --pcr11-json).
        """
        from datetime import datetime

        from verifier.policy.pcrlock import load_component
        from verifier.policy.predict import Artefact, predict_policy
        from verifier.policy.uki import DEFAULT_PHASES, parse_measure_json

        if (log_file is None) == (policy_file is None):
            raise click.UsageError("give exactly one of --eventlog or --policy")
        try:
            until = datetime.fromisoformat(valid_until)
        except ValueError:
            raise click.BadParameter(f"not an ISO 8601 time: {valid_until!r}") from None
        artefacts = [
            Artefact(role, path.name, path.read_bytes())
            for role, paths in (
                ("shim", shim),
                ("grub", grub),
                ("systemd-boot", sdboot),
                ("kernel", kernel),
                ("uki", uki),
            )
            for path in paths
        ]
        if log_file is not None:
            log = _read_log(log_file)
            base: Any = log.verify(log.replay())
        else:
            assert policy_file is not None
            base = Policy.load(policy_file)
        revised, predictions = predict_policy(
            base,
            artefacts,
            cmdline=cmdline,
            valid_until=until,
            name=name,
            pcrlock=[load_component(p) for p in pcrlocks],
            pcr11=[v for p in pcr11_json for v in parse_measure_json(p.read_bytes(), p.name)],
            phases=phases or DEFAULT_PHASES,
        )
        output.write_text(revised.to_yaml())
        for p in predictions:
            click.echo(f"predicted {p}")
        click.echo(f"wrote {output} ({revised.id})")

    @cli.group("result")
    def result() -> None:
        """Signed attestation results (EAR JWTs)."""

    @result.command("verify")
    @click.argument("token", metavar="TOKEN")
    @click.option("--jwks", "jwks_file", type=_FILE, required=True, help="The verifier's JWKS.")
    @click.option("--nonce", default=None, help="Expected nonce (hex).")
    @click.option("--max-age", type=float, default=None, help="Refuse results older (s).")
    @click.option("--any-status", is_flag=True, help="Exit 0 for any valid result.")
    @click.option("--json", "as_json", is_flag=True, help="Print the verified claims as JSON.")
    def verify(
        token: str,
        jwks_file: Path,
        nonce: str | None,
        max_age: float | None,
        any_status: bool,
        as_json: bool,
    ) -> None:
        """Verify an EAR result offline. TOKEN is the JWT or a file holding it.

        Exit 0 when the signature and shape are valid and the status is
        affirming (any status with --any-status), 1 otherwise.
        """
        if token.count(".") != 2:  # not a compact JWS: a file holding one
            path = Path(token)
            if not path.is_file():
                raise ParseError("EAR", "token", 0, f"{token[:40]!r} is neither a JWT nor a file")
            token = path.read_text().strip()
        expected = None
        if nonce is not None:
            try:
                expected = bytes.fromhex(nonce)
            except ValueError:
                raise ParseError("nonce", "hex", 0, "--nonce is not hex") from None
        ear = verify_result(token, jwks_file.read_bytes(), expected_nonce=expected, max_age=max_age)
        if as_json:
            click.echo(json.dumps({"status": ear.status, "kid": ear.kid, **ear.claims}, indent=2))
        else:
            click.echo(f"{ear.status} (signed by {ear.kid}, issued at {ear.issued_at})")
            for name, sub in ear.submods.items():
                click.echo(f"  {name}: {sub.status} {sub.trust_vector.to_json()} {sub.policy_id}")
                for f in sub.failures:
                    click.echo(f"    FAIL {f.get('message')}")
        if ear.status != "affirming" and not any_status:
            raise SystemExit(1)

    @result.command("keygen")
    @click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
                  required=True, help="Where to write the P-256 key (PEM, 0600).")  # fmt: skip
    @click.option("--jwks", "jwks_file", type=click.Path(dir_okay=False, path_type=Path),
                  required=True, help="Where to write the public JWKS.")  # fmt: skip
    def keygen(key_file: Path, jwks_file: Path) -> None:
        """Create an EAR signing key and the JWKS relying parties verify with."""
        signer = EarSigner.generate()
        _write_private(key_file, signer.private_pem())
        jwks_file.write_text(json.dumps(signer.jwks(), indent=2) + "\n")
        click.echo(f"wrote {key_file} and {jwks_file} (kid {signer.kid})")
