"""`vtpm ca ...`: the certificate authority (issue 3)."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
