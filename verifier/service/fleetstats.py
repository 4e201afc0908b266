"""Fleet gauges for ``GET /metrics`` (issue 16): attesters per state and the age of their evidence.

:class:`FleetStats` answers one :class:`FleetSnapshot` per ``ttl_s`` seconds
(the sweeper's interval): one aggregate statement over ``attesters`` (a scan
of the fleet, a few tens of milliseconds at 100,000 attesters on PostgreSQL,
see docs/continuous.md), cached, so scrapes in between cost nothing and a
scraper polling every second cannot turn the metrics into a load on the
database. Each process caches its own; the gauges are therefore at most
``ttl_s`` old, like the states themselves (the sweeper's granularity).

:class:`FleetCollector` exposes a snapshot as ``vtpm_verifier_attesters{state}``
(a gauge) and ``vtpm_verifier_evidence_age_seconds`` (a histogram over the
attesters that sent evidence, of the time since their latest accepted one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from verifier.service.db import Database
from verifier.service.models import ATTESTER_STATES, Attester

__all__ = ["AGE_BUCKETS_S", "FleetCollector", "FleetSnapshot", "FleetStats"]

# seconds; a 60 s cadence with grace 3 puts a healthy fleet under 60 and stale beyond 180
AGE_BUCKETS_S = (15.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0)

_GAUGE, _GAUGE_HELP = "vtpm_verifier_attesters", "Attesters per state"
_AGE = "vtpm_verifier_evidence_age_seconds"
_AGE_HELP = "Time since each attester's latest accepted evidence"


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Counts at ``at``: per state, and the evidence-age histogram (cumulative, per
    :data:`AGE_BUCKETS_S`, then +Inf), its count and its sum of ages in seconds."""

    at: datetime
    states: dict[str, int]
    age_buckets: tuple[int, ...]
    age_count: int
    age_sum_s: float


class FleetStats:
    """One :class:`FleetSnapshot` per ``ttl_s`` seconds of the monotonic clock."""

    def __init__(
        self,
        db: Database,
        ttl_s: float,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self._ttl_s = ttl_s
        self._now = now
        self._lock = threading.Lock()
        self._cached: tuple[float, FleetSnapshot] | None = None

    def snapshot(self) -> FleetSnapshot:
        with self._lock:
            mono = time.monotonic()
            if self._cached is None or mono - self._cached[0] >= self._ttl_s:
                self._cached = (mono, self.compute())
            return self._cached[1]

    def compute(self) -> FleetSnapshot:
        """The snapshot now, uncached: one statement, grouped by state."""
        now = self._now()
        seen = Attester.last_evidence_at
        buckets = [
            func.sum(case((seen >= now - timedelta(seconds=b), 1), else_=0)) for b in AGE_BUCKETS_S
        ]
        if self._db.sqlite:  # UtcDateTime is naive ISO text there
            epoch = func.julianday(seen) * 86400.0 - 2440587.5 * 86400.0
        else:
            epoch = func.extract("epoch", seen)
        stmt = select(
            Attester.state, func.count(), func.count(seen), func.sum(epoch), *buckets
        ).group_by(Attester.state)
        states = dict.fromkeys(ATTESTER_STATES, 0)
        cumulative = [0] * len(AGE_BUCKETS_S)
        count = 0
        epoch_sum = 0.0
        with self._db.read() as session:
            for state, n, with_evidence, sum_epoch, *in_bucket in session.execute(stmt):
                states[state] = states.get(state, 0) + int(n)
                count += int(with_evidence)
                epoch_sum += float(sum_epoch or 0)
                for i, k in enumerate(in_bucket):
                    cumulative[i] += int(k or 0)
        age_sum = max(0.0, count * now.timestamp() - epoch_sum)
        return FleetSnapshot(now, states, (*cumulative, count), count, age_sum)


class FleetCollector(Collector):
    """prometheus-client collector over a :class:`FleetStats` (asked on each scrape)."""

    def __init__(self, stats: FleetStats) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        """The families without samples: registering asks no database."""
        yield GaugeMetricFamily(_GAUGE, _GAUGE_HELP, labels=["state"])
        yield HistogramMetricFamily(_AGE, _AGE_HELP)

    def collect(self) -> Iterator[Metric]:
        snap = self._stats.snapshot()
        gauge = GaugeMetricFamily(_GAUGE, _GAUGE_HELP, labels=["state"])
        for state, n in snap.states.items():
            gauge.add_metric([state], n)
        yield gauge
        bounds = [*(repr(b) for b in AGE_BUCKETS_S), "+Inf"]
        yield HistogramMetricFamily(
            _AGE,
            _AGE_HELP,
            buckets=list(zip(bounds, snap.age_buckets, strict=True)),
            sum_value=snap.age_sum_s,
        )
