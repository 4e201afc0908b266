"""A real VM with IMA on: its measurement list proven by quotes of PCR 10 and appraised.

One boot (Debian's kernel, our initramfs, ``vtpm.ima=1`` on the command
line, so the guest loads its IMA policy first thing). In that boot: quote
PCRs 0-10 (SHA-256) and PCR 10 (SHA-1), fetch the whole
``binary_runtime_measurements``; run a copy of busybox with bytes appended
(a program no policy knows), quote again, fetch only the new bytes.

The same boot also attests through the running verifier (`vtpm verifier
serve`, the HTTP evidence API with the IMA delta): a policy made of the boot
files plus a runtime part learned from the list is affirming; after the
unlisted program the relay sends only the new entries and the verdict is
contraindicated, naming the copy, as many times as it is asked.

Host-side, with independent checks beside the project's code: tpm2_checkquote
for the quoted values; the boot_aggregate entry recomputed by hand from the
quoted PCRs 0-9; the measured digests of busybox and tpm2 equal to the host
files put into the initramfs; Keylime 7.14.3's running hash and verdicts on
the same lines. Then the pure appraisal API: a policy learned from the first
list passes it (every entry proven by the quote in both banks), and the
delta fails naming the copy's path and its digest.
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.vm.conftest import (
    GuestImages,
    ProvisionedVtpm,
    VmVerifier,
    files_policy,
    upload_and_assign,
)
from verifier.guest_attester import GuestImaList, guest_attest_steps
from verifier.ima.appraise import advance
from verifier.ima.boot_aggregate import boot_aggregates
from verifier.ima.entries import ImaEntry
from verifier.ima.learn import build_policy, learn_from_entries
from verifier.ima.parse import parse_list
from verifier.ima.replay import ExtendMode, extend_values, replay
from verifier.quote import PcrValues, Public, verify_quote
from vtpm_core.errors import TpmError, VerificationError
from vtpm_core.swtpm import SwtpmProcess
from vtpm_core.vm import GuestChannel, QemuVm, ima_cmdline

pytestmark = pytest.mark.vm

SELECTION = "sha1:10+sha256:0,1,2,3,4,5,6,7,8,9,10"
BANKS = ("sha1", "sha256")
UNLISTED = "untrusted"


@dataclass
class Quoted:
    nonce: bytes
    message: bytes
    signature: bytes
    pcrs_file: bytes


def _quote(chan: GuestChannel) -> Quoted:
    nonce = os.urandom(32)
    q = chan.quote(nonce, SELECTION)
    return Quoted(nonce, q.message, q.signature, q.pcrs_tpm2_tools)


def _checkquote(work: Path, ak_pub: bytes, q: Quoted, stem: str) -> dict[str, dict[int, bytes]]:
    """tpm2_checkquote's view of the quoted values: the independent oracle."""
    for suffix, data in (("msg", q.message), ("sig", q.signature), ("pcrs", q.pcrs_file)):
        (work / f"{stem}.{suffix}").write_bytes(data)
    (work / "ak.pub").write_bytes(ak_pub)
    done = subprocess.run(
        [
            "tpm2_checkquote", "-u", "ak.pub", "-m", f"{stem}.msg", "-s", f"{stem}.sig",
            "-f", f"{stem}.pcrs", "-g", "sha256", "-q", q.nonce.hex(),
        ],
        cwd=work, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pcrs = yaml.safe_load(done.stdout)["pcrs"]
    size = {"sha1": 20, "sha256": 32}
    return {
        bank: {int(i): int(v).to_bytes(size[bank], "big") for i, v in values.items()}
        for bank, values in pcrs.items()
    }


def _keylime_pcr10(entries: tuple[ImaEntry, ...], bank: str) -> str:
    """Keylime's running PCR 10 hash over the ASCII lines of ``entries``."""
    from tests.verifier.ima import keylime_oracle  # noqa: F401, I001  (stubs gpg first)
    from keylime.common import algorithms
    from keylime.ima import ima

    lines = [e.to_ascii() for e in entries]
    theirs, _ = ima.process_measurement_list(None, lines, hash_alg=algorithms.Hash(bank))
    return str(theirs)


def _failures(result: dict[str, Any]) -> list[dict[str, Any]]:
    return list((result.get("report") or {}).get("failures") or [])


def test_ima_list_proven_learned_and_an_unlisted_program_named(
    tmp_path: Path,
    guest_images: GuestImages,
    vm_vtpm: tuple[ProvisionedVtpm, SwtpmProcess],
    vm_verifier: VmVerifier,
) -> None:
    _, tpm = vm_vtpm
    esp = guest_images.esp(cmdline=ima_cmdline())
    t0 = time.monotonic()
    with QemuVm(tmp_path / "vm", esp=esp, tpm=tpm, timeout_s=200) as vm:
        with vm.connect(boot_timeout=180) as chan:
            ready_s = time.monotonic() - t0
            ident = chan.hello()
            first = _quote(chan)
            # after the quote: IMA adds an entry to the list before it extends the PCR,
            # so a list read later covers the quote (and may run ahead of it)
            listed = chan.ima_list(0)
            # the running verifier: the boot policy made from the files plus a runtime
            # part learned from this list; the relay sends the entries it asks for
            doc = yaml.safe_load(
                files_policy("vm-ima", esp, secure_boot=False, cmdline=ima_cmdline())
            )
            learned = build_policy(learn_from_entries(parse_list(listed)), name="vm-ima-rt")
            doc["runtime"] = learned.to_dict()
            body = yaml.safe_dump(doc, sort_keys=False)
            relay = GuestImaList(chan)
            served_ok = guest_attest_steps(
                chan, vm_verifier.url, ima=relay,
                on_registered=lambda st: upload_and_assign(vm_verifier, st.attester_id,
                                                           "vm-ima", body),
            )  # fmt: skip
            path, status = chan.exec_copy(UNLISTED)
            second = _quote(chan)
            delta = chan.ima_list(len(listed))
            served_bad = [
                guest_attest_steps(chan, vm_verifier.url, state=served_ok.state, ima=relay)
                for _ in range(2)  # the failing entry is not verified: it is asked for again
            ]
            with pytest.raises(TpmError, match="past the list"):
                chan.ima_list(len(listed) + len(delta) + 1)
        artifacts = vm.wait(30)
    assert artifacts.returncode == 0, artifacts.console_text()[-2000:]
    assert "init ima=on" in artifacts.console_text()
    assert (path, status) == (f"/tmp/run/busybox-{UNLISTED}", 0)

    # 1. the quotes: our verifier and tpm2_checkquote agree on every quoted value
    ak = Public.load(ident.ak_public_tpm2b)
    verified = []
    for stem, q in (("q1", first), ("q2", second)):
        v = verify_quote(ak, q.message, q.signature, PcrValues.load(q.pcrs_file), q.nonce)
        assert v.pcrs.as_mapping() == _checkquote(tmp_path, ident.ak_public_tpm2b, q, stem)
        verified.append(v)
    pcrs1, pcrs2 = (v.pcrs.as_mapping() for v in verified)
    reset = verified[0].clock_info.reset_count
    assert verified[1].clock_info.reset_count == reset

    # 2. the list: every template hash checks (the parser), entry 0 is boot_aggregate
    entries = parse_list(listed)
    assert entries[0].path == "boot_aggregate" and entries[0].template_name == "ima-sig"
    assert {e.template_name for e in entries} == {"ima-sig"}
    assert not any(e.is_violation for e in entries)
    #    boot_aggregate by hand: SHA-256 over the quoted PCRs 0-9 (kernels since 5.8)
    by_hand = hashlib.sha256(b"".join(pcrs1["sha256"][i] for i in range(10))).digest()
    assert (entries[0].digest_algo, entries[0].digest) == ("sha256", by_hand)
    assert ("sha256", by_hand) in boot_aggregates(pcrs1)
    #    it replays to the quoted PCR 10 in both banks, and Keylime's running hash agrees
    pcr10 = {b: pcrs1[b][10] for b in BANKS}
    assert replay(entries, BANKS) == pcr10
    for bank in BANKS:
        assert _keylime_pcr10(entries, bank) == pcr10[bank].hex()
    #    what IMA measured is what went into the initramfs (the host's files)
    measured = {e.path: e.digest for e in entries}
    busybox = Path("/bin/busybox").read_bytes()
    assert measured["/bin/busybox"] == hashlib.sha256(busybox).digest()
    assert measured["/usr/bin/tpm2"] == hashlib.sha256(Path("/usr/bin/tpm2").read_bytes()).digest()
    assert any(p.endswith("/virtio_pci.ko") for p in measured)  # MODULE_CHECK

    # 3. learn a runtime policy from the list; the quote proves every entry; it passes
    policy = build_policy(learn_from_entries(entries), name="vm-ima-learned")
    extend = extend_values(ExtendMode.PER_BANK, BANKS)
    aggregates = boot_aggregates(pcrs1)
    step = advance(
        None, reset_count=reset, start_index=0, entries=entries, quoted_pcr10=pcr10,
        policy=policy, extend_values=extend, boot_aggregates=aggregates,
    )  # fmt: skip
    assert step.ok, [str(f) for f in step.appraisal.failures]
    assert (step.proven, step.pending) == (len(entries), 0)
    assert step.state.count == len(entries) and dict(step.state.pcr10) == pcr10

    # 4. the delta (only the new bytes) after the unlisted program: proven by the second
    #    quote from the stored state, and it fails naming the file and its digest
    new = parse_list(delta, offset_index=len(entries))
    assert new and new[0].path == path
    pcr10_2 = {b: pcrs2[b][10] for b in BANKS}
    bad = advance(
        step.state, reset_count=reset, start_index=len(entries), entries=new,
        quoted_pcr10=pcr10_2, policy=policy, extend_values=extend,
    )  # fmt: skip
    assert not bad.ok and (bad.proven, bad.pending) == (len(new), 0)
    copy_digest = hashlib.sha256(busybox + f"{UNLISTED}\n".encode()).hexdigest()
    failures = bad.appraisal.failures
    assert [(f.index, f.path) for f in failures] == [(len(entries), path)], failures
    assert failures[0].actual == f"sha256:{copy_digest}"
    assert path in str(failures[0])
    #    the delta alone does not replay to the quote without the verified state
    with pytest.raises(VerificationError, match="no prefix of the"):
        advance(
            step.state, reset_count=reset, start_index=len(entries), entries=new[1:],
            quoted_pcr10=pcr10_2, policy=policy, extend_values=extend,
        )  # fmt: skip

    # 5. Keylime, under the same policy (modules by path: Keylime has no module digests),
    #    passes the first list and fails exactly the copy
    from tests.verifier.ima.keylime_oracle import keylime_line_verdicts
    from verifier.ima.keylime import to_keylime

    by_path = build_policy(learn_from_entries(entries, modules_by_digest=False))
    doc = to_keylime(by_path).doc
    lines = [e.to_ascii() for e in (*entries[1:], *new)]  # boot_aggregate: checked above
    assert keylime_line_verdicts(lines, copy.deepcopy(doc)) == [True] * (len(entries) - 1) + [
        False
    ] * len(new)
    # 6. the running verifier (HTTP evidence API with the IMA delta): affirming under the
    #    learned policy with the whole list, then contraindicated naming the copy, twice
    ok = served_ok.result
    assert ok["status"] == "affirming", _failures(ok)
    ima_ok = ok["report"]["ima"]
    assert (ima_ok["start_index"], ima_ok["proven"], ima_ok["verified_count"]) == (
        0, len(entries), len(entries),
    )  # fmt: skip
    assert ima_ok["state_stored"] is True
    for served in served_bad:
        bad_result = served.result
        assert bad_result["status"] == "contraindicated", bad_result
        named = [f for f in _failures(bad_result) if f["rule"] == "ima.entry"]
        assert [f["entry"]["path"] for f in named] == [path], _failures(bad_result)
        assert named[0]["actual"] == f"sha256:{copy_digest}"
        ima_bad = bad_result["report"]["ima"]
        assert (ima_bad["start_index"], ima_bad["next_index"]) == (len(entries), len(entries))
        assert ima_bad["state_stored"] is False
    print(
        f"\nIMA boot: ready after {ready_s:.1f} s, list {len(entries)} entries "
        f"({len(listed)} bytes), delta {len(new)} entries ({len(delta)} bytes)"
    )
