"""atheris fuzz target: the C record walk and replay (verifier/eventlog/_native.c)
against the Python readers, on any input.

Run:  .venv/bin/python fuzz/fuzz_native.py [corpus_dir] -max_total_time=60
Seed it with ../shared/corpus/eventlogs. It fails on any difference between
parsing with and without the walk (columns, StartupLocality, quirks, the
ParseError's message) and between the C and hashlib replays. For memory errors,
run it against a build with AddressSanitizer (docs/eventlog.md, "The C part").
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from verifier.eventlog import EventLog, Limits, parse
    from verifier.eventlog.replay import extend_in_python, replay_log
    from vtpm_core.errors import ParseError

LIMITS = Limits(max_log_bytes=256 * 1024, max_events=4096, max_event_data=64 * 1024)


def _outcome(data: bytes) -> object:
    try:
        log = EventLog.parse(data, LIMITS)
    except ParseError as exc:
        return str(exc)
    r = log.records
    return (r.offsets, r.ends, r.data_starts, r.pcrs, r.types, r.digests, log.quirks)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    native = _outcome(data)
    walk = parse.MAX_BANKS
    parse.MAX_BANKS = 0  # (this process only: the Python readers)
    try:
        python = _outcome(data)
    finally:
        parse.MAX_BANKS = walk
    if native != python:
        raise AssertionError(f"walk and Python readers differ:\n{native!r}\n{python!r}")
    if isinstance(native, str):
        return
    log = EventLog.parse(data, LIMITS)
    r, locality = log.records, log.pcr0_locality
    replayed = replay_log(log)
    for alg, column in zip(log.algorithms, r.digests, strict=True):
        if not alg.computable:
            continue
        initial = {}
        if locality is not None:
            initial[0] = bytes(alg.digest_size - 1) + bytes([locality])
        if replayed[alg.name] != extend_in_python(alg, r.pcrs, r.types, column, initial):
            raise AssertionError(f"C and hashlib replays of {alg.name} differ")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
