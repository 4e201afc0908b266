"""The read-only base of the event log's slotted classes that are not dataclasses.

:class:`Immutable` is the base of EventLog and ReplayedLog (lazily built caches in
slots), as read-only as a frozen dataclass.

Round 1 also built Event, ReplayedEvent and AppliedQuirk here as instances of an
"unfrozen twin" class re-classed to the frozen one (no ``object.__setattr__`` per
field). Issue 19 removed it: bench/tricks.py (2026-12-07, medians of 9) timed
0.36 against 0.84 us per Event, which is 0.13-0.24 ms for ``vtpm eventlog
replay``'s work on the typical 83-event log with every event built (0.96 against
1.20 ms), about 0.2% of that command's process: nothing a user would notice.
"""

from __future__ import annotations

__all__ = ["Immutable"]


class Immutable:
    """Base of the slotted classes whose ``__init__`` sets every slot through
    ``object.__setattr__`` (caches included): afterwards, no attribute can be set or
    deleted, as on a frozen dataclass."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot set {name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot delete {name})")
