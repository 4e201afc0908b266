"""atheris fuzz target for the policy loader (verifier.policy.schema, YAML/JSON).

Run:  .venv/bin/python fuzz/fuzz_policy.py [corpus_dir] -max_total_time=60
Seed it with policies from `vtpm policy learn`. Only ParseError may escape
Policy.load; a loaded policy must round-trip through to_yaml with the same id.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from verifier.policy import Policy
    from vtpm_core.errors import ParseError


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    try:
        policy = Policy.load(data)
    except ParseError:
        return
    again = Policy.load(policy.to_yaml())
    if again.id != policy.id:
        raise AssertionError(f"round trip changed the id: {policy.id} -> {again.id}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
