"""Reference-value policies and signed results: `vtpm policy ...`, `vtpm result ...`."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
