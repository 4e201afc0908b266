"""`vtpm ima show` and `vtpm ima replay` on a list built by the test helper."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tests.verifier.ima._entries import Entry, ima_ng, replay
from vtpm_cli.main import cli


def _write(tmp_path: Path) -> tuple[Path, list[Entry]]:
    specs = [ima_ng("/a", b"a"), Entry("ima-ng", "/t", "sha256", bytes(32), is_violation=True)]
    path = tmp_path / "binary_runtime_measurements"
    path.write_bytes(b"".join(s.to_bytes() for s in specs))
    return path, specs


def test_show_and_replay(tmp_path: Path) -> None:
    path, specs = _write(tmp_path)
    out = CliRunner().invoke(cli, ["ima", "show", str(path), "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert [(e["index"], e["path"], e["violation"]) for e in shown] == [
        (0, "/a", False),
        (1, "/t", True),
    ]
    out = CliRunner().invoke(cli, ["ima", "replay", str(path), "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    want = replay(specs, ("sha1", "sha256", "sha384", "sha512"))
    assert got == {b: {"10": v.hex()} for b, v in want.items()}
    text = CliRunner().invoke(cli, ["ima", "show", str(path)])
    assert "VIOLATION" in text.output and text.exit_code == 0


def test_bad_and_forged_lists_exit_codes(tmp_path: Path) -> None:
    path, _ = _write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    out = CliRunner().invoke(cli, ["ima", "show", str(path)])
    assert out.exit_code == 2 and "ima_entry[1]" in out.output
    forged = bytearray(data)
    forged[10] ^= 1
    path.write_bytes(bytes(forged))
    out = CliRunner().invoke(cli, ["ima", "replay", str(path), "--json"])
    assert out.exit_code == 1 and "forged" in out.output
