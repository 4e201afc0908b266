"""The ``vtpm`` command: the one place that wires the CA, the verifier and the vTPM core.

Exit codes, for every command: 0 success (or "valid"); 1 a check failed or an
operation was refused (the one-line message names it); 2 the input could not
be read or parsed, or the command line is wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from vtpm_core.errors import ConfigError, ParseError, VtpmTrustError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREADABLE = 2


class _Group(click.Group):
    """Turns the project's errors into one-line messages and exit codes."""

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


def _register_all(group: click.Group) -> None:
    from vtpm_cli import (
        ca_cmds,
        demo_cmds,
        ek_cmds,
        eventlog_cmds,
        policy_cmds,
        quote_cmds,
        verifier_cmds,
        vtpm_cmds,
    )

    modules = (ca_cmds, eventlog_cmds, quote_cmds, ek_cmds, policy_cmds, vtpm_cmds, verifier_cmds,
               demo_cmds)  # fmt: skip
    for module in modules:
        module.register(group)


_register_all(cli)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="vtpm")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
