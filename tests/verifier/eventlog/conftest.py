"""Fixtures for the event-log tests: the corpus logs, parsed once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from verifier.eventlog import EventLog


@pytest.fixture(scope="session")
def eventlogs(corpus: Path) -> Path:
    return corpus / "eventlogs"


@pytest.fixture(scope="session")
def load_log(eventlogs: Path):  # type: ignore[no-untyped-def]
    cache: dict[str, EventLog] = {}

    def load(name: str) -> EventLog:
        if name not in cache:
            cache[name] = EventLog.parse((eventlogs / name).read_bytes())
        return cache[name]

    return load


def load_pcrs(path: Path) -> dict[str, dict[int, bytes]]:
    raw = json.loads(path.read_text())
    return {
        bank: {int(k): bytes.fromhex(v) for k, v in values.items()} for bank, values in raw.items()
    }
