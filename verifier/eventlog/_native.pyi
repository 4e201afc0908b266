"""Event-log record walk and PCR replay in C (verifier/eventlog/_native.c).

Built by ``pip install`` (setup.py); the parse and replay code in this package
calls it for the common case and keeps the Python readers for everything else.
Neither function raises for any content of a log, only for arguments a caller
got wrong (ValueError; non-int PCRs, types or ids included: none is read
through ``__index__``).

Kept (bench/tricks.py, 2026-12-07, medians of 9, against the Python readers with
the walk off and ``replay.extend_in_python``): parse 0.04 ms vs 0.35 ms (8.7x) and
replay 0.05 vs 0.19 ms on the typical 83-event log, 2.0 vs 6.9 ms parse over the 19
corpus logs, 0.5 vs 13.3 ms parse (26x) and 1.4 vs 5.5 ms replay on a 1 MiB log.
The ~0.45 ms per typical log is a sixth of a server-side attestation (~2.4 ms at
the measured 830/s on 2 workers) and ~17 ms per MiB of a large physical log: a
service's rate notices it, a single ``vtpm eventlog replay`` process does not.
"""

MAX_BANKS: int
"""The most banks per record walk_records takes (more: a ValueError)."""

def walk_records(
    data: bytes,
    offset: int,
    stop_at: int,
    alg_ids: tuple[int, ...],
    digest_sizes: tuple[int, ...],
    max_records: int,
    max_event_data: int,
    max_pcr: int,
    marker_type: int,
    marker: bytes,
    offsets: list[int],
    ends: list[int],
    data_starts: list[int],
    pcrs: list[int],
    types: list[int],
    digests: list[list[bytes]],
    /,
) -> tuple[int, bool]:
    """Append each TCG_PCR_EVENT2 record from ``offset`` to the columns while it lists
    every bank once in ``alg_ids`` order, its PCR is <= ``max_pcr``, its eventSize is
    <= ``max_event_data`` and the record ends within ``data``; stop before ``stop_at``
    and when ``offsets`` holds ``max_records``. Returns the offset of the first record
    not taken and whether a taken record is ``marker_type`` in PCR 0 with data
    starting with ``marker`` (the StartupLocality event)."""

def extend_bank(
    openssl_name: str,
    pcrs: list[int],
    types: list[int],
    digests: list[bytes | None],
    skip_type: int,
    initial: dict[int, bytes],
    /,
) -> dict[int, bytes]:
    """PCR := H(PCR || digest) for each event whose type is not ``skip_type`` and whose
    digest is not None, from ``initial`` (other PCRs from zeros); every PCR extended or
    in ``initial``, by index. LookupError if OpenSSL has no digest ``openssl_name``."""
