"""Policies against the fleet's stored evidence: `vtpm policy dry-run`, `vtpm policy
dbx-update` (issue 20).

Talks to a running verifier with the admin token: the verifier re-appraises
each attester's latest evidence (no new quote) and answers which verdicts
would change and why. Exit status: 0 nothing would change (or ``--apply``
recorded the verdicts), 1 some attester would change verdict, 2 bad input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from vtpm_core.errors import ConfigError


def _admin_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: {exc}") from None
    else:
        token = os.environ.get("VTPM_ADMIN_TOKEN", "").strip()
    if not token:
        raise ConfigError("the admin token is needed: --token-file or $VTPM_ADMIN_TOKEN")
    return token


def _failure_text(f: dict[str, Any]) -> str:
    text = f"{f.get('rule')}: expected {f.get('expected')}, got {f.get('actual')}"
    event = f.get("event")
    if isinstance(event, dict):
        text += f" (event {event.get('index')}, PCR {event.get('pcr')})"
    return text


def print_summary(doc: dict[str, Any]) -> None:
    """The dry run's answer as lines: one per changed attester, its reasons below it."""
    verb = "changed" if doc["applied"] else "would change"
    click.echo(
        f"policy {doc['policy']} v{doc['policy_version']}: {doc['reappraised']} re-appraised "
        f"(evidence as stored, no new quote), {len(doc['changed'])} {verb}, "
        f"{doc['unchanged']} unchanged, {len(doc['skipped'])} skipped"
    )
    for c in doc["changed"]:
        name = f" ({c['vm_id']})" if c.get("vm_id") else ""
        click.echo(
            f"  {c['attester_id']}{name}: {c['from']} -> {c['to']}"
            f" (evidence of {c['evidence_received_at']})"
        )
        for f in c["failures"]:
            click.echo(f"    - {_failure_text(f)}")
        for rule in c["resolved"]:
            click.echo(f"    + {rule} now passes")
        for flag in c["flags"]:
            click.echo(f"    - lineage flag {flag}")
    for s in doc["skipped"]:
        click.echo(f"  skipped {s['attester_id']}: {s['reason']}")


def register(cli: click.Group) -> None:
    """Add ``dry-run`` to the ``policy`` group (registered by vtpm_cli.policy_cmds)."""
    policy = cli.commands["policy"]
    assert isinstance(policy, click.Group)

    @policy.command("dry-run")
    @click.argument("policy_name", metavar="POLICY")
    @click.option("--against", "against", multiple=True, required=True,
                  help="'fleet' (all attesters with stored evidence) or ids.")  # fmt: skip
    @click.option("--verifier", "verifier_url", required=True, help="http://HOST:PORT")
    @click.option("--token-file", type=click.Path(path_type=Path),
                  help="the admin token (default: $VTPM_ADMIN_TOKEN)")  # fmt: skip
    @click.option("--apply", "apply", is_flag=True,
                  help="Assign POLICY and record the new verdicts as re-appraisals.")  # fmt: skip
    @click.option("--json", "as_json", is_flag=True)
    def dry_run(
        policy_name: str,
        against: tuple[str, ...],
        verifier_url: str,
        token_file: Path | None,
        apply: bool,
        as_json: bool,
    ) -> None:
        """Which attesters would change verdict under POLICY, and why.

        The verifier appraises each attester's latest stored evidence again,
        without a new quote: the freshness is the original evidence's. Nothing
        changes unless --apply is given; then POLICY is assigned and each new
        verdict is recorded as a re-appraisal (results, EAR, state history).
        """
        from verifier.client import VerifierClient

        ids: list[str] = [a for item in against for a in item.replace(",", " ").split()]
        if "fleet" in ids and len(ids) > 1:
            raise click.UsageError("--against fleet or attester ids, not both")
        body: dict[str, Any] = {"against": "fleet" if ids == ["fleet"] else ids}
        client = VerifierClient(verifier_url, _admin_token(token_file), timeout=600)
        route = "apply" if apply else "dry-run"
        doc = client.post(f"/v1/policies/{policy_name}/{route}", body)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            print_summary(doc)
        if doc["changed"] and not apply:
            sys.exit(1)

    @policy.command("dbx-update")
    @click.argument("update_file", metavar="FILE",
                    type=click.Path(exists=True, dir_okay=False, path_type=Path))  # fmt: skip
    @click.option("--eventlog", "logs", multiple=True,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Scan these logs (offline, replayed against themselves).")  # fmt: skip
    @click.option("--verifier", "verifier_url", help="Scan the fleet's stored evidence.")
    @click.option("--token-file", type=click.Path(path_type=Path),
                  help="the admin token (default: $VTPM_ADMIN_TOKEN)")  # fmt: skip
    @click.option("--base", "base", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="With -o: the policy to add the update's dbx currency rule to.")  # fmt: skip
    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                  help="Write BASE with dbx.require = the update's hashes (YAML).")  # fmt: skip
    @click.option("--binary", "binaries", multiple=True,
                  type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="With an SbatLevel FILE: a boot binary whose .sbat is known.")  # fmt: skip
    @click.option("--json", "as_json", is_flag=True)
    def dbx_update(
        update_file: Path,
        logs: tuple[Path, ...],
        binaries: tuple[Path, ...],
        verifier_url: str | None,
        token_file: Path | None,
        base: Path | None,
        output: Path | None,
        as_json: bool,
    ) -> None:
        """Which boots a dbx update revokes, and which run an older dbx.

        FILE: the authenticated variable (EFI_VARIABLE_AUTHENTICATION_2 + signature
        lists; its KEK signature is not checked here), Microsoft's dbx_info JSON, or an
        SBAT level (shim's SbatLevel text): then each --binary (shim, GRUB,
        systemd-boot, ...) is known by its Authenticode digest and its .sbat, and a boot
        that ran one with a component below the level is revoked; a measured SbatLevel
        behind the level is reported as an old SBAT level.
        With --verifier, every attester's stored evidence whose quote verified; with
        --eventlog, the given logs. Exit 1 when a boot is revoked or a dbx is old.
        With --base and -o: only write the policy revision whose dbx rule requires the
        update's hashes (dbx currency), or, for an SBAT level, whose sbat rule requires
        its generations (SBAT currency), to dry-run and assign like any policy.
        """
        from verifier.dbx import DbxUpdate, scan
        from verifier.sbat import SbatBinary, SbatRevocation

        data = update_file.read_bytes()
        update = DbxUpdate.parse(data)
        if binaries:
            if update.sbat is None:
                raise click.UsageError("--binary goes with an SbatLevel FILE")
            known = [SbatBinary.of_image(p.read_bytes(), p.name) for p in binaries]
            revocation = SbatRevocation(update.sbat.level, {b.sha256: b for b in known})
            update = DbxUpdate.of_sbat(revocation)
            data = revocation.to_json()
        if (base is None) != (output is None):
            raise click.UsageError("--base and -o go together")
        if base is not None and output is not None and update.sbat is not None:
            from verifier.policy import Policy

            gens = dict(update.sbat.level.generations)
            if not gens:
                raise click.UsageError("the SBAT level names no component generation to require")
            doc = Policy.load(base).to_dict()
            doc["sbat"] = {"min_level": gens}
            revised = Policy.load(json.dumps(doc))
            output.write_text(revised.to_yaml())
            names = ", ".join(f"{c} {g}" for c, g in gens.items())
            click.echo(f"wrote {output} ({revised.id}): SbatLevel requires {names}")
            return
        if base is not None and output is not None:
            from verifier.policy import Policy

            doc = Policy.load(base).to_dict()
            doc["dbx"] = {
                **(doc.get("dbx") or {}),
                "require": sorted(h.hex() for h in update.hashes),
            }
            revised = Policy.load(json.dumps(doc))
            output.write_text(revised.to_yaml())
            click.echo(f"wrote {output} ({revised.id}): dbx requires {len(update.hashes)} entries")
            return
        if (verifier_url is None) == (not logs):
            raise click.UsageError("give --verifier or --eventlog")
        if verifier_url is not None:
            from verifier.client import VerifierClient

            client = VerifierClient(verifier_url, _admin_token(token_file), timeout=600)
            doc = client.post_bytes("/v1/dbx/report", data)
        else:
            from verifier.eventlog import EventLog

            revoked, old, old_sbat = [], [], []
            for path in logs:
                log = EventLog.parse(path.read_bytes())
                found = scan(log.verify(log.replay()), update)
                entry = {"log": str(path), **found.to_json()}
                if entry["revoked"]:
                    revoked.append(entry)
                if update.sbat is None and not found.current:
                    old.append(entry)
                if not found.sbat_current:
                    old_sbat.append(entry)
            doc = {"update": update.summary(), "scanned": len(logs), "revoked": revoked,
                   "old_dbx": old, "old_sbat": old_sbat, "skipped": []}  # fmt: skip
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            u = doc["update"]
            if "sbat_level" in u:
                lv = u["sbat_level"]
                listed = ", ".join(f"{c} {g}" for c, g in lv["generations"].items()) or "none"
                click.echo(
                    f"SBAT level {lv['datestamp']} ({listed}); {lv['binaries']} binaries known;"
                    f" {doc['scanned']} boots scanned"
                )
            else:
                click.echo(
                    f"dbx update ({u['source']}): {u['hashes']} hashes, {u['certificates']} "
                    f"certificates, {u['svns']} SVNs; {doc['scanned']} boots scanned"
                )
            for e in doc["revoked"]:
                who = e.get("attester_id") or e.get("log")
                for f in e["revoked"]:
                    name = f" ({f['name']})" if f.get("name") else ""
                    detail = f": {f['detail']}" if f.get("detail") else ""
                    click.echo(
                        f"  REVOKED {who}: {f['kind']} {f['value']}{name}{detail}"
                        f" (event {f['event']}, PCR {f['pcr']})"
                    )
            for e in doc.get("old_sbat", []):
                who = e.get("attester_id") or e.get("log")
                level = e["sbat_level"] or "none"
                click.echo(f"  OLD SBAT {who}: measured {level}; {', '.join(e['sbat_behind'])}")
            for e in doc["old_dbx"]:
                who = e.get("attester_id") or e.get("log")
                if e["dbx_missing"] is None:
                    click.echo(f"  OLD DBX {who}: no dbx measurement to compare")
                else:
                    click.echo(
                        f"  OLD DBX {who}: {e['dbx_missing']} of the update's hashes missing"
                        f" ({e['dbx_entries']} entries measured)"
                    )
            for s in doc["skipped"]:
                click.echo(f"  skipped {s['attester_id']}: {s['reason']}")
        if doc["revoked"] or doc["old_dbx"] or doc.get("old_sbat"):
            sys.exit(1)
