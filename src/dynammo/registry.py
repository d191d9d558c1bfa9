"""A small name -> factory registry (methods, datasets, backbones), with aliases, and the one way its
entries get there: every module of the package registers itself when `register_modules` imports it."""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable, Dict, Generic, Iterable, Iterator, TypeVar

from dynammo.errors import UserError

T = TypeVar("T")


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._aliases: Dict[str, str] = {}

    def register(self, name: str, aliases: tuple = ()) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return deco

    def canonical(self, name: str) -> str:
        key = str(name).lower()
        key = self._aliases.get(key, key)
        if key not in self._items:
            raise UserError(
                f"unknown {self.kind} {str(name)!r}{closest(key, self.names())}; "
                f"available: {', '.join(self.names())}"
            )
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self) -> list:
        return sorted(self._items)

    def aliases_of(self, name: str) -> list:
        return sorted(a for a, n in self._aliases.items() if n == name)

    def __contains__(self, name: str) -> bool:
        key = str(name).lower()
        return self._aliases.get(key, key) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def register_modules(package: str, path: Iterable[str], helpers: Iterable[str] = ()) -> None:
    """Import every module of a package but its `helpers` (what several entries share), by name: each
    registers its entries, so a new file needs no edit of a list."""
    found = {m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_")} - set(helpers)
    for name in sorted(found):
        importlib.import_module(f"{package}.{name}")
