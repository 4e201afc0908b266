"""`vtpm agent`: continuous attestation from inside the guest (issue 16)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import click

__all__ = ["register"]


def register(cli: click.Group) -> None:
    @cli.command("agent")
    @click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        envvar="VTPM_AGENT_CONFIG",
        help="TOML config file (the environment overrides it) [env: VTPM_AGENT_CONFIG]",
    )
    @click.option("--once", is_flag=True, help="one attestation; exit 0 only if trusted")
    @click.option("--json", "as_json", is_flag=True, help="with --once: print the outcome as JSON")
    @click.option("-v", "--verbose", is_flag=True, help="log every round (default: warnings)")
    def agent_cmd(config_path: Path | None, once: bool, as_json: bool, verbose: bool) -> None:
        """Register once, then attest on the verifier's cadence; ride out outages.

        Exit status: 0 (--once: trusted), 1 not trusted, a TPM or event-log
        fault, or the verifier refusing the agent; 2 a bad configuration.
        """
        from verifier.agent import Agent
        from verifier.agent_config import load_config

        config = load_config(config_path, os.environ)
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO if verbose or not once else logging.WARNING,
            format="%(asctime)s vtpm-agent %(levelname)s %(message)s",
        )
        agent = Agent(config)
        try:
            if once:
                outcome = agent.once()
                if as_json:
                    doc = {
                        "status": outcome.status,
                        "state": outcome.state,
                        "next_attestation_s": outcome.next_s,
                        "fault": outcome.fault,
                    }
                    click.echo(json.dumps(doc))
                else:
                    click.echo(
                        f"{outcome.status or 'no verdict'} ({outcome.fault or outcome.state})"
                    )
                sys.exit(0 if outcome.trusted else 1)

            def stop(_sig: int, _frame: FrameType | None) -> None:
                raise SystemExit(0)

            signal.signal(signal.SIGTERM, stop)
            sys.exit(agent.run())
        finally:
            agent.close()
