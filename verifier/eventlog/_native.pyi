"""Event-log record walk and PCR replay in C (verifier/eventlog/_native.c).

Built by ``pip install`` (setup.py); the parse and replay code in this package
calls it for the common case and keeps the Python readers for everything else.
Neither function raises for any content of a log, only for arguments a caller
got wrong (ValueError; non-int PCRs, types or ids included: none is read
through ``__index__``).
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
