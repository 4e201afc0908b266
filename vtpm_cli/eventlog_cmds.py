"""Event logs offline: `vtpm eventlog show` and `vtpm eventlog replay`."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
