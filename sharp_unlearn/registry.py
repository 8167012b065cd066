"""One tiny registry type shared by datasets, models, methods and metrics.

Members register with a decorator; each package's ``__init__`` imports every
member module explicitly so the full list is greppable.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sharp_unlearn.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._members: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._members:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._members[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._members[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
