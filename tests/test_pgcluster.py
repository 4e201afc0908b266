"""The private PostgreSQL cluster used by fault tests: create, serve, restart, close."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy

from tests._pgcluster import PgCluster

pytestmark = pytest.mark.postgres


def _count(url: str) -> int:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text("select count(*) from t")).scalar_one())
    finally:
        engine.dispose()


def test_restart_keeps_committed_rows_and_close_stops_it(tmp_path: Path) -> None:
    with PgCluster.create(tmp_path) as pg:
        engine = sqlalchemy.create_engine(pg.url())
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("create table t (x int)"))
            conn.execute(sqlalchemy.text("insert into t values (1), (2)"))
        engine.dispose()
        pg.restart(mode="immediate")
        assert pg.running()
        assert _count(pg.url()) == 2
        pg.stop()
        assert not pg.running()
        with pytest.raises(sqlalchemy.exc.OperationalError):
            _count(pg.url())
        pg.start()
        assert _count(pg.url()) == 2
    assert not pg.running()
