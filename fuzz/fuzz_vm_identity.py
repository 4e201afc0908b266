"""atheris fuzz target for the VM identity extension parser (vtpm_core.vm_identity).

Run:  .venv/bin/python fuzz/fuzz_vm_identity.py --seeds /tmp/vmid-seeds   (writes seeds)
      .venv/bin/python fuzz/fuzz_vm_identity.py /tmp/vmid-seeds -max_total_time=60
Only ParseError may come out of ``VmIdentity.parse``; what it accepts must be
exactly what ``VmIdentity.build`` writes for the parsed fields (the parser
accepts one encoding per value). Anything else crashes the fuzzer.
"""

from __future__ import annotations

import datetime as dt
import sys
import uuid
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from vtpm_core.errors import ParseError
    from vtpm_core.vm_identity import VmIdentity

T = dt.datetime(2026, 11, 26, 22, 0, 5, tzinfo=dt.UTC)
SEEDS = [
    VmIdentity.build(uuid.UUID(int=0), "", "", T),
    VmIdentity.build(uuid.UUID("6f1c2d4e-8a9b-4c3d-9e0f-112233445566"), "web-01 ü", "vtpm-7", T),
    VmIdentity.build(uuid.UUID(int=2**128 - 1), "n" * 200, "i" * 130, T.replace(year=2049)),
    VmIdentity.build(uuid.UUID(int=7), "x" * 1024, "", T.replace(year=9999)),
]


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    try:
        value = VmIdentity.parse(data)
    except ParseError:
        return
    assert value.raw == data
    assert value.created_at.tzinfo is not None and value.created_at.microsecond == 0
    again = VmIdentity.build(value.vm_id, value.vm_name, value.vtpm_instance_id, value.created_at)
    assert again == value, (data.hex(), again.raw.hex())


def write_seeds(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS):
        (out / f"vmid-{i}").write_bytes(seed.raw)


def main() -> None:
    if sys.argv[1:2] == ["--seeds"]:
        write_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
