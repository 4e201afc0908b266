"""Prometheus metrics of the attestation service (prometheus-client).

Multiprocess-safe: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``vtpm verifier
serve`` sets it to a fresh directory under the home before gunicorn forks),
each worker writes its samples to files there and ``GET /metrics`` aggregates
every worker's (prometheus-client "Multiprocess Mode"); gunicorn's
``child_exit`` hook marks dead workers. Without it (tests, one process) the
metrics live in a registry owned by the app: nothing is global.

The fleet gauges (attesters per state, evidence age: issue 16) are not
per-worker samples but read from the database, cached
(:mod:`verifier.service.fleetstats`); the worker answering a scrape adds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    challenges: Counter
    results: Counter
    nonce_rejections: Counter
    appraisal_seconds: Histogram
    fleet: Collector | None = None

    @classmethod
    def create(cls, fleet: Collector | None = None) -> Metrics:
        """``fleet``: the collector of the database-wide gauges (none: not exposed)."""
        registry = CollectorRegistry(auto_describe=True)
        if fleet is not None:
            registry.register(fleet)
        return cls(
            fleet=fleet,
            registry=registry,
            requests=Counter(
                "vtpm_verifier_http_requests",
                "HTTP requests by route and status",
                ["route", "method", "status"],
                registry=registry,
            ),
            request_seconds=Histogram(
                "vtpm_verifier_http_request_seconds",
                "HTTP request latency by route",
                ["route"],
                registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            ),
            challenges=Counter("vtpm_verifier_challenges", "Nonces issued", registry=registry),
            results=Counter(
                "vtpm_verifier_results",
                "Appraisal results by EAR status",
                ["status"],
                registry=registry,
            ),
            nonce_rejections=Counter(
                "vtpm_verifier_nonce_rejections",
                "Evidence refused because its nonce was unknown, used or expired",
                registry=registry,
            ),
            appraisal_seconds=Histogram(
                "vtpm_verifier_appraisal_seconds",
                "Time to verify and appraise one evidence",
                registry=registry,
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            ),
        )

    def exposition(self) -> bytes:
        """The text format for ``GET /metrics`` (all workers in multiprocess mode)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            if self.fleet is not None:
                registry.register(self.fleet)
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))
