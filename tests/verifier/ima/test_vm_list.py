"""A real VM's IMA list with the quote that covers it (tests/data/ima/vtpm-guest/).

From `vtpm vm boot web1 --state bare-tpm --ima` (Debian's kernel 6.1.0-57,
this project's guest; tests/data/ima/README.md): the quote over PCRs 0-10
(SHA-256) and PCR 10 (SHA-1) and ``binary_runtime_measurements`` read right
after it. Checked without a VM: the quote verifies, the firmware log replays
to PCRs 0-9, ``boot_aggregate`` is SHA-256 over the quoted PCRs 0-9, the
list replays to the quoted PCR 10 in both banks (and Keylime's running hash
agrees), and the incremental appraisal proves every entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from verifier.eventlog import EventLog
from verifier.ima.appraise import advance
from verifier.ima.boot_aggregate import boot_aggregates
from verifier.ima.learn import build_policy, learn_from_entries
from verifier.ima.parse import parse_list
from verifier.ima.replay import ExtendMode, extend_values, replay
from verifier.quote import PcrValues, Public, VerifiedQuote, verify_quote

DATA = Path(__file__).resolve().parents[2] / "data" / "ima" / "vtpm-guest"
BANKS = ("sha1", "sha256")


@pytest.fixture(scope="module")
def quote() -> VerifiedQuote:
    return verify_quote(
        Public.load((DATA / "ak.pub").read_bytes()),
        (DATA / "quote.msg").read_bytes(),
        (DATA / "quote.sig").read_bytes(),
        PcrValues.load((DATA / "quote.pcrs").read_bytes()),
        (DATA / "nonce.bin").read_bytes(),
    )


def test_vm_list_matches_its_quote(quote: VerifiedQuote) -> None:
    pcrs = quote.pcrs.as_mapping()
    assert sorted(pcrs["sha256"]) == list(range(11)) and sorted(pcrs["sha1"]) == [10]
    log = EventLog.parse((DATA / "eventlog.bin").read_bytes())
    log.verify({"sha256": {i: v for i, v in pcrs["sha256"].items() if i < 10}})

    entries = parse_list((DATA / "ima.bin").read_bytes())
    assert len(entries) == 46
    assert entries[0].path == "boot_aggregate"
    by_hand = hashlib.sha256(b"".join(pcrs["sha256"][i] for i in range(10))).digest()
    assert entries[0].digest == by_hand
    pcr10 = {b: pcrs[b][10] for b in BANKS}
    assert replay(entries, BANKS) == pcr10
    # what the guest ran: modules (MODULE_CHECK), tpm2 and its libraries (BPRM_CHECK,
    # FILE_MMAP), busybox; all ima-sig without signatures (tmpfs has no security.ima)
    paths = [e.path for e in entries]
    assert sum(p.startswith("/lib/modules/") for p in paths) == 6
    assert {"/usr/bin/tpm2", "/lib64/ld-linux-x86-64.so.2", "/bin/busybox"} <= set(paths)
    assert all(e.template_name == "ima-sig" and not e.signature for e in entries)

    from tests.verifier.ima import keylime_oracle  # noqa: F401, I001  (stubs gpg first)
    from keylime.common import algorithms
    from keylime.ima import ima

    lines = [e.to_ascii() for e in entries]
    for bank in BANKS:
        theirs, _ = ima.process_measurement_list(None, lines, hash_alg=algorithms.Hash(bank))
        assert theirs == pcr10[bank].hex()

    policy = build_policy(learn_from_entries(entries), name="vm-learned")
    step = advance(
        None, reset_count=quote.clock_info.reset_count, start_index=0, entries=entries,
        quoted_pcr10=pcr10, policy=policy, extend_values=extend_values(ExtendMode.PER_BANK, BANKS),
        boot_aggregates=boot_aggregates(pcrs),
    )  # fmt: skip
    assert step.ok and step.proven == 46 and step.pending == 0
    # the older kernels' SHA-1-padded extend does not reach this kernel's SHA-256 value
    assert replay(entries, ["sha256"], mode=ExtendMode.SHA1_PADDED)["sha256"] != pcr10["sha256"]
