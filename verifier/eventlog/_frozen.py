"""Building many slotted frozen dataclass instances fast (the parse and check loops).

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``;
setting each slot through its descriptor's ``__set__`` is cheaper, but is still a
call per field. :func:`unfrozen_twin` gives a plain class with the same slots in
the same order: an instance of it is filled with ordinary attribute stores, then
becomes an instance of the frozen class by ``__class__`` assignment (which CPython
allows only between classes with the same instance layout, and checks). The
result is the same object ``cls(...)`` would build: same type, same slot values.

:class:`Immutable` is the base of the slotted classes that are not dataclasses
(EventLog, ReplayedLog: lazily built caches in slots) and are as read-only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Immutable", "unfrozen_twin"]


def unfrozen_twin(cls: type) -> Any:
    """A class with ``cls``'s slots and no ``__setattr__`` of its own (see module doc).

    Raises TypeError at import if ``cls`` is not a slotted dataclass whose slots are
    exactly its fields, or if CPython refuses the layout.
    """
    slots = getattr(cls, "__slots__", None)
    fields = tuple(f.name for f in dataclasses.fields(cls))
    if slots != fields or hasattr(object.__new__(cls), "__dict__"):
        raise TypeError(f"{cls.__name__}: slots {slots!r} are not its fields {fields!r}")
    twin = type(f"_Unfrozen{cls.__name__}", (), {"__slots__": slots, "__module__": __name__})
    probe: Any = object.__new__(twin)
    probe.__class__ = cls  # TypeError here if the layouts differ
    return twin


class Immutable:
    """Base of the slotted classes whose ``__init__`` sets every slot through
    ``object.__setattr__`` (caches included): afterwards, no attribute can be set or
    deleted, as on a frozen dataclass."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot set {name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable (cannot delete {name})")
