"""Keylime 7.14.3's own IMA code, as an independent oracle for runtime policies.

Keylime's ``keylime.signing`` imports the GnuPG binding ``gpg`` at module
level, for GPG-signed policies that these tests never use; the binding is
not on PyPI as a wheel (it builds against libgpgme), so an empty stand-in
module takes its place before Keylime is imported. Nothing Keylime runs here
touches it. Keylime logs warnings about its missing config files; they are
logging records, not Python warnings, and change nothing here.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

if "gpg" not in sys.modules:
    sys.modules["gpg"] = types.ModuleType("gpg")

from keylime.common import validators
from keylime.ima import ast, file_signatures, ima

logging.getLogger("keylime").setLevel(logging.CRITICAL)
for _name in ("keylime.config", "keylime.ima", "keylime.file_signatures", "ima"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

__all__ = [
    "KEYLIME_POLICY_CLI",
    "keylime_allows",
    "keylime_line_verdicts",
    "keylime_sig_valid",
    "keylime_validate",
    "run_keylime_policy",
]

KEYLIME_POLICY_CLI = (
    "import sys, types; sys.modules.setdefault('gpg', types.ModuleType('gpg')); "
    "from keylime.cmd.keylime_policy import main; sys.argv[0] = 'keylime-policy'; main()"
)


def keylime_validate(doc: Any) -> str | None:
    """Keylime's schema check of a runtime policy: None if accepted, else its message."""
    try:
        ima.validate_runtime_policy(doc)
        # verify_runtime_policy checks the excludes (as the verifier does on upload)
        ima.verify_runtime_policy(json.dumps(doc).encode(), None, verify_sig=False)
    except ima.ImaValidationError as exc:
        return exc.message
    _, err = validators.valid_exclude_list(doc.get("excludes"))
    return err


def keylime_allows(doc: dict[str, Any], path: str, algo: str, digest: bytes) -> bool:
    """Keylime's decision for one ima-ng entry (digest + path) under ``doc``."""
    excl, err = validators.valid_exclude_list(doc.get("excludes"))
    assert err is None, err
    failure = ima._validate_ima_ng(  # the function Keylime's validator calls for ima-ng
        excl, doc, ast.Digest(f"{algo}:{digest.hex()}"), ast.Name(path)
    )
    return not failure


def keylime_sig_valid(verification_keys: str, sig: bytes, algo: str, digest: bytes) -> bool:
    """Keylime's verdict on one ima-sig signature with the policy's verification-keys."""
    rings = file_signatures.ImaKeyrings()
    rings.set_tenant_keyring(file_signatures.ImaKeyring.from_string(verification_keys))
    return bool(rings.integrity_digsig_verify(sig, digest, algo))


def run_keylime_policy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``keylime-policy ARGS`` (Keylime's own policy tool), in a child process."""
    return subprocess.run(
        [sys.executable, "-c", KEYLIME_POLICY_CLI, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def keylime_line_verdicts(lines: list[str], doc: dict[str, Any]) -> list[bool]:
    """Keylime's appraisal of each ASCII list line on its own: True where it passes.

    Each line goes through ``ima.process_measurement_list`` (template-hash
    check, then the template's validator) with the policy's
    verification-keys as the tenant keyring, as the verifier sets it up.
    """
    out = []
    for line in lines:
        rings = file_signatures.ImaKeyrings()
        rings.set_tenant_keyring(file_signatures.ImaKeyring.from_string(doc["verification-keys"]))
        _, failure = ima.process_measurement_list(
            None, [line], runtime_policy=copy.deepcopy(doc), ima_keyrings=rings
        )
        out.append(not failure)
    return out
