# ruff: noqa: E501  (the command table keeps one line per command)
"""The ``vtpm`` command: the one place that wires the CA, the verifier and the vTPM core.

Exit codes, for every command: 0 success (or "valid"); 1 a check failed or an
operation was refused (the one-line message names it); 2 the input could not
be read or parsed, or the command line is wrong.

Commands load lazily: ``vtpm --help`` and ``vtpm NAME`` import only the
modules that NAME lives in (see ``COMMANDS``), so a one-shot command does not
pay for every other command's imports at start.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click

from vtpm_core.errors import ConfigError, ParseError, VtpmTrustError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREADABLE = 2

# One line per top-level command: name -> (modules whose ``register(group)``
# adds it, space-separated; the short help ``vtpm --help`` shows without
# importing them). To add a command: write ``register`` in your module and add
# its line here. tests/cli/test_lazy_main.py checks each line against the real
# command (same name, same short help), so the table cannot drift.
COMMANDS: dict[str, tuple[str, str]] = {
    "ca": ("vtpm_cli.ca_cmds", "The EK certificate authority: init, issue, revoke, CRL/OCSP, HTTP API."),
    "eventlog": ("vtpm_cli.eventlog_cmds", "Parse, decode and replay TCG PC Client firmware event logs."),
    "verify-quote": ("vtpm_cli.quote_cmds", "Verify a TPM2_Quote made by tpm2_quote (and, with --eventlog, replay the log)."),
    "ek": ("vtpm_cli.quote_cmds vtpm_cli.ek_cmds", "Endorsement Key certificates."),
    "ima": ("vtpm_cli.ima_policy_cmds vtpm_cli.ima_list_cmds", "IMA measurement lists and runtime policies (PCR 10)."),
    "policy": ("vtpm_cli.policy_cmds vtpm_cli.policy_fleet_cmds", "Reference-value policies over replayed, digest-checked boot events."),
    "result": ("vtpm_cli.policy_cmds", "Signed attestation results (EAR JWTs)."),
    "init": ("vtpm_cli.vtpm_cmds", "Create a vTPM store and its key-encryption key (mode 0600)."),
    "create": ("vtpm_cli.vtpm_cmds", "Create a vTPM: fresh encrypted state, EKs certified by the CA, certs in NV, locked."),
    "list": ("vtpm_cli.vtpm_cmds", "List the vTPMs of the store."),
    "show": ("vtpm_cli.vtpm_cmds", "Show one vTPM: ids, key id, EKs and certificate serials, running state."),
    "start": ("vtpm_cli.vtpm_cmds", "Start the vTPM (swtpm daemon, data key by fd); print how to attach it."),
    "stop": ("vtpm_cli.vtpm_cmds", "Stop the vTPM's swtpm (by its PID file, after checking it is that swtpm)."),
    "delete": ("vtpm_cli.vtpm_cmds", "Revoke the EK certificates at the CA, then destroy the state and its wrapped key."),
    "backup": ("vtpm_cli.vtpm_cmds", "Write an integrity-protected backup: encrypted state, metadata, certs, wrapped key."),
    "restore": ("vtpm_cli.vtpm_cmds", "Restore a backup (needs the key provider to still hold its key)."),
    "clone": ("vtpm_cli.vtpm_cmds", "Clone SOURCE as NEW: --mode copy keeps the TPM, --mode replace makes a new one."),
    "key-providers": ("vtpm_cli.keyprovider_cmds", "The store's key providers (local, PKCS#11, KMIP): list, check, add."),
    "rekey": ("vtpm_cli.keyprovider_cmds", "Rewrap a vTPM's data key under a new key-encryption key (--to another provider)."),
    "verifier": ("vtpm_cli.verifier_cmds", "Run the attestation service."),
    "attest": ("vtpm_cli.verifier_cmds", "Register + activate on first use, then challenge, quote, evidence; print the verdict."),
    "agent": ("vtpm_cli.agent_cmds", "Register once, then attest on the verifier's cadence; ride out outages."),
    "check": ("vtpm_cli.verifier_cmds", "Exit 0 only if the latest verdict is affirming, fresh and under the policy."),
    "webhooks": ("vtpm_cli.webhook_cmds", "Webhook subscriptions to attester transitions, and their deliveries."),
    "vm": ("vtpm_cli.demo_cmds", "Boot real VMs (QEMU + OVMF + systemd-boot) with a vTPM attached."),
    "demo": ("vtpm_cli.demo_cmds", "CA + verifier + vTPM + measured boot: an affirming and a contraindicated attestation."),
}  # fmt: skip


def load_command(name: str) -> click.Command | None:
    """Import the modules of ``name`` (from ``COMMANDS``) and return its command, or None."""
    entry = COMMANDS.get(name)
    if entry is None:
        return None
    scratch = click.Group()
    for module_name in entry[0].split():
        importlib.import_module(module_name).register(scratch)
    return scratch.commands.get(name)


class _Group(click.Group):
    """Loads commands from ``COMMANDS`` on first use; turns the project's errors
    into one-line messages and exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = self.commands.get(cmd_name)
        if command is None:
            command = load_command(cmd_name)
            if command is not None:
                self.commands[cmd_name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The short help comes from the table, so ``--help`` imports nothing.
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = []
        for name in self.list_commands(ctx):
            text = click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit)
            rows.append((name, text))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (ParseError, ConfigError) as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_UNREADABLE)
        except VtpmTrustError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_FAILED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vtpm-trust")
def cli() -> None:
    """vtpm-trust: EK certificates for virtual TPMs and remote attestation."""


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="vtpm")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
