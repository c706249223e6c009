"""One small name-keyed registry for models, datasets, pruners and devices (timm style).

Entries are frozen dataclasses with at least `name` and `description`; an
unknown name raises an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from deeplsp.errors import DeepLSPError, UnknownNameError


class Entry(Protocol):
    name: str
    description: str


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, E] = {}

    def register(self, entry: E) -> E:
        if entry.name in self._entries:
            raise DeepLSPError(f"{self.kind} {entry.name!r} is already registered")
        self._entries[entry.name] = entry
        return entry

    def get(self, name: str) -> E:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def list(self, where: Callable[[E], bool] | None = None) -> list[E]:
        return [e for e in self._entries.values() if where is None or where(e)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
