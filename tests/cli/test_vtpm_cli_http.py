"""`vtpm create/clone/delete --ca-url URL --ca-token-file F` against `vtpm ca serve` (gunicorn).

The vTPM core reaches the CA only through its HTTP API here; a provisioner
token may issue but not revoke, so `vtpm delete` with it fails and keeps the
vTPM; with an admin token it revokes and destroys.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._server import serving
from tests.cli._vtpm_env import VtpmEnv
from vtpm_core.store import VtpmStore

pytestmark = pytest.mark.swtpm
VTPM = str(Path(sys.executable).parent / "vtpm")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[VtpmEnv, str, Path, Path]]:
    from ca.home import CaHome
    from vtpm_core.swtpm import free_tcp_port_pair

    env = VtpmEnv.make(tmp_path)
    prov, admin = tmp_path / "prov.token", tmp_path / "admin.token"
    prov.write_text(CaHome(env.ca_home).add_token("prov", "provisioner"))
    admin.write_text(CaHome(env.ca_home).add_token("adm", "admin"))
    port = free_tcp_port_pair()
    url = f"http://127.0.0.1:{port}"
    cmd = [VTPM, "ca", "serve", "--home", str(env.ca_home), "--bind", f"127.0.0.1:{port}",
           "--workers", "1", "--passphrase-file", str(env.passphrase_file)]  # fmt: skip
    with serving(cmd, tmp_path / "serve.log", url + "/v1/ca/chain"):
        yield env, url, prov, admin


def test_create_clone_delete_over_http(served: tuple[VtpmEnv, str, Path, Path]) -> None:
    env, url, prov, admin = served
    http = ["--ca-url", url, "--ca-token-file", str(prov)]
    r = env.run("create", "vm1", "--json", *http)
    assert r.exit_code == 0, r.output
    serials = [int(e["serial"], 16) for e in json.loads(r.stdout)["eks"]]
    assert [env.ledger_status(s) for s in serials] == ["issued", "issued"]
    store = VtpmStore.open(env.store)
    from vtpm_core.provision import read_nv

    rec = store.get("vm1")
    with store.running("vm1") as tpm:
        assert read_nv(tpm.esapi(), 0x01C00002) == rec.ek("rsa2048").certificate_der

    r = env.run("clone", "vm1", "vm2", "--mode", "replace", *http)
    assert r.exit_code == 0, r.output

    r = env.run("delete", "vm2", *http)  # a provisioner may not revoke
    assert r.exit_code == 1 and "error:" in r.stderr, r.output
    assert store.exists("vm2")
    r = env.run("delete", "vm2", "--ca-url", url, "--ca-token-file", str(admin))
    assert r.exit_code == 0, r.output
    assert not store.exists("vm2")
    new = [s for s in (int(x, 16) for x in r.stdout.split("revoked ")[1].split())]
    assert new and all(env.ledger_status(s) == "revoked" for s in new)

    r = env.run("create", "vm3", "--ca-url", url, "--ca-token-file", str(prov) + ".missing")
    assert r.exit_code == 2 and "cannot read" in r.stderr
