"""A daemon thread that runs one round of background work every ``interval_s`` seconds.

The service's housekeepers (retention's :class:`~verifier.service.retention.Pruner`,
the deadline :class:`~verifier.service.sweeper.Sweeper`) run inside each service
process this way. A database error in a round (PostgreSQL restarting, a full
disk; the DB-API fast path reports it as StateError) is logged and the next
round tries again; it never reaches a request.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

from sqlalchemy.exc import SQLAlchemyError

from vtpm_core.errors import StateError

__all__ = ["Periodic"]

_LOG = logging.getLogger(__name__)


class Periodic:
    """Calls :meth:`_round` every ``interval_s`` seconds (first after one interval) until
    :meth:`stop`; ``rounds`` and ``failures`` count the rounds that completed and failed."""

    def __init__(self, name: str, interval_s: float) -> None:
        self._name = name
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vtpm-{name}", daemon=True)
        self.rounds = 0
        self.failures = 0

    def start(self) -> Self:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _round(self) -> None:
        raise NotImplementedError

    def _wait(self) -> bool:
        """Sleep until the next round is due; True when stopped."""
        return self._stop.wait(self._interval_s)

    def _run(self) -> None:
        while not self._wait():
            try:
                self._round()
            except (SQLAlchemyError, OSError, StateError) as exc:
                self.failures += 1
                _LOG.warning(
                    "%s: round failed, retrying in %ss: %s",
                    self._name,
                    self._interval_s,
                    exc.__class__.__name__,
                )
                continue
            self.rounds += 1
