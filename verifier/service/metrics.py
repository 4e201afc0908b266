"""Prometheus metrics of the attestation service (prometheus-client).

Multiprocess-safe: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``vtpm verifier
serve`` sets it to a fresh directory under the home before gunicorn forks),
each worker writes its samples to files there and ``GET /metrics`` aggregates
every worker's (prometheus-client "Multiprocess Mode"); gunicorn's
``child_exit`` hook marks dead workers. Without it (tests, one process) the
metrics live in a registry owned by the app: nothing is global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

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

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry(auto_describe=True)
        return cls(
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
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))
