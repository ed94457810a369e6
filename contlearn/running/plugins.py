"""Loading a user's own agent class, turning its constructor into config options, and naming a
class so that a resume or a sweep worker finds it again (:func:`class_ref`).

A plug-in agent's constructor is ``Class(info, seed, **options)`` (or ``Class(info, seeds,
**options)`` when the class sets ``supports_replicas = True``). Each keyword option with a
default becomes a config key (``--set name=value``), typed by its default. A parameter named
``learner`` receives the run's :class:`contlearn.learners.Learner` instead.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from contlearn.agents.protocol import Agent, BuiltinAgentClass
from contlearn.errors import ConfigError
from contlearn.registry import file_module_path, is_file_ref, load_entry_point, where
from contlearn.spec import FieldInfo

_SIMPLE = (bool, int, float, str)
_where = where  # (its old name here: contlearn.running.agent_check imports it)


def load_agent_class(ref: str) -> type:
    """Import ``module:Class`` or ``path/to/file.py:Class``.

    The current directory is put on ``sys.path`` so modules next to the user resolve.
    """
    path_part, sep, attr = ref.rpartition(":")
    if not sep or not path_part or not attr:
        raise ConfigError(f"agent {ref!r} is not of the form module:Class or file.py:Class")
    if not is_file_ref(ref) and "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    obj = load_entry_point(ref, "agent")
    if not inspect.isclass(obj):
        raise ConfigError(f"agent {ref!r} is not a class")
    missing = [m for m in ("act", "observe") if not callable(getattr(obj, m, None))]
    if missing:  # (the class, not an instance: Agent's members by name)
        raise ConfigError(
            f"agent {ref!r} lacks {', '.join(missing)}(); see the Agent Protocol in the README"
        )
    return obj


def agent_options(cls: type) -> list[FieldInfo]:
    """The config options of a plug-in agent: its constructor's keyword parameters."""
    params = list(inspect.signature(cls).parameters.values())  # (the constructor's, no self)
    out = []
    for p in params[2:]:  # drop info, seed(s)
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "learner":
            continue
        if p.default is p.empty or not isinstance(p.default, _SIMPLE):
            raise ConfigError(
                f"{cls.__name__}.__init__ parameter {p.name!r} needs a default of type bool, "
                "int, float or str to be a config option"
            )
        out.append(FieldInfo(p.name, type(p.default), p.default, "", None, None, None, False))
    return out


def takes_learner(cls: type) -> bool:
    """Whether an agent class uses a learner (built-in agents do; plug-ins if they ask)."""
    if isinstance(cls, BuiltinAgentClass):
        return True
    return "learner" in inspect.signature(cls).parameters


def build_plugin_agent(
    cls: type, info: Any, seeds: Any, options: dict[str, Any], learner: Any
) -> Agent:
    """Instantiate a plug-in agent with its options (and the learner if it asks for one)."""
    kwargs = dict(options)
    if takes_learner(cls):
        kwargs["learner"] = learner
    try:
        return cls(info, seeds, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's constructor: its error, in one line
        raise ConfigError(
            f"agent {cls.__name__} failed to start ({where(exc)}); fix the agent or its options"
        ) from exc


def agent_ref(cls: type) -> str:
    """``module:Class`` for a class (what config.json records for a plug-in agent)."""
    return class_ref(cls, "agent")


def class_ref(cls: type, what: str) -> str:
    """A reference that finds ``cls`` again in another process or directory.

    ``module:Class`` for a class of an importable module; ``/abs/file.py:Class`` for one loaded
    from a file, or defined at the top of the script being run (``__main__`` with a file).

    Raises:
        ConfigError: the class cannot be found again (defined in a notebook or an interactive
            session, or inside a function).
    """
    module = sys.modules.get(cls.__module__)
    file = file_module_path(cls.__module__)
    if file is None and cls.__module__ == "__main__":
        main_file = vars(module).get("__file__") if module is not None else None
        if main_file and main_file.endswith(".py") and Path(main_file).is_file():
            file = str(Path(main_file).absolute())
    ref = f"{file}:{cls.__qualname__}" if file else f"{cls.__module__}:{cls.__qualname__}"
    if "<locals>" not in cls.__qualname__ and (file or cls.__module__ != "__main__"):
        found = _found(module, cls.__qualname__)
        if found is cls:
            return ref
    place = "a function" if "<locals>" in cls.__qualname__ else cls.__module__
    raise ConfigError(
        f"{what} class {cls.__name__} is defined in {place}, where a resume or a sweep worker "
        "cannot find it again; define it in a module or file and pass module:Class / "
        "file.py:Class"
    )


def _found(module: object, qualname: str) -> object:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj
