"""Name -> string entry point registries (streams, learners, agents).

Entries are registered as ``"module:attr"`` strings, as gymnasium does, so listing or looking up
a name never imports heavy modules (mujoco, ray) until the entry is actually built.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from contlearn.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    """One registered item.

    Attributes:
        name: the id users type (``permuted-mnist``, ``cbp``).
        entry_point: ``"package.module:attr"`` of the class or factory.
        summary: one line shown by ``contlearn list``.
    """

    name: str
    entry_point: str
    summary: str = ""

    def load(self) -> Any:
        """Import and return the object behind the entry point."""
        return load_entry_point(self.entry_point)


def load_entry_point(entry_point: str) -> Any:
    """Import ``"module:attr"`` (attr may be dotted) and return the attribute.

    Raises:
        ConfigError: the string is malformed, or the module or attribute does not exist.
    """
    module_name, sep, attr = entry_point.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"malformed entry point {entry_point!r}; use the form module:Class")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} ({exc}); check the name and that its folder "
            "is on PYTHONPATH or the current directory"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a module that fails to import: say so, in a line
        first = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"module {module_name!r} fails to import ({type(exc).__name__}: {first}); fix it"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}; check the name")
        obj = getattr(obj, part)
    return obj


class Registry:
    """A named collection of entries of one kind (``stream``, ``learner``, ``agent``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, entry_point: str, summary: str = "") -> None:
        """Add an entry; re-registering an existing name with a different target is an error."""
        existing = self._entries.get(name)
        if existing is not None and existing.entry_point != entry_point:
            raise ValueError(
                f"{self.kind} {name!r} is already registered to {existing.entry_point}"
            )
        self._entries[name] = Entry(name, entry_point, summary)

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._entries)

    def entry(self, name: str) -> Entry:
        """The entry for ``name``, or a ConfigError naming close matches."""
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(name, self._entries, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown {self.kind} {name!r}; {hint}choose one of {', '.join(self._entries)} "
            f"(see `contlearn list {self.kind}s`)"
        )

    def get(self, name: str) -> Any:
        """Import and return the object registered as ``name``."""
        return self.entry(name).load()

    def __contains__(self, name: object) -> bool:
        return name in self._entries
