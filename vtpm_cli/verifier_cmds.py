"""The attestation service and its clients: `vtpm verifier serve`, `vtpm attest`, `vtpm check`."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
