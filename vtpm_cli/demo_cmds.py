"""`vtpm demo` (the README's first command) and `vtpm vm boot`.

`vtpm vm boot` boots a real VM (QEMU q35 + OVMF + systemd-boot, TCG) with a
vTPM attached, lets the guest create its EK and AK, asks it for a quote over
the boot PCRs with a fresh nonce and writes what a verifier needs into an
output directory. See docs/vm.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from verifier.attester import AttesterState
from verifier.guest_attester import GuestAttestation
from vtpm_core.authenticode import authenticode_digest
from vtpm_core.errors import ConfigError, VerificationError
from vtpm_core.store import VtpmStore
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.vm import (
    DEFAULT_CMDLINE,
    PROTOCOL_VERSION,
    GuestChannel,
    boot_guest,
    guest_esp,
    ima_cmdline,
    loader_entry,
    measured_load_options,
    validate_selection,
)

if TYPE_CHECKING:
    from verifier.agent import RoundOutcome

_DEFAULT_STORE = (
    Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    / "vtpm-trust"
    / "store"
)  # the same default as `vtpm create`
BOOT_PCRS = "sha256:0,1,2,3,4,5,6,7,8,9"
IMA_PCRS = "sha1:10+sha256:0,1,2,3,4,5,6,7,8,9,10"  # boot_aggregate: PCRs 0-9; both PCR 10 banks
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@contextlib.contextmanager
def _vtpm(name: str, store_path: Path, state: Path | None) -> Iterator[SwtpmProcess]:
    """The vTPM for the VM: NAME from the store, or a bare swtpm state directory."""
    sock_dir = Path(tempfile.mkdtemp(prefix="vtpm-vm-swtpm-"))  # short unix socket paths
    try:
        if state is not None:
            with SwtpmProcess(state, transport="qemu", socket_dir=sock_dir) as tpm:
                yield tpm
        else:
            store = VtpmStore.open(store_path)
            with store.running(name, transport="qemu", socket_dir=sock_dir) as tpm:
                yield tpm
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _vm_boot(
    name: str,
    kernel: Path | None,
    initrd: Path | None,
    secure_boot: bool,
    cmdline: str,
    state: Path | None,
    store_path: Path,
    out: Path | None,
    pcrs: str | None,
    timeout: float,
    as_json: bool,
    verifier: str | None = None,
    token_file: Path | None = None,
    policy: str | None = None,
    rounds: int | None = None,
    ima: bool = False,
) -> None:
    if not name or set(name) - _NAME_CHARS or name.startswith("."):
        raise ConfigError(f"bad VM name {name!r} (letters, digits, '.', '_', '-')")
    if pcrs is None:
        pcrs = IMA_PCRS if ima else BOOT_PCRS
    validate_selection(pcrs)
    if ima and not _selects_pcr10(pcrs):
        raise ConfigError(f"--ima needs PCR 10 in --pcrs (got {pcrs!r})")
    if ima:
        cmdline = ima_cmdline(cmdline)
    if rounds is not None and verifier is None:
        raise ConfigError("--rounds needs --verifier URL")
    echo = (lambda _line: None) if as_json else click.echo
    attest = _verifier_step(verifier, token_file, policy, rounds, echo, ima)
    loader_entry(cmdline)  # refuse a bad command line before any download or build
    out_dir = out if out is not None else Path.cwd() / f"vm-{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    esp = guest_esp(kernel=kernel, initrd=initrd, cmdline=cmdline, secure_boot=secure_boot)
    with (
        _vtpm(name, store_path, state) as tpm,
        boot_guest(tpm, out_dir / "run", esp=esp, timeout_s=timeout) as session,
    ):
        ident = session.channel.hello()
        nonce = secrets.token_bytes(32)
        quote = session.channel.quote(nonce, pcrs)
        # read after the quote: the list covers it (IMA lists an entry before extending)
        ima_list = session.channel.ima_list(0) if ima else None
        ready = session.channel.ready_after_s
        verdict = attest(session.channel) if attest is not None else None
    vtpm_source = str(state) if state is not None else f"{store_path} ({name})"
    files = {
        "ek_cert.der": ident.ek_cert_der or b"",
        "ek_ecc_cert.der": ident.ek_ecc_cert_der or b"",
        "ek.pub": ident.ek_public_tpm2b,
        "ak.pub": ident.ak_public_tpm2b,
        "ak.name": ident.ak_name,
        "nonce.bin": nonce,
        "quote.msg": quote.message,
        "quote.sig": quote.signature,
        "quote.pcrs": quote.pcrs_tpm2_tools,
        "eventlog.bin": quote.eventlog,
        "ima.bin": ima_list or b"",
    }
    for fname, data in files.items():
        if data:
            (out_dir / fname).write_bytes(data)
        elif (out_dir / fname).exists():
            os.unlink(out_dir / fname)
    pcr_values = quote.untrusted_pcr_values()
    (out_dir / "pcrs.json").write_text(
        json.dumps(
            {
                bank: {str(i): v.hex() for i, v in sorted(p.items())}
                for bank, p in pcr_values.items()
            },
            indent=1,
        )
        + "\n"
    )
    art = session.artifacts
    ima_info = _ima_summary(ima_list)
    summary = {
        "name": name,
        "protocol": PROTOCOL_VERSION,
        "secure_boot": secure_boot,
        "cmdline": cmdline,
        "vtpm": vtpm_source,
        "boot_seconds": round(ready or 0.0, 1),
        "vm_seconds": round(art.wall_seconds, 1) if art else None,
        "ek_cert": bool(ident.ek_cert_der),
        "ak_name": ident.ak_name.hex(),
        "pcrs": pcrs,
        "nonce": nonce.hex(),
        "eventlog_bytes": len(quote.eventlog),
        "ima": ima_info,
        "out": str(out_dir),
        "console": str(art.console_log) if art else None,
    }
    if isinstance(verdict, _AgentRun):
        (out_dir / "result.json").write_text(json.dumps(verdict.to_json(), indent=1) + "\n")
        summary["verifier"] = verdict.to_json()
    elif verdict is not None:
        (out_dir / "result.json").write_text(json.dumps(verdict.to_json(), indent=1) + "\n")
        summary["verifier"] = {
            k: verdict.to_json().get(k) for k in ("attester_id", "status", "policy", "timings")
        }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        _fail_unless_affirming(verdict)
        return
    sb = "on" if secure_boot else "off"
    on = ", IMA on" if ima else ""
    click.echo(f"vm {name}: guest ready after {summary['boot_seconds']} s (secure boot {sb}{on})")
    cert = f"{len(ident.ek_cert_der)} bytes" if ident.ek_cert_der else "none"
    click.echo(f"  EK certificate (NV 0x01C00002): {cert}")
    click.echo(f"  AK name: {ident.ak_name.hex()}")
    click.echo(f"  quote over {pcrs}, nonce {nonce.hex()}")
    click.echo(f"  firmware event log: {len(quote.eventlog)} bytes")
    if ima_list is not None and ima_info is not None:
        click.echo(
            f"  IMA list: {ima_info['entries']} entries, {len(ima_list)} bytes "
            "(ima.bin; vtpm ima replay ima.bin)"
        )
    click.echo(f"  written to {out_dir} (check with tpm2_checkquote -u ak.pub -m quote.msg ...)")
    if isinstance(verdict, _AgentRun):
        click.echo(
            f"verifier {verifier}: attester {verdict.attester_id}, "
            f"{len(verdict.rounds)} rounds, registered {verdict.registrations} time(s)"
        )
        _fail_unless_affirming(verdict)
    elif verdict is not None:
        _echo_verdict(verifier or "", verdict)
        _fail_unless_affirming(verdict)


@dataclass
class _AgentRun:
    """`--rounds N`: what the agent loop did against the guest's TPM."""

    attester_id: str | None
    registrations: int
    exit_status: int
    rounds: list[RoundOutcome] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "attester_id": self.attester_id,
            "registrations": self.registrations,
            "exit_status": self.exit_status,
            "rounds": [
                {"status": r.status, "state": r.state, "next_attestation_s": r.next_s}
                | ({"fault": r.fault, "detail": r.detail} if r.fault else {})
                for r in self.rounds
            ],
        }

    @property
    def affirming(self) -> bool:
        return (
            self.exit_status == 0
            and bool(self.rounds)
            and all(r.status == "affirming" for r in self.rounds)
        )


def _agent_rounds(
    url: str,
    token: str | None,
    assign: Callable[[AttesterState], None],
    rounds: int,
    echo: Callable[[str], None],
    ima: bool = False,
) -> Callable[[GuestChannel], _AgentRun]:
    """`--rounds N`: `vtpm agent`'s loop (verifier.agent.Agent) with the guest as its TPM."""
    from verifier.agent import Agent, AgentConfig
    from verifier.guest_attester import GuestBackend, GuestImaList

    def run(channel: GuestChannel) -> _AgentRun:
        backend = GuestBackend(
            channel,
            admin_token=token,
            on_registered=assign,
            ima=GuestImaList(channel) if ima else None,
        )
        agent = Agent(AgentConfig(url=url, tcti="guest", state_file=None), backend=backend)
        done: list[RoundOutcome] = []

        def seen(outcome: RoundOutcome) -> None:
            done.append(outcome)
            what = outcome.status or f"no verdict ({outcome.fault}: {outcome.detail or '-'})"
            n = len(done)
            echo(f"  round {n}: {what}, state {outcome.state}, next in {outcome.next_s:g} s")

        try:
            status = agent.run(rounds=rounds, on_round=seen)
        finally:
            agent.close()
        appraised = [r for r in done if r.fault is None]
        known = agent.attester
        return _AgentRun(
            known.attester_id if known else None, backend.registrations, status, appraised
        )

    return run


def _selects_pcr10(selection: str) -> bool:
    return any("10" in bank.split(":")[1].split(",") for bank in selection.split("+"))


def _ima_summary(data: bytes | None) -> dict[str, int] | None:
    """Entries and bytes of the guest's list; its template hashes checked (ParseError,
    VerificationError for a forged entry). The list is proven only by a verifier."""
    if data is None:
        return None
    from verifier.ima.parse import parse_list

    return {"entries": len(parse_list(data)), "bytes": len(data)}


def _verifier_step(
    verifier: str | None,
    token_file: Path | None,
    policy: str | None,
    rounds: int | None = None,
    echo: Callable[[str], None] = click.echo,
    ima: bool = False,
) -> Callable[[GuestChannel], GuestAttestation | _AgentRun] | None:
    """`--verifier`: the guest attests against the running service (checked before booting).

    With ``ima`` the evidence carries the guest's IMA entries when the challenge asks
    for them (the assigned policy has a runtime part)."""
    from verifier.guest_attester import (
        GuestImaList,
        assign_policy,
        check_loopback_url,
        check_verifier,
        guest_attest_steps,
    )

    if verifier is None:
        if token_file is not None or policy is not None:
            raise ConfigError("--token-file and --policy need --verifier URL")
        return None
    url = check_loopback_url(verifier)
    token: str | None = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--token-file {token_file}: {exc}") from None
        if not token:
            raise ConfigError(f"--token-file {token_file}: empty")
    if policy is not None and token is None:
        raise ConfigError("--policy needs the admin token (--token-file)")
    check_verifier(url)

    def assign(state: AttesterState) -> None:
        if policy is not None and token is not None:
            assign_policy(url, token, state.attester_id, policy)

    if rounds is not None:
        return _agent_rounds(url, token, assign, rounds, echo, ima)

    def run(channel: GuestChannel) -> GuestAttestation:
        listed = GuestImaList(channel) if ima else None
        return guest_attest_steps(channel, url, admin_token=token, on_registered=assign, ima=listed)

    return run


def _echo_verdict(url: str, verdict: GuestAttestation) -> None:
    res = verdict.result
    click.echo(f"verifier {url}: attester {verdict.state.attester_id}")
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in verdict.timings.items())
    click.echo(f"  {steps}")
    click.echo(f"  verdict: {res.get('status')} (policy {res.get('policy') or 'none'})")
    report = res.get("report") or {}
    ima = report.get("ima")
    if isinstance(ima, dict) and ima.get("appraised"):
        click.echo(
            f"  IMA: {ima.get('received')} entries sent from entry {ima.get('start_index')}, "
            f"{ima.get('proven')} proven by PCR 10, {ima.get('verified_count')} verified"
        )
    for fail in report.get("failures") or ():
        text = f"  FAIL {fail.get('rule')}: "
        event = fail.get("event")
        if isinstance(event, dict):
            text += f"event {event.get('index')} ({event.get('type')}, PCR {event.get('pcr')}): "
        text += str(fail.get("message"))
        shown = fail.get("expected") is not None or fail.get("actual") is not None
        if shown and str(fail.get("actual")) not in str(fail.get("message")):
            text += f" (expected {fail.get('expected')}, got {fail.get('actual')})"
        click.echo(text)
    for warn in report.get("warnings") or ():
        click.echo(f"  warning: {warn.get('message') if isinstance(warn, dict) else warn}")


def _fail_unless_affirming(verdict: GuestAttestation | _AgentRun | None) -> None:
    if isinstance(verdict, _AgentRun):
        if not verdict.affirming:
            seen = ", ".join(str(r.status) for r in verdict.rounds) or "none"
            raise VerificationError(
                "verdict",
                f"not every round was affirming (verdicts: {seen};"
                f" agent exit status {verdict.exit_status})",
            )
        return
    if verdict is not None and verdict.result.get("status") != "affirming":
        raise VerificationError(
            "verdict",
            f"the verifier's verdict is {verdict.result.get('status')}, not affirming",
        )


def _vm_build(
    kernel: Path | None, initrd: Path | None, secure_boot: bool, cmdline: str, as_json: bool
) -> None:
    loader_entry(cmdline)
    esp = guest_esp(kernel=kernel, initrd=initrd, cmdline=cmdline, secure_boot=secure_boot)
    options = (measured_load_options(cmdline) + "\0").encode("utf-16-le")
    expected = {
        "pcr4_bootloader_sha256": authenticode_digest(esp.bootloader.read_bytes()).hex(),
        "pcr4_kernel_sha256": authenticode_digest(esp.kernel.read_bytes()).hex(),
        "pcr9_initrd_sha256": hashlib.sha256(esp.initrd.read_bytes()).hexdigest(),
        "pcr9_pcr12_load_options_sha256": hashlib.sha256(options).hexdigest(),
    }
    info = {
        "esp": str(esp.path),
        "secure_boot": secure_boot,
        "bootloader": str(esp.bootloader),
        "kernel": str(esp.kernel),
        "initrd": str(esp.initrd),
        "cmdline": cmdline,
        "expected": expected,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"ESP image: {esp.path} (secure boot {'on' if secure_boot else 'off'})")
    for key, value in expected.items():
        click.echo(f"  {key}: {value}")


def _register_vm(cli: click.Group) -> None:
    @cli.group("vm")
    def vm() -> None:
        """Boot real VMs (QEMU + OVMF + systemd-boot) with a vTPM attached."""

    @vm.command("build")
    @click.option("--kernel", type=_FILE, help="EFI-stub kernel (default: Debian's, cached).")
    @click.option("--initrd", type=_FILE, help="Initramfs (default: the guest agent's, built).")
    @click.option("--secure-boot", is_flag=True, help="Sign with the snakeoil test key.")
    @click.option("--cmdline", default=DEFAULT_CMDLINE, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def build(
        kernel: Path | None, initrd: Path | None, secure_boot: bool, cmdline: str, as_json: bool
    ) -> None:
        """Build (or find in the cache) the guest's ESP and print what the boot will measure.

        The PCR4 values are the Authenticode digests of the exact systemd-boot
        and kernel files on the ESP, as OVMF logs them; a policy can name them.
        """
        _vm_build(kernel, initrd, secure_boot, cmdline, as_json)

    @vm.command("boot")
    @click.argument("name")
    @click.option("--kernel", type=_FILE, help="EFI-stub kernel (default: Debian's, cached).")
    @click.option("--initrd", type=_FILE, help="Initramfs with the guest agent (default: built).")
    @click.option("--secure-boot", is_flag=True, help="OVMF secure boot, snakeoil-signed ESP.")
    @click.option("--cmdline", default=DEFAULT_CMDLINE, show_default=True)
    @click.option(
        "--store",
        "store_path",
        type=click.Path(path_type=Path, file_okay=False),
        envvar="VTPM_STORE",
        default=_DEFAULT_STORE,
        show_default=True,
        help="vTPM store holding NAME (env VTPM_STORE); see `vtpm create`.",
    )
    @click.option(
        "--state",
        type=click.Path(file_okay=False, path_type=Path),
        help="Use this bare (unencrypted) swtpm state directory instead of the store.",
    )
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output dir.")
    @click.option(
        "--pcrs",
        help=f"tpm2-tools PCR selection [default: {BOOT_PCRS}; with --ima: {IMA_PCRS}].",
    )
    @click.option("--timeout", default=240.0, show_default=True, help="Hard limit, seconds.")
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
    @click.option(
        "--verifier",
        metavar="URL",
        help="Attest against this running verifier (http://127.0.0.1:PORT).",
    )
    @click.option(
        "--token-file",
        type=_FILE,
        help="The verifier's admin token (needed for --policy).",
    )
    @click.option("--policy", help="Assign this verifier policy to the attester before quoting.")
    @click.option(
        "--rounds",
        type=click.IntRange(1, 100000),
        help="With --verifier: run `vtpm agent`'s loop for N appraised rounds on the "
        "verifier's cadence (the guest's TPM as the agent's), then power off.",
    )
    @click.option(
        "--ima",
        is_flag=True,
        help="Boot with IMA measuring into PCR 10 (vtpm.ima=1) and fetch its list (ima.bin).",
    )
    def boot(
        name: str,
        kernel: Path | None,
        initrd: Path | None,
        secure_boot: bool,
        cmdline: str,
        store_path: Path,
        state: Path | None,
        out: Path | None,
        pcrs: str | None,
        timeout: float,
        as_json: bool,
        verifier: str | None,
        token_file: Path | None,
        policy: str | None,
        rounds: int | None,
        ima: bool,
    ) -> None:
        """Boot VM NAME with its vTPM, quote its boot PCRs with a fresh nonce, power it off.

        The vTPM NAME comes from the store (create it with `vtpm create NAME`,
        which puts the CA's EK certificates in NV), or from --state.

        Writes ek_cert.der, ek.pub, ak.pub, ak.name, nonce.bin, quote.msg,
        quote.sig, quote.pcrs (tpm2-tools formats), pcrs.json (the quoted
        values as {bank: {pcr: hex}}, unverified) and eventlog.bin to the
        output directory (default ./vm-NAME), and the serial console to
        run/console.log there.

        With --verifier, the guest also attests against that running verifier
        (register with the EK certificate, activate, challenge, quote,
        evidence with the firmware log), the result goes to result.json and
        the exit status is 1 unless the verdict is affirming.

        With --ima, the kernel command line gets vtpm.ima=1: the guest loads
        an IMA policy first thing (programs executed, files mapped executable,
        kernel modules; template ima-sig, SHA-256), the quote covers PCR 10
        (default --pcrs sha1:10+sha256:0-10) and the measurement list read
        after it is written to ima.bin (binary_runtime_measurements).

        With --rounds N as well, the host runs the continuous-attestation
        agent's loop (registration once, rounds on the cadence the verifier
        answers with, backoff through outages, fault reports) with the guest's
        TPM, for N appraised rounds; exit 1 unless every one was affirming.
        --timeout must cover the boot and the rounds.
        """
        _vm_boot(
            name,
            kernel,
            initrd,
            secure_boot,
            cmdline,
            state,
            store_path,
            out,
            pcrs,
            timeout,
            as_json,
            verifier,
            token_file,
            policy,
            rounds,
            ima,
        )


def _register_demo(cli: click.Group) -> None:
    @cli.command("demo")
    @click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("demo-home"),
        show_default=True,
        help="Demo directory (deleted and recreated on every run).",
    )
    @click.option("--once", is_flag=True, help="Exit after the two attestations.")
    def demo(home: Path, once: bool) -> None:
        """CA + verifier + vTPM + measured boot: an affirming and a contraindicated attestation.

        Starts a CA and a verifier on free 127.0.0.1 ports, creates a vTPM
        with CA-issued EK certificates, simulates a good boot, learns a
        policy, attests (affirming), then boots a tampered kernel and attests
        again (contraindicated, the failing rule explained). Leaves the
        services running until Ctrl-C unless --once. See docs/demo.md.
        """
        import signal
        import threading

        from vtpm_cli.demo import run_demo

        def on_term(_signum: int, _frame: object) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            run_demo(
                home,
                once=once,
                echo=lambda line: click.echo(line),
                wait_forever=threading.Event().wait,
            )
        except KeyboardInterrupt:
            click.echo("interrupted; services stopped", err=True)
            raise SystemExit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group."""
    _register_vm(cli)
    _register_demo(cli)
