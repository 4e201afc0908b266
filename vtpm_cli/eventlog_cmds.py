"""Event logs offline: `vtpm eventlog show` and `vtpm eventlog replay`.

Both read a binary TCG PC Client log (e.g. a copy of
/sys/kernel/security/tpm0/binary_bios_measurements). A malformed log raises
ParseError, which the root group prints as one line with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from verifier.eventlog import EventLog, Limits
from verifier.eventlog.decode import check_event
from verifier.eventlog.jsonview import decoded_summary, to_jsonable
from verifier.eventlog.quirks import summarize
from vtpm_core.errors import ParseError


def _read_log(path: Path, limits: Limits) -> EventLog:
    with path.open("rb") as fh:
        data = fh.read(limits.max_log_bytes + 1)
    if len(data) > limits.max_log_bytes:
        raise ParseError(
            "TCG_PCR_EVENT",
            "log",
            limits.max_log_bytes,
            f"{path} is larger than the {limits.max_log_bytes}-byte limit",
        )
    return EventLog.parse(data, limits)


_LOG_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""

    @cli.group("eventlog")
    def eventlog() -> None:
        """Parse, decode and replay TCG PC Client firmware event logs."""

    @eventlog.command("show")
    @click.argument("log_file", metavar="FILE", type=_LOG_FILE)
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON list of events.")
    def show(log_file: Path, as_json: bool) -> None:
        """Print the events of FILE as a timeline (or JSON).

        data_matches_digest is true when the spec defines the digest as a hash
        of the event data and it matches, false when it does not (the decoded
        data is then NOT what was measured), null when the digest is of
        something the log does not contain. Nothing here is checked against
        a quote: use `vtpm verify-quote --eventlog` for that.
        """
        log = _read_log(log_file, Limits())
        uintn = log.spec_id.uintn_size if log.spec_id is not None else 2
        checks = [(e, check_event(e, log.algorithms, uintn_size=uintn)) for e in log.events]
        if as_json:
            out = [
                {
                    "index": e.index,
                    "offset": e.offset,
                    "pcr": e.pcr,
                    "type": e.type_name,
                    "type_value": e.event_type,
                    "digests": {bank: d.hex() for bank, d in e.digests.items()},
                    "data": e.untrusted_data.hex(),
                    "decoded": to_jsonable(c.decoded),
                    "data_matches_digest": c.data_verified,
                    "digest_covers": c.digest_covers,
                    "warnings": [*c.problems, *(str(q) for q in c.quirks)],
                }
                for e, c in checks
            ]
            click.echo(json.dumps(out, indent=1))
            return
        click.echo(
            f"{log_file}: {log.format} log, banks {', '.join(log.banks)}, {len(checks)} events"
        )
        for q in log.quirks:
            click.echo(f"warning: {q}")
        click.echo(f"{'#':>4} {'offset':>7} {'PCR':>3} {'type':<34} {'data':<5} decoded")
        marks = {True: "ok", False: "BAD", None: "-"}
        for e, c in checks:
            mark = marks[c.data_verified] + ("*" if c.quirks else "")
            click.echo(
                f"{e.index:>4} {e.offset:>7} {e.pcr:>3} {e.type_name:<34} "
                f"{mark:<5} {decoded_summary(c.decoded)}"
            )
            for w in c.problems:
                click.echo(f"{'':>16}warning: {w}")
        applied = summarize(q for _, c in checks for q in c.quirks)
        if applied:
            click.echo("* checked through a named quirk (docs/eventlog.md):")
            for line in applied:
                click.echo(f"  {line}")

    @eventlog.command("replay")
    @click.argument("log_file", metavar="FILE", type=_LOG_FILE)
    @click.option(
        "--json",
        "as_json",
        is_flag=True,
        help='Print {"bank": {"pcr": "hex"}} for every bank in the log.',
    )
    def replay(log_file: Path, as_json: bool) -> None:
        """Replay FILE to PCR values, per bank.

        Prints every PCR that at least one event extends, plus PCR 0 when a
        StartupLocality event sets its initial value (00..04 when PCR 0 opens
        with an H-CRTM event). EV_NO_ACTION events are never extended.
        """
        log = _read_log(log_file, Limits())
        pcrs = log.replay()
        if as_json:
            out = {
                bank: {str(i): v.hex() for i, v in sorted(values.items())}
                for bank, values in pcrs.items()
            }
            click.echo(json.dumps(out))
            return
        for bank, values in pcrs.items():
            for index, value in sorted(values.items()):
                click.echo(f"{bank:<8} PCR {index:>2}: {value.hex()}")
