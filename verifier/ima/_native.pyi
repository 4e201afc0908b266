"""IMA list walk, PCR 10 replay and policy lookup in C (verifier/ima/_native.c).

Built by ``pip install`` (setup.py). ``verifier.ima.parse.parse_binary`` walks
the entries it can with :func:`walk_entries` and reads the rest with its plain
reader; ``ImaList.extend_pcr10`` and ``ImaList.unmatched`` (used by
``verifier.ima.appraise.advance`` and ``appraise_entries``) replay and look up
the walked entries here and make Python entries only for those the full rules
must see. None of the functions raises for any content of a list, only for
arguments a caller got wrong (ValueError, LookupError for an unknown digest).

Kept because: bench/ima.py (see docs/ima.md "Performance" for the run's numbers)
full appraisal of 50,000 binary entries against a 50,000-digest policy went
from ~400 ms (the plain reader and loops) to 22 ms, 24x Keylime's 534 ms in the
same run; a full list is what a verifier appraises after every attester reboot.
Without the built module the plain path runs (same results).

Spans: ``SPAN_WORDS`` little-endian u32 per entry: entry offset, template-data
start, template-data length, the length of its (d-ng, n-ng) head (0: none),
PCR, info (template id in WALKED_TEMPLATES, 0xFF for an entry made by the plain
reader; | INFO_VIOLATION; | 0x200 a non-empty sig field; | INFO_SIDE: the
template data is in the side buffer, not the list).
"""

SPAN_WORDS: int
INFO_VIOLATION: int
INFO_SIDE: int
MAX_TEMPLATES: int
MAX_BANKS: int

def walk_entries(
    data: bytes,
    pos: int,
    count: int,
    max_entries: int,
    template_hash_size: int,
    template_hash_name: str,
    max_template_data: int,
    templates: tuple[tuple[bytes, bytes], ...],
    prefixes: tuple[tuple[bytes, int], ...],
    /,
) -> tuple[int, bytes]:
    """From ``pos`` (``count`` entries already read), the spans of the entries the plain
    reader would accept and return unchanged: a template of ``templates`` with every
    field in shape, the template hash equal to the hash of the data or all zeros, fewer
    than ``max_entries`` in all. Returns (offset of the first entry not taken, spans)."""

def extend_entries(
    data: bytes,
    side: bytes,
    spans: bytes,
    lo: int,
    hi: int,
    template_hash_size: int,
    sha1_padded: bool,
    banks: tuple[str, ...],
    reuse_template_hash: tuple[bool, ...],
    start: tuple[bytes, ...],
    targets: tuple[bytes, ...],
    /,
) -> tuple[int, tuple[bytes, ...]]:
    """PCR := H(PCR || value) per bank over spans lo..hi, value the template digest in
    the bank (or SHA-1 zero-padded), all ones for a violation, the listed template
    hash itself where ``reuse_template_hash``; stops after the first entry where every
    bank equals its target. Returns (entries taken then, or -1; the values)."""

def unmatched_entries(
    data: bytes,
    spans: bytes,
    lo: int,
    hi: int,
    pcr: int,
    eligible: bytes,
    keys: set[bytes] | frozenset[bytes],
    /,
) -> list[int]:
    """The span indices in lo..hi not passed by the lookup: passed is an entry of ``pcr``,
    not a violation nor made by the plain reader, whose template's ``eligible`` byte is
    1 (or 2 and no signature) and whose (d-ng, n-ng) head bytes are in ``keys``."""
