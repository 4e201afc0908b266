"""`vtpm demo` (the README's first command) and `vtpm vm boot`."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
