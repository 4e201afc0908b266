"""Offline checks of TPM evidence: `vtpm verify-quote` and `vtpm ek verify`."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
