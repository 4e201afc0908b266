"""Offline appraisal: eventlog, verify-quote, ek verify, policy and result commands."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
