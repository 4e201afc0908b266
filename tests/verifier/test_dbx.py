"""dbx updates (issue 20): both input formats, a corpus log held against them, and the fleet's
stored evidence (a real swtpm extended with the corpus log, attested through the real service,
SQLite and PostgreSQL).

Test inputs, built here from the corpus log's own values (nothing downloaded):
- the authenticated variable: EFI_VARIABLE_AUTHENTICATION_2 (EFI_TIME, then
  WIN_CERTIFICATE_UEFI_GUID with a placeholder PKCS#7 blob: the signature is not read) and
  EFI_SIGNATURE_LISTs of EFI_CERT_SHA256 and EFI_CERT_X509 entries, per UEFI 2.10 8.2.2/32.4.1;
- the JSON in the shape of microsoft/secureboot_objects
  PreSignedObjects/DBX/dbx_info_msft_latest.json (images.<arch>[].authenticodeHash,
  certificates[].thumbprint, svns[]), its field names as published there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import CORPUS
from tests.verifier.appraisal_lab import _extend_log
from tests.verifier.service.test_state import TpmFactory, Verifier, assign, enrol, row
from tests.verifier.test_reappraise import ek_ca, pg_database, tpm_factory, verifier
from verifier.appraisal import appraise_log
from verifier.attester import TpmAttester, attest_once
from verifier.dbx import DbxScan, DbxUpdate, scan
from verifier.eventlog import EventLog
from verifier.eventlog.efivars import EfiVariable, SignatureData, SignatureDatabase
from verifier.eventlog.guids import EFI_CERT_SHA256, EFI_CERT_X509
from verifier.policy import Policy, learn_policy
from vtpm_cli.main import cli
from vtpm_core.errors import ParseError

__all__ = ["ek_ca", "pg_database", "tpm_factory", "verifier"]  # fixtures, shared

LOG = CORPUS / "eventlogs" / "vm_rhel9_qemu_ovmf_secureboot_keylime.bin"
_PKCS7 = uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7").bytes_le


def _esl(sig_type: str, entries: list[bytes]) -> bytes:
    size = 16 + len(entries[0])
    body = b"".join(b"\x00" * 16 + e for e in entries)  # owner GUID zero
    return uuid.UUID(sig_type).bytes_le + struct.pack("<III", 28 + len(body), 0, size) + body


def auth_file(hashes: list[bytes], certs: tuple[bytes, ...] = ()) -> bytes:
    pkcs7 = b"\x30\x03\x02\x01\x00"
    win_cert = struct.pack("<IHH", 24 + len(pkcs7), 0x0200, 0x0EF1) + _PKCS7 + pkcs7
    lists = _esl(EFI_CERT_SHA256, hashes) if hashes else b""
    for cert in certs:
        lists += _esl(EFI_CERT_X509, [cert])
    return b"\x00" * 16 + win_cert + lists


def ms_json(hashes: list[bytes], thumbprints: tuple[bytes, ...] = ()) -> bytes:
    return json.dumps(
        {
            "images": {
                "x64": [
                    {
                        "authenticodeHash": h.hex().upper(),
                        "hashType": "SHA256",
                        "flatHash": "",
                        "filename": f"image{i}.efi",
                        "description": "",
                        "companyName": "Unknown",
                        "dateOfAddition": "2026-12-01",
                        "signingAuthority": "",
                    }
                    for i, h in enumerate(hashes)
                ]
            },
            "certificates": [
                {
                    "value": "x.der",
                    "subjectName": "CN = x",
                    "issuerName": "CN = y",
                    "thumbprint": t.hex(),
                    "description": "",
                    "dateOfAddition": "2026-12-01",
                }
                for t in thumbprints
            ],
            "svns": [{"value": "01" + "00" * 31, "version": "9.0", "filename": "bootmgfw.efi"}],
        }
    ).encode()


@dataclass(frozen=True)
class Corpus:
    data: bytes
    apps: list[bytes]  # PCR 4 boot application digests (Authenticode SHA-256)
    certs: list[bytes]  # PCR 7 authority certificates (DER)
    dbx: list[bytes]  # the measured dbx's entries


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """The corpus log, and from it: boot application digests, an authority cert, dbx hashes."""
    data = LOG.read_bytes()
    log = EventLog.parse(data)
    replayed = log.verify(log.replay())
    apps = [e.digests["sha256"] for e in replayed.events if e.event_type == 0x80000003]
    certs = []
    dbx: list[bytes] = []
    for e in replayed.events:
        var = e.decoded
        if e.event_type == 0x800000E0 and isinstance(var, EfiVariable):
            assert isinstance(var.value, SignatureData)
            certs.append(var.value.data)
        if e.event_type == 0x80000001 and isinstance(var, EfiVariable) and var.name == "dbx":
            assert isinstance(var.value, SignatureDatabase)
            dbx = [d for lst in var.value.lists for d in lst.entry_data()]
    return Corpus(data, apps, certs, dbx)


def _scan(data: bytes, update: DbxUpdate) -> DbxScan:
    log = EventLog.parse(data)
    return scan(log.verify(log.replay()), update)


def test_authenticated_variable_revokes_a_booted_hash_and_certificate(corpus: Corpus) -> None:
    data = corpus.data
    shim = corpus.apps[0]
    cert = corpus.certs[0]
    update = DbxUpdate.parse(auth_file([shim, b"\x11" * 32], (cert,)))
    assert update.source == "authenticated-variable"
    assert update.hashes == {shim, b"\x11" * 32}
    assert hashlib.sha256(cert).digest() in update.cert_sha256
    found = _scan(data, update)
    kinds = sorted((f.kind, f.pcr) for f in found.revoked)
    assert ("hash", 4) in kinds and ("certificate", 7) in kinds
    [h] = [f for f in found.revoked if f.kind == "hash"]
    assert h.what == shim.hex()
    # neither hash is in the measured dbx: not current
    assert found.dbx_missing == 2 and not found.current


def test_microsoft_json_and_dbx_currency(corpus: Corpus) -> None:
    data, dbx = corpus.data, corpus.dbx
    assert dbx, "the corpus log measures a dbx"
    cert = corpus.certs[0]
    sha1 = hashlib.sha1(cert).digest()
    # an update whose every hash the measured dbx already holds: current, nothing revoked
    current = DbxUpdate.parse(ms_json([d for d in dbx if len(d) == 32][:5]))
    assert current.source == "microsoft-json" and current.svns == 1
    found = _scan(data, current)
    assert found.revoked == () and found.current and found.dbx_entries == len(dbx)
    # one more hash and a certificate thumbprint: old dbx, revoked authority
    update = DbxUpdate.parse(
        ms_json([*[d for d in dbx if len(d) == 32][:5], b"\x22" * 32], (sha1,))
    )
    found = _scan(data, update)
    assert found.dbx_missing == 1 and not found.current
    assert [f.kind for f in found.revoked] == ["certificate"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"\x00" * 20, "too short", id="fail/auth/short"),
        pytest.param(
            b"\x00" * 16 + struct.pack("<IHH", 24, 0x0200, 0x0002) + b"\x00" * 16,
            "wCertificateType",
            id="fail/auth/cert-type",
        ),
        pytest.param(
            b"\x00" * 16 + struct.pack("<IHH", 24, 0x0100, 0x0EF1) + b"\x00" * 16,
            "wRevision",
            id="fail/auth/revision",
        ),
        pytest.param(
            b"\x00" * 16 + struct.pack("<IHH", 9999, 0x0200, 0x0EF1) + b"\x00" * 16,
            "dwLength",
            id="fail/auth/length",
        ),
        pytest.param(
            auth_file([b"\x11" * 32])[:-5], "EFI_SIGNATURE_LIST", id="fail/auth/truncated-list"
        ),
        pytest.param(b"{not json", "json", id="fail/json/syntax"),
        pytest.param(b'{"images": ' + b"[" * 100_000, "dbx_info.json", id="fail/json/deep"),
        pytest.param(b'{"images": []}', "images", id="fail/json/images"),
        pytest.param(
            b'{"images": {"x64": [{"authenticodeHash": "abc"}]}}',
            r"images\.x64\[0\]\.authenticodeHash",
            id="fail/json/hash",
        ),
        pytest.param(
            b'{"images": {}, "certificates": [{"thumbprint": "00"}]}',
            r"certificates\[0\]\.thumbprint",
            id="fail/json/thumbprint",
        ),
    ],
)
def test_malformed_updates_are_parse_errors_naming_the_field(data: bytes, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        DbxUpdate.parse(data)


@given(st.binary(max_size=200))
def test_only_the_parse_error_escapes(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        DbxUpdate.parse(data)


def test_cli_offline_against_a_log(corpus: Corpus, tmp_path: Path) -> None:
    f = tmp_path / "DBXUpdate.bin"
    f.write_bytes(auth_file([corpus.apps[0]]))
    out = CliRunner().invoke(cli, ["policy", "dbx-update", str(f), "--eventlog", str(LOG)])
    assert out.exit_code == 1, out.output
    assert f"REVOKED {LOG}: hash {corpus.apps[0].hex()}" in out.output
    assert "OLD DBX" in out.output


def test_dbx_currency_as_a_policy_rule(corpus: Corpus, tmp_path: Path) -> None:
    """``dbx-update --base -o`` writes dbx.require; a boot whose dbx lacks an entry fails
    ``dbx.require`` naming it, one whose dbx holds them all passes."""
    log = EventLog.parse(corpus.data)
    learned = learn_policy(log.verify(log.replay()), name="corpus")
    base = tmp_path / "base.yaml"
    base.write_text(learned.to_yaml())
    held = [d for d in corpus.dbx if len(d) == 32][:3]
    for hashes, verdict in ((held, "affirming"), ([*held, b"\x33" * 32], "contraindicated")):
        f = tmp_path / "update.json"
        f.write_bytes(ms_json(hashes))
        out_file = tmp_path / "revised.yaml"
        out = CliRunner().invoke(
            cli, ["policy", "dbx-update", str(f), "--base", str(base), "-o", str(out_file)]
        )
        assert out.exit_code == 0, out.output
        revised = Policy.load(out_file)
        assert revised.dbx is not None and set(revised.dbx.require) == set(hashes)
        result = appraise_log(corpus.data, revised)
        assert result.status == verdict, result.failures
        if verdict == "contraindicated":
            [fail] = [f for f in result.failures if f.rule == "dbx.require"]
            assert fail.expected == "dbx with " + "33" * 32
            assert fail.actual == "absent"


@pytest.mark.swtpm
def test_fleet_report_from_stored_evidence(
    verifier: Verifier,
    tpm_factory: TpmFactory,
    corpus,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """A swtpm whose PCRs hold the corpus boot, attested with that log through the service:
    the report names it as having booted the revoked shim, and a clean one as not."""
    v = verifier
    data = corpus.data
    booted, clean = tpm_factory(), tpm_factory()
    _extend_log(booted, EventLog.parse(data))
    a = enrol(v, booted, "vm-dbx-booted")
    b = enrol(v, clean, "vm-dbx-clean")
    v.clock.advance(1)
    with requests.Session() as http:
        with TpmAttester.open(booted.endpoint.tcti) as att:
            assert attest_once(http, a, att, data)["report"]["quote_verified"]
        with TpmAttester.open(clean.endpoint.tcti) as att:
            attest_once(http, b, att, None)
    update = auth_file([corpus.apps[0]])
    r = requests.post(
        f"{v.url}/v1/dbx/report",
        data=update,
        headers={"Authorization": f"Bearer {v.admin}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    revoked = {e["attester_id"]: e for e in doc["revoked"]}
    assert a.attester_id in revoked and b.attester_id not in revoked
    [finding] = revoked[a.attester_id]["revoked"]
    assert (finding["kind"], finding["pcr"]) == ("hash", 4)
    assert a.attester_id in {e["attester_id"] for e in doc["old_dbx"]}
    assert {"attester_id": b.attester_id, "reason": "no stored event log"} in doc["skipped"]
    bad = requests.post(
        f"{v.url}/v1/dbx/report", data=b"{x", headers={"Authorization": f"Bearer {v.admin}"},
        timeout=30,
    )  # fmt: skip
    assert bad.status_code == 400 and "json" in bad.json()["detail"]
    reader = requests.post(
        f"{v.url}/v1/dbx/report", data=update, headers={"Authorization": f"Bearer {v.reader}"},
        timeout=30,
    )  # fmt: skip
    assert reader.status_code == 403
    token = tmp_path / "admin.token"
    token.write_text(v.admin)
    f = tmp_path / "DBXUpdate.bin"
    f.write_bytes(update)
    out = CliRunner().invoke(
        cli, ["policy", "dbx-update", str(f), "--verifier", v.url, "--token-file", str(token)]
    )
    assert out.exit_code == 1, out.output
    assert f"REVOKED {a.attester_id}: hash" in out.output

    # dbx currency as a rule: the stored boot is re-appraised (no new quote) and fails it
    held = [d for d in corpus.dbx if len(d) == 32][:2]
    rule = {"version": 1, "name": "dbx-current", "dbx": {"require": [h.hex() for h in held]}}
    rule["dbx"]["require"].append("44" * 32)
    r = v.call("PUT", "/v1/policies/dbx-current", v.admin, json={"policy": rule})
    assert r.status_code == 200, r.text
    r = v.call("POST", "/v1/policies/dbx-current/apply", v.admin, json={"against": [a.attester_id]})
    [change] = r.json()["changed"]
    assert (change["from"], change["to"]) == ("warning", "contraindicated")
    assert [f["rule"] for f in change["failures"]] == ["dbx.require"]
    assert row(v, a.attester_id).state == "failed"
    assign(v, a.attester_id, None)
