"""Size limits applied while parsing an event log (fail closed on hostile input).

The defaults are far above what real firmware writes (the largest log in the
corpus is ~50 KiB with ~200 events; a full dbx variable event is ~15 KiB) and
low enough that a hostile log cannot make the verifier hash or allocate
without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vtpm_core.errors import ConfigError

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Configurable bounds; exceeding one raises ParseError naming the offset."""

    max_log_bytes: int = 16 * 1024 * 1024
    max_events: int = 65_536
    max_event_data: int = 1024 * 1024
    max_digests_per_event: int = 8
    max_device_path_nodes: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Limits.{f.name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()
