"""Size limits applied while parsing an IMA measurement list (fail closed on hostile input).

The defaults are far above what a running kernel writes (an entry is
~100-300 bytes; a long-running server reaches some 10^5 entries; the largest
template data is an ``ima-buf`` key or an appended module signature, a few
KiB) and low enough that a hostile list cannot make the verifier allocate
or hash without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vtpm_core.errors import ConfigError

__all__ = ["DEFAULT_IMA_LIMITS", "ImaLimits"]


@dataclass(frozen=True, slots=True)
class ImaLimits:
    """Configurable bounds; exceeding one raises ParseError naming the entry and offset."""

    max_list_bytes: int = 512 * 1024 * 1024
    max_entries: int = 4 * 1024 * 1024
    max_template_data: int = 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ImaLimits.{f.name} must be a positive integer, got {value!r}")


DEFAULT_IMA_LIMITS = ImaLimits()
