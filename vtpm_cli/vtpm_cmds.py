"""The vTPM lifecycle (init, create, list, show, start, stop, backup, clone...) and EK requests."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
