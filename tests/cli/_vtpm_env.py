"""A CA home and a vTPM store made with the real CLI, shared by the vTPM CLI tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner, Result

from vtpm_cli.main import cli


@dataclass
class VtpmEnv:
    root: Path
    store: Path
    ca_home: Path
    passphrase_file: Path

    @property
    def ca_args(self) -> list[str]:
        return ["--ca-home", str(self.ca_home), "--ca-passphrase-file", str(self.passphrase_file)]

    def run(self, *args: str, ca: bool = False) -> Result:
        argv = [*args, "--store", str(self.store)]
        if ca:
            argv += self.ca_args
        return CliRunner().invoke(cli, argv, catch_exceptions=False)

    @staticmethod
    def make(root: Path) -> VtpmEnv:
        env = VtpmEnv(root, root / "store", root / "ca", root / "ca-passphrase")
        env.passphrase_file.write_text("correct horse battery staple\n")
        env.passphrase_file.chmod(0o600)
        r = CliRunner().invoke(
            cli,
            ["ca", "init", "--home", str(env.ca_home), "--passphrase-file",
             str(env.passphrase_file)],
            catch_exceptions=False,
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(cli, ["init", "--store", str(env.store)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return env

    def ledger_status(self, serial: int) -> str:
        from ca.issuer import LocalCaIssuer

        with LocalCaIssuer.open(
            self.ca_home, passphrase=self.passphrase_file.read_text().strip().encode()
        ) as ca:
            return ca.ca.ledger.get(serial).status

    def ledger_bindings(self, serial: int) -> dict[str, str]:
        from ca.issuer import LocalCaIssuer

        with LocalCaIssuer.open(
            self.ca_home, passphrase=self.passphrase_file.read_text().strip().encode()
        ) as ca:
            return ca.ca.ledger.bindings_of(ca.ca.ledger.get(serial))
