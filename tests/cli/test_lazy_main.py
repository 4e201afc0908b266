"""The lazy command table of ``vtpm_cli.main``: it matches the real commands,
and ``vtpm --help`` imports none of the command modules."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from vtpm_cli.main import COMMANDS, cli, load_command


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_table_line_matches_the_real_command(name: str) -> None:
    command = load_command(name)
    assert command is not None, f"{COMMANDS[name][0]} registers no command {name!r}"
    assert command.name == name
    assert command.get_short_help_str(limit=1000) == COMMANDS[name][1]


def test_every_registered_command_has_a_table_line() -> None:
    modules = {module for entry in COMMANDS.values() for module in entry[0].split()}
    group = click.Group()
    for module in sorted(modules):
        __import__(module, fromlist=["register"]).register(group)
    assert set(group.commands) == set(COMMANDS)


def test_help_lists_every_command_and_imports_no_command_module() -> None:
    code = (
        "import sys\n"
        "from vtpm_cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('ca.', 'verifier.')\n"
        "loaded = sorted(m for m in sys.modules if m.endswith('_cmds') or m.startswith(heavy))\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "LOADED []" in out
    for name in COMMANDS:
        assert f"\n  {name} " in out


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command 'no-such-command'" in result.output


def test_subcommand_help_loads_only_its_group() -> None:
    result = CliRunner().invoke(cli, ["eventlog", "--help"])
    assert result.exit_code == 0
    assert "replay" in result.output
