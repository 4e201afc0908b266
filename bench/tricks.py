"""What each round-1 speed trick still buys, against its plain version, in one run.

Run: .venv/bin/python bench/tricks.py [--runs N]

(a) class swap (verifier/eventlog/_frozen.py): Event, ReplayedEvent and
    AppliedQuirk were built by filling an "unfrozen twin" and re-classing it,
    against the frozen dataclass constructor; timed here on building the 1,215
    corpus Events (0.43 vs 1.02 ms) and on ``vtpm eventlog replay``'s work with
    every ReplayedEvent built (typical log 0.96 vs 1.20 ms; 19 corpus logs 12.9
    vs 20.7 ms). Removed (issue 19): its section went with it.
(b) spliced DER in the CA: ``EkIssuance.build_tbs`` (TBS from cut template
    parts) against the TBS of ``EkIssuance.build`` (cryptography's
    CertificateBuilder, signed by the stand-in key as a plain CA would), next to
    one whole in-process issuance (parse, template check, build, lint, record,
    sign, store). (The spliced P-256 SubjectPublicKeyInfo of ca/ek.py was timed
    here against cryptography's encoder: 18.4 vs 19.7 us per EK load; removed.)
(c) the C record walk and replay (verifier/eventlog/_native.c): parse with the
    walk against parse with it off (``parse.MAX_BANKS = 0``: every record through
    ``_parse_agile_fast``), and ``_native.extend_bank`` against
    ``replay.extend_in_python``, on every corpus log and on a ~1 MiB synthetic log
    (the corpus's RHEL 8 log repeated, as bench/eventlog.py builds it).

"Noticed" is judged against what a user waits for: a ``vtpm`` process (about
0.1-0.2 s) or one service request (printed alongside). Medians of ``--runs``.

Decisions from the run of 2026-12-07 (``--runs 9``; the numbers are in each
trick's docstring): the spliced TBS (11.7x, ~30% of an issuance) and the C walk
and replay (8.7x parse on the typical log, 26x on 1 MiB) stay; the spliced P-256
SPKI (1.3 us of a 310 us issuance) and the class swap (0.13-0.24 ms per typical
log with every event built, ~0.2% of a ``vtpm eventlog replay`` process) went,
so only the tricks kept are timed here now.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.eventlog import CORPUS, SOURCE, build_large_log  # noqa: E402
from bench.issue import PASSPHRASE, ek_variants, real_ecc_ek  # noqa: E402
from ca.der import tbs_of  # noqa: E402
from ca.ek import CertifiableEk  # noqa: E402
from ca.home import CaHome  # noqa: E402
from ca.issuance import IssueRequest  # noqa: E402
from verifier.eventlog import EventLog, parse, replay  # noqa: E402
from vtpm_core.errors import ParseError  # noqa: E402


def median(fn: Callable[[], object], runs: int, inner: int = 1) -> float:
    """Median seconds of one call of ``fn`` (each sample: ``inner`` calls)."""
    fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - started) / inner)
    return statistics.median(samples)


def line(what: str, trick: float, plain: float, unit: str = "ms") -> None:
    scale = {"ms": 1e3, "us": 1e6}[unit]
    print(
        f"  {what:<44} trick {trick * scale:9.2f} {unit}  plain {plain * scale:9.2f} {unit}  "
        f"plain/trick {plain / trick:5.2f}x  saves {(plain - trick) * 1e3:7.3f} ms"
    )


def corpus_logs() -> list[bytes]:
    out = []
    for path in sorted((CORPUS / "eventlogs").glob("*.bin")):
        data = path.read_bytes()
        try:
            EventLog.parse(data)
        except ParseError:
            continue  # (a deliberately broken sample)
        out.append(data)
    return out


# -- (b) -----------------------------------------------------------------------


def bench_spliced_der(runs: int) -> None:
    print("(b) spliced DER in the CA vs cryptography's builders")
    with tempfile.TemporaryDirectory(prefix="bench-tricks-") as tmp:
        work = Path(tmp)
        template = real_ecc_ek(work)
        keys = ek_variants(template, 40 + runs * 20)
        CaHome(work / "ca").init(passphrase=PASSPHRASE, key_type="ecdsa-p256")
        ca = CaHome(work / "ca").open(passphrase=PASSPHRASE)
        try:
            issuance = ca.issuance
            ek = CertifiableEk.load(keys[0][0], allow_bare_key=False)
            request = IssueRequest(ek=ek, vm_id=uuid.uuid4(), vm_name="bench")
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)
            after = now + dt.timedelta(days=3650)
            serial = issuance.serial()
            assert issuance.build_tbs(request, now, now, after, serial) == tbs_of(
                issuance.build(request, now, now, after, serial)
            )
            trick = median(lambda: issuance.build_tbs(request, now, now, after, serial), runs, 200)
            plain = median(
                lambda: tbs_of(issuance.build(request, now, now, after, serial)), runs, 200
            )
            line("TBSCertificate (P-256 EK)", trick, plain, "us")
            fresh = iter(keys[2:])

            def issue_one() -> None:
                data = next(fresh)[0]
                issuance.issue(
                    IssueRequest(
                        ek=CertifiableEk.load(data, allow_bare_key=False),
                        vm_id=uuid.uuid4(),
                        vm_name="bench",
                    )
                )

            whole = median(issue_one, runs, 20)
            print(
                f"  one whole in-process issuance: {whole * 1e3:.2f} ms ({1 / whole:.0f} certs/s)"
            )
        finally:
            ca.close()


# -- (c) -----------------------------------------------------------------------


@contextmanager
def walk_off() -> Iterator[None]:
    saved = parse.MAX_BANKS
    parse.MAX_BANKS = 0  # walk = len(algorithms) <= 0: never
    try:
        yield
    finally:
        parse.MAX_BANKS = saved


def _replay_columns(data: bytes) -> Callable[[bool], object]:
    log = EventLog.parse(data)
    r = log.records
    columns = dict(zip(r.names, r.digests, strict=True))

    def run(native: bool) -> object:
        out = []
        for alg in log.algorithms:
            column = columns.get(alg.name)
            if not alg.computable or column is None:
                continue
            if native:
                out.append(
                    replay.extend_bank(alg.openssl_name, r.pcrs, r.types, list(column), 3, {})
                )
            else:
                out.append(replay.extend_in_python(alg, r.pcrs, r.types, column, {}))
        return out

    assert run(True) == run(False)
    return run


def bench_native(logs: list[bytes], large: bytes, runs: int) -> None:
    print("(c) C record walk and replay (verifier/eventlog/_native.c) vs Python")
    for name, inputs, inner in (
        (f"{len(logs)} corpus logs", logs, 5),
        ("typical log (gce_rhel8)", [SOURCE.read_bytes()], 50),
        (f"synthetic {len(large) >> 10} KiB log", [large], 1),
    ):
        trick = median(lambda inputs=inputs: [EventLog.parse(d) for d in inputs], runs, inner)
        with walk_off():
            plain = median(lambda inputs=inputs: [EventLog.parse(d) for d in inputs], runs, inner)
        line(f"parse, {name}", trick, plain)
        replays = [_replay_columns(d) for d in inputs]
        trick = median(lambda replays=replays: [r(True) for r in replays], runs, inner)
        plain = median(lambda replays=replays: [r(False) for r in replays], runs, inner)
        line(f"replay (all banks), {name}", trick, plain)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    logs = corpus_logs()
    large = build_large_log(1024 * 1024)
    print(f"runs: {args.runs} (medians); corpus: {len(logs)} parseable logs")
    bench_spliced_der(args.runs)
    bench_native(logs, large, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
