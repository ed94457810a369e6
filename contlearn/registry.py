"""Name -> string entry point registries (streams, learners, agents, credit rules).

Entries are registered as ``"module:attr"`` strings, as gymnasium does, so listing or looking up
a name never imports heavy modules (mujoco, ray) until the entry is actually built. An entry
point may also be ``"path/to/file.py:attr"``: the file is imported as a module of its own
(its ``if __name__ == "__main__"`` block does not run) and its path is kept absolute.

Each registry is *sealed* after its built-in entries; what is registered later (a user's
``streams.register(...)`` at run time) is listed by :func:`runtime_registrations`, which a
sweep hands to its worker processes so that they register the same (:func:`restore`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from contlearn.errors import ConfigError

#: where each registry lives (``module:attr``), by kind
REGISTRIES = {
    "stream": "contlearn.envs:streams",
    "agent": "contlearn.agents:agents",
    "learner": "contlearn.learners:learners",
    "credit rule": "contlearn.credit:credit_rules",
}


@dataclass(frozen=True)
class Entry:
    """One registered item.

    Attributes:
        name: the id users type (``permuted-mnist``, ``cbp``).
        entry_point: ``"package.module:attr"`` (or ``"/abs/file.py:attr"``) of the class or
            factory.
        summary: one line shown by ``contlearn list``.
    """

    name: str
    entry_point: str
    summary: str = ""

    def load(self) -> Any:
        """Import and return the object behind the entry point."""
        return load_entry_point(self.entry_point)


class Registration(NamedTuple):
    """A registration made at run time, as a sweep passes it to its workers."""

    kind: str
    name: str
    entry_point: str
    summary: str


def is_file_ref(ref: str) -> bool:
    """Whether ``ref`` is of the form ``path/to/file.py:attr``."""
    path_part, sep, _ = ref.rpartition(":")
    return bool(sep) and path_part.endswith(".py")


def absolute_ref(ref: str) -> str:
    """``file.py:attr`` with the file's absolute path (relative to the current directory);
    other references unchanged."""
    if not is_file_ref(ref):
        return ref
    path_part, _, attr = ref.rpartition(":")
    return f"{Path(path_part).expanduser().absolute()}:{attr}"


#: file modules imported so far: absolute path -> (modification time, module)
_FILE_MODULES: dict[str, tuple[int, Any]] = {}


def file_module_path(module_name: str) -> str | None:
    """The absolute file of a module that :func:`load_entry_point` imported from a file."""
    for path, (_, module) in _FILE_MODULES.items():
        if module.__name__ == module_name:
            return path
    return None


def _import_file(file: Path, what: str) -> Any:
    """Import a ``.py`` file as a module of its own (again only if it changed since)."""
    if not file.is_file():
        raise ConfigError(f"{what} file {file} does not exist; check the path")
    key = str(file.absolute())
    mtime = file.stat().st_mtime_ns
    known = _FILE_MODULES.get(key)
    if known is not None and known[0] == mtime:
        return known[1]
    # a name per path: two files of the same name do not replace each other's module
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    name = f"contlearn_user_{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{what} file {file} cannot be imported; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses and pickling look the module up by name)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: any error is theirs to fix
        sys.modules.pop(name, None)
        raise ConfigError(f"{what} file {file} cannot be loaded ({where(exc)}); fix it") from exc
    _FILE_MODULES[key] = (mtime, module)
    return module


def load_entry_point(entry_point: str, what: str = "entry point") -> Any:
    """Import ``"module:attr"`` or ``"path/to/file.py:attr"`` (attr may be dotted) and return
    the attribute.

    Raises:
        ConfigError: the string is malformed, or the module, file or attribute does not exist.
    """
    if is_file_ref(entry_point):
        path_part, _, attr = entry_point.rpartition(":")
        file = Path(path_part).expanduser()
        obj: Any = _import_file(file, what)
        origin, thing = f"{file}", "class"
    else:
        module_name, sep, attr = entry_point.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigError(
                f"malformed {what} {entry_point!r}; use the form module:Class or file.py:Class"
            )
        obj = _import_module(module_name)
        origin, thing = f"module {module_name!r}", "attribute"
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{origin} has no {thing} {attr!r}; check the name")
        obj = getattr(obj, part)
    return obj


def _import_module(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
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


def where(exc: BaseException) -> str:
    """``SyntaxError: invalid syntax at my_agent.py:3`` or ``ValueError: msg at file.py:12``:
    an exception and the user's line it came from, on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{type(exc).__name__}: {exc.msg} at {Path(exc.filename).name}:{exc.lineno}"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    at = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else ""
    return f"{type(exc).__name__}: {text}{at}"


class Registry:
    """A named collection of entries of one kind (``stream``, ``learner``, ``agent``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._builtin: frozenset[str] = frozenset()

    def register(self, name: str, entry_point: str, summary: str = "") -> None:
        """Add an entry; re-registering an existing name with a different target is an error.

        A ``file.py:attr`` entry point is stored with the file's absolute path.
        """
        entry_point = absolute_ref(entry_point)
        existing = self._entries.get(name)
        if existing is not None and existing.entry_point != entry_point:
            raise ValueError(
                f"{self.kind} {name!r} is already registered to {existing.entry_point}"
            )
        self._entries[name] = Entry(name, entry_point, summary)

    def seal(self) -> None:
        """Mark the entries so far as built in (registered when the package is imported)."""
        self._builtin = frozenset(self._entries)

    def added(self) -> list[Entry]:
        """The entries registered after :meth:`seal`: at run time, by the user."""
        return [e for n, e in self._entries.items() if n not in self._builtin]

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


def runtime_registrations() -> list[Registration]:
    """Every registration made at run time, in the registries imported so far (one that was
    never imported holds none)."""
    out = []
    for kind, ref in REGISTRIES.items():
        if ref.partition(":")[0] in sys.modules:
            registry: Registry = load_entry_point(ref)
            out += [Registration(kind, e.name, e.entry_point, e.summary) for e in registry.added()]
    return out


def check_portable(
    registrations: list[Registration], used: Collection[tuple[str, str]] | None = None
) -> None:
    """Refuse registrations that another process cannot import again.

    Args:
        registrations: from :func:`runtime_registrations`.
        used: the ``(kind, name)`` pairs that will be looked up there (None: all of them).

    Raises:
        ConfigError: an entry point in ``__main__`` (a notebook's or a script's own namespace).
    """
    for reg in registrations:
        if used is not None and (reg.kind, reg.name) not in used:
            continue
        if reg.entry_point.partition(":")[0] in ("__main__", "__mp_main__"):
            raise ConfigError(
                f"{reg.kind} {reg.name!r} is registered to {reg.entry_point}, which a sweep "
                "worker cannot import; define it in a module or file and register "
                "'module:Class' or 'file.py:Class'"
            )


def restore(registrations: list[Registration]) -> None:
    """Register what :func:`runtime_registrations` listed (in a sweep's worker process)."""
    for reg in registrations:
        registry: Registry = load_entry_point(REGISTRIES[reg.kind])
        registry.register(reg.name, reg.entry_point, reg.summary)
