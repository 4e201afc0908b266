"""In-process checks of the app factory: the served OpenAPI document matches the routes,
errors become problem JSON without internals, configuration is checked."""

from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from verifier.ear import EAR_PROFILE_04, EAR_PROFILE_2023, EarSigner, TrustVector, verify_result
from verifier.service import create_app, init_home, load_config
from verifier.service.appraiser import LibraryAppraiser
from verifier.service.openapi import openapi_spec
from verifier.service.ports import Appraisal
from vtpm_core.errors import ConfigError, StateError


@pytest.fixture
def app_home(tmp_path: Path) -> Path:
    init_home(tmp_path / "home", verifier_id="t")
    return tmp_path / "home"


def test_openapi_matches_registered_routes(app_home: Path) -> None:
    app = create_app(load_config(app_home), migrate=True)
    try:
        routes: set[tuple[str, str]] = set()
        for rule in app.url_map.iter_rules():
            if rule.endpoint == "static" or rule.endpoint.startswith("console."):
                continue  # the console's pages and JSON are documented in docs/console.md
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
            for method in rule.methods or ():
                if method not in ("HEAD", "OPTIONS"):
                    routes.add((path, method.lower()))
        spec = openapi_spec()
        documented = {(p, m) for p, ops in spec["paths"].items() for m in ops}
        assert documented == routes
        served = app.test_client().get("/openapi.json").get_json()
        assert served == spec
    finally:
        app.extensions["vtpm_verifier"]["db"].dispose()


def test_unknown_route_and_method_are_problems(app_home: Path) -> None:
    app = create_app(load_config(app_home), migrate=True)
    try:
        client = app.test_client()
        r = client.get("/nope")
        assert r.status_code == 404 and r.content_type == "application/problem+json"
        r = client.delete("/healthz")
        assert r.status_code == 405 and r.get_json()["type"].endswith("method-not-allowed")
    finally:
        app.extensions["vtpm_verifier"]["db"].dispose()


def test_internal_errors_show_no_internals(app_home: Path) -> None:
    app = create_app(load_config(app_home), migrate=True)
    try:
        # break the database under the app: the answer must not leak SQL or paths
        db = app.extensions["vtpm_verifier"]["db"]
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE assignments")
            conn.exec_driver_sql("DROP TABLE attesters")
        token = (app_home / "admin.token").read_text().strip()
        r = app.test_client().get("/v1/attesters", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 500
        assert r.get_json()["detail"] == "internal error; see the verifier's log"
        text = r.get_data(as_text=True).lower()
        assert "sqlite" not in text and "attesters" not in text and "traceback" not in text
    finally:
        app.extensions["vtpm_verifier"]["db"].dispose()


def test_schema_must_be_migrated(app_home: Path) -> None:
    with pytest.raises(ConfigError, match="not at the latest migration"):
        create_app(load_config(app_home))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        pytest.param({"schema": 2}, "schema must be 1", id="fail/config/schema"),
        pytest.param({"admin_token_sha256": "zz"}, "SHA-256 hex", id="fail/config/admin-token"),
        pytest.param({"nonce_lifetime_s": 0}, "nonce_lifetime_s", id="fail/config/nonce-lifetime"),
        pytest.param(
            {"database_url": "mysql://x"}, "sqlite or postgresql", id="fail/config/db-url"
        ),
        pytest.param(
            {"default_pcr_selection": {"md5": [0]}}, "bad bank", id="fail/config/pcr-bank"
        ),
        pytest.param(
            {"ear_profile": "ear-05"}, "ear_profile must be one of", id="fail/config/ear-profile"
        ),
    ],
)
def test_bad_config_is_refused(app_home: Path, change: dict[str, object], pattern: str) -> None:
    cfg = app_home / "verifier.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw.update(change)
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=pattern):
        load_config(app_home)


@pytest.mark.parametrize(
    ("setting", "profile"),
    [
        (None, EAR_PROFILE_2023),
        ("veraison-2023", EAR_PROFILE_2023),
        ("ietf-ear-04", EAR_PROFILE_04),
        (EAR_PROFILE_04, EAR_PROFILE_04),
    ],
)
def test_ear_profile_setting(app_home: Path, setting: str | None, profile: str) -> None:
    """``ear_profile`` is the profile results are signed in and served in by default."""
    if setting is not None:
        cfg = app_home / "verifier.yaml"
        cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "ear_profile": setting}))
    config = load_config(app_home)
    assert config.ear_profile == profile
    appraiser = LibraryAppraiser.from_config(config)
    appraisal = Appraisal("affirming", trust_vector={"executables": 3}, policy_id="policy:p")
    token = appraiser.sign_result(
        appraisal, status="affirming", nonce=bytes(16), attester_id="a", flags=[]
    )
    assert verify_result(token, appraiser.jwks()).profile == profile
    assert appraiser.ear_as(token) is token  # already in the default
    other = EAR_PROFILE_04 if profile == EAR_PROFILE_2023 else EAR_PROFILE_2023
    moved = appraiser.ear_as(token, other)
    assert verify_result(moved, appraiser.jwks()).profile == other
    assert appraiser.ear_as(moved) != moved  # back to the default, re-signed
    # a stored EAR the signing key did not sign is never re-signed
    verdict = _Verdict("affirming", TrustVector(executables=3))
    stranger = EarSigner.generate(profile=profile).sign(verdict, bytes(16), "a", "p")
    with pytest.raises(StateError, match="cannot be served in"):
        appraiser.ear_as(stranger, other)


@dataclasses.dataclass(frozen=True)
class _Verdict:
    status: str
    trust_vector: TrustVector
    failure_summaries: tuple[dict[str, str], ...] = ()


def test_init_refuses_to_overwrite(app_home: Path) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        init_home(app_home)


def _attester_row(aid: str, vm_id: str | None) -> dict[str, object]:
    now = datetime.datetime.now(datetime.UTC)
    return {
        "id": aid,
        "vm_id": vm_id,
        "ek_fingerprint": "ab" * 32,
        "ek_public": b"ek",
        "ek_certificate": None,
        "identity": {},
        "ak_public": b"ak",
        "ak_name": "00",
        "status": "active",
        "flags": [],
        "created_at": now,
    }


def test_one_attester_per_ek_and_vm_id(tmp_path: Path) -> None:
    """Migration 0002: a second row for one EK and VM id is refused by the database itself
    (no VM id counts as one value); other VM ids of the same EK are allowed."""
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from verifier.service.db import Database, upgrade
    from verifier.service.models import Attester

    db = Database(f"sqlite:///{tmp_path / 'v.db'}")
    try:
        upgrade(db.engine)
        with db.engine.begin() as conn:
            conn.execute(insert(Attester), [_attester_row("a", None), _attester_row("b", "vm")])
        for aid, vm_id in (("c", None), ("d", "vm")):
            with pytest.raises(IntegrityError), db.engine.begin() as conn:
                conn.execute(insert(Attester), [_attester_row(aid, vm_id)])
        with db.engine.begin() as conn:
            conn.execute(insert(Attester), [_attester_row("e", "other-vm")])
    finally:
        db.dispose()


def test_migration_0002_refuses_existing_duplicates(tmp_path: Path) -> None:
    """Duplicates left by the old registration race stop the migration, named; nothing is
    deleted or merged behind the operator's back."""
    from alembic import command
    from sqlalchemy import insert

    from verifier.service.db import Database, _alembic_config, upgrade
    from verifier.service.models import Attester

    db = Database(f"sqlite:///{tmp_path / 'v.db'}")
    try:
        cfg = _alembic_config()
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            conn.execute(insert(Attester), [_attester_row("a", "vm"), _attester_row("b", "vm")])
        with pytest.raises(RuntimeError, match=r"registered twice.*VM 'vm': 2"):
            upgrade(db.engine)
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM attesters WHERE id = 'b'")
        upgrade(db.engine)  # and now it goes through
    finally:
        db.dispose()


def test_full_sqlite_disk_is_503_on_orm_writes_then_recovers(app_home: Path) -> None:
    """SQLite's "database or disk is full" on an ORM write (here a policy upload) is a
    retriable 503, not a 500 (found by the soak, issue 18, on a full tmpfs). The disk
    fills by SQLite's own page cap (``max_page_count``), which answers SQLITE_FULL as a
    full file system does."""
    from sqlalchemy import event

    app = create_app(load_config(app_home), migrate=True)
    db = app.extensions["vtpm_verifier"]["db"]
    cap = {"pages": 0}

    def _cap(dbapi_conn: Any, _record: Any) -> None:
        if cap["pages"]:
            dbapi_conn.execute(f"PRAGMA max_page_count = {cap['pages']}")

    event.listen(db.engine, "connect", _cap)
    try:
        with db.engine.connect() as conn:
            cap["pages"] = int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())
        db.engine.dispose()  # every connection from now on has the cap
        token = (app_home / "admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        body = {"policy": {"version": 1, "name": "big", "kernel_cmdlines": []}}
        body["policy"]["kernel_cmdlines"] = [{"exact": "x" * 200} for _ in range(400)]
        r = app.test_client().put("/v1/policies/big", headers=auth, json=body)
        assert r.status_code == 503, r.get_data(as_text=True)
        assert r.headers["Retry-After"] == "1"
        assert r.get_json()["type"] == "urn:vtpm-trust:problem:unavailable"
        assert "disk" not in r.get_data(as_text=True)
        cap["pages"] = 0  # space freed
        db.engine.dispose()
        r = app.test_client().put("/v1/policies/big", headers=auth, json=body)
        assert r.status_code == 200, r.get_data(as_text=True)
    finally:
        db.dispose()
