"""IMA measurement lists offline: `vtpm ima show` and `vtpm ima replay` (issue 14).

Both read a copy of /sys/kernel/security/ima/binary_runtime_measurements (or
the ASCII form). A malformed list is a ParseError (exit 2); a forged entry
(template hash not matching its data) a VerificationError (exit 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from verifier.ima.entries import ImaEntry
from verifier.ima.limits import DEFAULT_IMA_LIMITS
from verifier.ima.parse import parse_list
from verifier.ima.replay import BANK_SIZES, ExtendMode, replay
from vtpm_cli.ima_policy_cmds import ima_group
from vtpm_core.errors import ParseError

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _read(path: Path, algo: str | None) -> tuple[ImaEntry, ...]:
    limit = DEFAULT_IMA_LIMITS.max_list_bytes
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ParseError("ima_list", "list", limit, f"{path} is larger than the {limit}-byte limit")
    return tuple(parse_list(data, template_hash_algo=algo))


_ALGO = click.option(
    "--template-hash",
    "algo",
    default=None,
    help="Template-hash algorithm of FILE (for binary_runtime_measurements_<algo>).",
)


def register(cli: click.Group) -> None:
    """Add ``ima show`` and ``ima replay`` to the root group's ``ima`` group."""
    ima = ima_group(cli)

    @ima.command("show")
    @click.argument("list_file", metavar="FILE", type=_FILE)
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON list of entries.")
    @_ALGO
    def show(list_file: Path, as_json: bool, algo: str | None) -> None:
        """Print the entries of FILE (template hashes checked; nothing checked against a quote)."""
        entries = _read(list_file, algo)
        if as_json:
            out = [
                {
                    "index": e.index,
                    "offset": e.offset,
                    "pcr": e.pcr,
                    "template": e.template_name,
                    "template_hash": e.template_hash.hex(),
                    "digest": f"{e.digest_algo}:{e.digest.hex()}" if e.digest_algo else None,
                    "path": e.path,
                    "signature": e.signature.hex() if e.signature else None,
                    "buf": e.buf.hex() if e.buf is not None else None,
                    "violation": e.is_violation,
                }
                for e in entries
            ]
            click.echo(json.dumps(out, indent=1))
            return
        click.echo(f"{list_file}: {len(entries)} entries")
        for e in entries:
            flag = " VIOLATION" if e.is_violation else ""
            click.echo(f"{e.index:>6} {e.template_name:<10} {e.digest_algo}:{e.digest.hex()} "
                       f"{e.path}{flag}")  # fmt: skip

    @ima.command("replay")  # (the function is replay_cmd: replay is the import)
    @click.argument("list_file", metavar="FILE", type=_FILE)
    @click.option("--json", "as_json", is_flag=True, help='Print {"bank": {"10": "hex"}}.')
    @click.option("--older-kernel", is_flag=True,
                  help="Extend SHA-1 template hashes zero-padded (before 5.8).")  # fmt: skip
    @_ALGO
    def replay_cmd(list_file: Path, as_json: bool, older_kernel: bool, algo: str | None) -> None:
        """Replay FILE into PCR 10 for every bank, as the kernel extends them."""
        entries = _read(list_file, algo)
        mode = ExtendMode.SHA1_PADDED if older_kernel else ExtendMode.PER_BANK
        pcrs = replay(entries, tuple(b for b in BANK_SIZES if b != "sm3_256"), mode=mode)
        if as_json:
            click.echo(json.dumps({bank: {"10": v.hex()} for bank, v in pcrs.items()}))
            return
        for bank, value in pcrs.items():
            click.echo(f"{bank:<8} PCR 10: {value.hex()}")
