"""The attestation service and its clients: `vtpm verifier init|serve|token`, `vtpm attest`,
`vtpm check` (issue 6; docs/service.md).

Exit codes: 0 success / affirming; 1 a check failed (the reasons are printed);
2 unreadable input or bad command line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from vtpm_core.errors import ConfigError

_DEFAULT_STATE = Path("~/.config/vtpm/attester.json")


def _read_token(token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: {exc}") from None
        if text.startswith("{"):  # an attester state file also works
            try:
                return str(json.loads(text)["token"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--token-file {token_file}: no token in it") from None
        return text
    return os.environ.get("VTPM_VERIFIER_TOKEN") or None


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""

    @cli.group("verifier")
    def verifier() -> None:
        """Run the attestation service."""

    @verifier.command("init")
    @click.option("--home", type=click.Path(path_type=Path), required=True)
    @click.option("--db", "db_url", help="database URL to record (default: SQLite in the home)")
    @click.option("--verifier-id", help="the id results name (default: random)")
    @click.option(
        "--trust-root",
        "roots",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="EK CA root certificate to trust (repeatable; copied into HOME/roots)",
    )
    @click.option(
        "--intermediate",
        "intermediates",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="intermediate CA certificate (repeatable; copied into HOME/intermediates)",
    )
    def init(
        home: Path,
        db_url: str | None,
        verifier_id: str | None,
        roots: tuple[Path, ...],
        intermediates: tuple[Path, ...],
    ) -> None:
        """Create a verifier home; prints the admin token (also in HOME/admin.token)."""
        import shutil

        from verifier.service.config import init_home, load_config
        from verifier.service.db import Database, upgrade

        token = init_home(home, verifier_id=verifier_id, database_url=db_url)
        for src, sub in [
            *((r, "roots") for r in roots),
            *((i, "intermediates") for i in intermediates),
        ]:
            shutil.copyfile(src, home / sub / src.name)
        config = load_config(home)
        db = Database(config.database_url)
        try:
            upgrade(db.engine)
        finally:
            db.dispose()
        click.echo(
            f"verifier home {config.home} ready (database {db.engine.url.render_as_string()})"
        )
        click.echo(f"admin token: {token}")

    @verifier.command("serve")
    @click.option("--home", type=click.Path(path_type=Path), required=True)
    @click.option("--bind", default="127.0.0.1:8441", show_default=True)
    @click.option("--db", "db_url", help="database URL (overrides the home's)")
    @click.option("--workers", default=2, show_default=True, type=int)
    def serve(home: Path, bind: str, db_url: str | None, workers: int) -> None:
        """Migrate the database, then serve with gunicorn (this process becomes the master)."""
        from verifier.service.gunicorn import serve as run

        run(home, bind, workers, db_url)

    @verifier.group("token")
    def token() -> None:
        """Manage relying-party read tokens."""

    @token.command("add-reader")
    @click.option("--home", type=click.Path(path_type=Path), required=True)
    def add_reader(home: Path) -> None:
        """Create a read token (printed once; restart the service to use it)."""
        from verifier.service.config import add_reader_token

        click.echo(add_reader_token(home))

    @cli.command("attest")
    @click.option("--verifier", "verifier_url", required=True, help="http://HOST:PORT")
    @click.option("--tpm", "tcti", required=True, help="swtpm:host=H,port=P or device:/dev/tpmrm0")
    @click.option("--eventlog", type=click.Path(path_type=Path), help="TCG event log to send")
    @click.option(
        "--token-file",
        type=click.Path(path_type=Path),
        help=f"attester state (id + token), created on first use [default: {_DEFAULT_STATE}]",
    )
    @click.option("--vm-id", help="VM id to register under (if the EK cert carries none)")
    @click.option(
        "--ima-list",
        type=click.Path(path_type=Path, dir_okay=False),
        help="IMA list (binary_runtime_measurements or the ASCII form): its entries after "
        "the verified ones go with the evidence when the policy has a runtime part",
    )
    @click.option("--json", "as_json", is_flag=True, help="print the whole result as JSON")
    def attest_cmd(
        verifier_url: str,
        tcti: str,
        eventlog: Path | None,
        token_file: Path | None,
        vm_id: str | None,
        ima_list: Path | None,
        as_json: bool,
    ) -> None:
        """Register + activate on first use, then challenge, quote, evidence; print the verdict."""
        from verifier.attester import DEFAULT_EVENTLOG, attest

        log = _event_log(eventlog, tcti, DEFAULT_EVENTLOG)
        state = token_file or _DEFAULT_STATE.expanduser()
        result = attest(
            verifier_url, tcti, state_file=state, event_log=log, vm_id=vm_id, ima_list=ima_list
        )
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            report = result.get("report") or {}
            click.echo(f"attester {result['attester_id']}: {result['status']}")
            for f in report.get("failures", []):
                click.echo(f"  failed {f.get('rule')}: {f.get('message')}")
            for f in report.get("flags", []):
                click.echo(f"  flagged {f.get('flag')}: {f.get('detail')}")
            ima = report.get("ima") or {}
            if ima.get("appraised"):
                click.echo(
                    f"  ima: entries {ima.get('start_index')}..{ima.get('next_index')} verified, "
                    f"{ima.get('pending', 0)} pending, next from {ima.get('next_index')}"
                )
        if result.get("status") != "affirming":
            sys.exit(1)

    @cli.command("check")
    @click.option("--verifier", "verifier_url", required=True)
    @click.option("--attester", "attester_id", help="the attester whose latest result to check")
    @click.option(
        "--wait-trusted",
        "wait_id",
        metavar="ATTESTER",
        help="instead: wait until this attester's state is trusted (CI); exit 1 on failed",
    )
    @click.option(
        "--timeout",
        "wait_timeout",
        default="5m",
        show_default=True,
        help="with --wait-trusted: give up after this long (90s, 10m, or seconds)",
    )
    @click.option("--max-age", default="10m", show_default=True, help="e.g. 90s, 10m, 2h")
    @click.option("--policy", help="the result must be under this policy")
    @click.option("--attest-now", is_flag=True, help="attest first (needs --tpm; run in the VM)")
    @click.option("--tpm", "tcti", help="TCTI for --attest-now")
    @click.option("--eventlog", type=click.Path(path_type=Path), help="event log for --attest-now")
    @click.option(
        "--attester-state",
        type=click.Path(path_type=Path),
        help="attester state file for --attest-now",
    )
    @click.option(
        "--token-file",
        type=click.Path(path_type=Path),
        help="relying-party token (default: $VTPM_VERIFIER_TOKEN)",
    )
    @click.option("--junit", type=click.Path(path_type=Path), help="write a JUnit XML report")
    @click.option("--json", "as_json", is_flag=True)
    def check_cmd(
        verifier_url: str,
        attester_id: str | None,
        wait_id: str | None,
        wait_timeout: str,
        max_age: str,
        policy: str | None,
        attest_now: bool,
        tcti: str | None,
        eventlog: Path | None,
        attester_state: Path | None,
        token_file: Path | None,
        junit: Path | None,
        as_json: bool,
    ) -> None:
        """Exit 0 only if the latest verdict is affirming, fresh and under the policy.

        With --wait-trusted: exit 0 once the attester is trusted, 1 on fresh failing
        evidence or at the timeout."""
        from verifier.client import VerifierClient, junit_xml, parse_duration

        if (attester_id is None) == (wait_id is None):
            raise ConfigError("give exactly one of --attester and --wait-trusted")
        if wait_id is not None:
            timeout = wait_timeout.strip()
            seconds = (
                float(timeout) if timeout.isdigit() else parse_duration(timeout).total_seconds()
            )
            waited = VerifierClient(verifier_url, _read_token(token_file)).wait_trusted(
                wait_id, timeout_s=seconds
            )
            if as_json:
                click.echo(json.dumps(waited.to_json(), indent=2))
            else:
                verdict = "PASS" if waited.ok else "FAIL"
                click.echo(
                    f"{verdict} attester {wait_id}: {waited.reason} ({waited.waited_s:.1f} s)"
                )
            if not waited.ok:
                sys.exit(1)
            return
        assert attester_id is not None
        age = parse_duration(max_age)
        if attest_now:
            from verifier.attester import DEFAULT_EVENTLOG, attest

            if not tcti:
                raise ConfigError("--attest-now needs --tpm")
            state = attester_state or _DEFAULT_STATE.expanduser()
            attest(
                verifier_url,
                tcti,
                state_file=state,
                event_log=_event_log(eventlog, tcti, DEFAULT_EVENTLOG),
            )
        client = VerifierClient(verifier_url, _read_token(token_file))
        outcome = client.check(attester_id, max_age=age, policy=policy)
        if junit is not None:
            junit.write_bytes(junit_xml(outcome, verifier_url))
        if as_json:
            click.echo(json.dumps(outcome.to_json(), indent=2))
        else:
            verdict = "PASS" if outcome.ok else "FAIL"
            click.echo(f"{verdict} attester {attester_id}: {outcome.status} ({outcome.result_at})")
            for reason in outcome.reasons:
                click.echo(f"  - {reason}")
        if not outcome.ok:
            sys.exit(1)


def _event_log(path: Path | None, tcti: str, default: Path) -> bytes | None:
    if path is not None:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--eventlog {path}: {exc}") from None
    if tcti.startswith("device:") and default.exists():
        return default.read_bytes()
    return None
