"""Incremental IMA appraisal against real quotes of PCR 10 (swtpm, tpm2-tools).

A fresh swtpm's PCR 10 is extended, SHA-1 and SHA-256 banks, with the
per-bank template digests of a real published list
(tests/data/ima/embrave-rpi-ima-ng.ascii), in three parts as a kernel would
while the VM runs; after each part tpm2_quote signs PCR 10 with a fresh
nonce, the quote is verified, and the part (binary, as the attester sends
it) is appraised from the stored state. The TPM's resetCount is the
quote's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import Tools
from verifier.ima.appraise import ImaProgress, ImaStep, advance
from verifier.ima.entries import ImaEntry
from verifier.ima.parse import parse_list
from verifier.ima.policy import RuntimePolicy
from verifier.ima.replay import ExtendMode, extend_values
from verifier.quote import verify_quote
from vtpm_core.errors import VerificationError
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.tpm import PcrValues, Public

DATA = Path(__file__).resolve().parents[2] / "data" / "ima"
BANKS = ("sha1", "sha256")
_ALGS = {"sha1": 0x0004, "sha256": 0x000B}


def _extend(tpm: SwtpmProcess, entries: tuple[ImaEntry, ...]) -> None:
    """What the kernel does for each entry (ima_pcr_extend), through TPM2_PCR_Extend."""
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA

    with tpm.esapi() as esapi:
        for entry in entries:
            values = []
            for bank in BANKS:
                ha = TPMT_HA(hashAlg=TPM2_ALG(_ALGS[bank]))
                setattr(ha.digest, bank, entry.template_digest(bank))
                values.append(ha)
            esapi.pcr_extend(ESYS_TR.PCR10, TPML_DIGEST_VALUES(values))


class _Quoter:
    def __init__(self, tools: Tools) -> None:
        self.tools = tools
        self.n = 0
        tools.run("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
        tools.run(
            "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256",
            "-s", "rsassa", "-u", "ak.pub", "-n", "ak.name",
        )  # fmt: skip

    def quote(self) -> tuple[int, dict[str, bytes]]:
        """(resetCount, quoted PCR 10 per bank), from a verified quote."""
        self.n += 1
        nonce = hashlib.sha256(b"nonce %d" % self.n).digest()
        stem = f"q{self.n}"
        self.tools.run(
            "tpm2_quote", "-c", "ak.ctx", "-l", "sha1:10+sha256:10", "-q", nonce.hex(),
            "-m", f"{stem}.msg", "-s", f"{stem}.sig", "-o", f"{stem}.pcrs", "-g", "sha256",
        )  # fmt: skip
        cwd = self.tools.cwd
        verified = verify_quote(
            Public.load((cwd / "ak.pub").read_bytes()),
            (cwd / f"{stem}.msg").read_bytes(),
            (cwd / f"{stem}.sig").read_bytes(),
            PcrValues.load((cwd / f"{stem}.pcrs").read_bytes()),
            nonce,
        )
        pcr10 = {b: verified.pcrs.value(b, 10) for b in BANKS}
        return verified.clock_info.reset_count, pcr10


def _binary(entries: tuple[ImaEntry, ...]) -> bytes:
    return b"".join(e.to_bytes() for e in entries)


@pytest.fixture
def published() -> tuple[ImaEntry, ...]:
    return parse_list((DATA / "embrave-rpi-ima-ng.ascii").read_bytes())


def _policy(entries: tuple[ImaEntry, ...], leave_out: str | None = None) -> RuntimePolicy:
    return RuntimePolicy(
        digests={e.path: {(e.digest_algo, e.digest)} for e in entries if e.path != leave_out}
    )


def test_deltas_against_real_quotes(
    swtpm: SwtpmProcess, tools: Tools, published: tuple[ImaEntry, ...]
) -> None:
    quoter = _Quoter(tools)
    policy = _policy(published)
    extend = extend_values(ExtendMode.PER_BANK, BANKS)
    parts = (published[:10], published[10:20], published[20:])
    state: ImaProgress | None = None
    for part in parts:
        _extend(swtpm, part)
        reset, pcr10 = quoter.quote()
        start = 0 if state is None else state.count
        delta = parse_list(_binary(part), offset_index=start)
        step = advance(
            state, reset_count=reset, start_index=start, entries=delta, quoted_pcr10=pcr10,
            policy=policy, extend_values=extend,
        )  # fmt: skip
        assert step.ok and step.proven == len(part) and step.pending == 0
        state = ImaProgress.parse(step.state.to_bytes())  # what the verifier stores
        assert dict(state.pcr10) == pcr10
    assert state is not None and state.count == len(published)
    assert len(state.to_bytes()) == 107


def test_real_quote_refuses_gap_reorder_replay_and_names_the_file(
    swtpm: SwtpmProcess, tools: Tools, published: tuple[ImaEntry, ...]
) -> None:
    quoter = _Quoter(tools)
    extend = extend_values(ExtendMode.PER_BANK, BANKS)
    head, tail = published[:15], published[15:]
    _extend(swtpm, head)
    reset, pcr10 = quoter.quote()
    policy = _policy(published, leave_out="/usr/bin/kmod")
    first = advance(
        None, reset_count=reset, start_index=0, entries=parse_list(_binary(head)),
        quoted_pcr10=pcr10, policy=policy, extend_values=extend,
    )  # fmt: skip
    assert first.ok
    state = first.state
    _extend(swtpm, tail)
    reset, pcr10 = quoter.quote()

    def step(entries: tuple[ImaEntry, ...], start: int = 15) -> ImaStep:
        return advance(
            state, reset_count=reset, start_index=start, entries=entries, quoted_pcr10=pcr10,
            policy=policy, extend_values=extend,
        )  # fmt: skip

    with pytest.raises(VerificationError, match="delta starts at entry 16"):
        step(tail[1:], start=16)  # a gap
    with pytest.raises(VerificationError, match="no prefix of the 12 entries"):
        step((tail[1], tail[0], *tail[2:]))  # reordered
    with pytest.raises(VerificationError, match="no prefix of the 11 entries"):
        step(tail[:-1])  # one entry held back: the quote is past the list
    with pytest.raises(VerificationError, match="delta starts at entry 0"):
        step(head, start=0)  # the verified part sent again
    with pytest.raises(VerificationError, match="no prefix of the 15 entries"):
        step(head)  # ... or relabelled as the delta

    result = step(parse_list(_binary(tail), offset_index=15))
    assert not result.ok
    (failure,) = result.appraisal.failures
    assert (failure.path, failure.reason) == ("/usr/bin/kmod", "path not in the policy")
    assert failure.index == next(e.index for e in published if e.path == "/usr/bin/kmod")
