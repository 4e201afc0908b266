"""atheris fuzz target for the TCG event-log parser, replay and decoders.

Run:  .venv/bin/python fuzz/fuzz_eventlog.py [corpus_dir] -max_total_time=60
Seed it with ../shared/corpus/eventlogs. The only exceptions allowed out of
the parser are ParseError and (for verify) VerificationError; anything else
is a bug and crashes the fuzzer.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from verifier.eventlog import EventLog, Limits
    from vtpm_core.errors import ParseError, VerificationError

# small limits keep each input cheap
LIMITS = Limits(max_log_bytes=256 * 1024, max_events=4096, max_event_data=64 * 1024)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    try:
        log = EventLog.parse(data, LIMITS)
    except ParseError:
        return
    try:
        replayed = log.verify(log.replay())
    except VerificationError:
        return
    for event in replayed.events:
        _ = (event.decoded, event.data_verified, event.warnings)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
