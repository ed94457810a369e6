"""Loading a user's own agent class and turning its constructor into config options.

A plug-in agent's constructor is ``Class(info, seed, **options)`` (or ``Class(info, seeds,
**options)`` when the class sets ``supports_replicas = True``). Each keyword option with a
default becomes a config key (``--set name=value``), typed by its default. A parameter named
``learner`` receives the run's :class:`contlearn.learners.Learner` instead.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from contlearn.agents.protocol import Agent, BuiltinAgentClass
from contlearn.errors import ConfigError
from contlearn.registry import load_entry_point
from contlearn.spec import FieldInfo

_SIMPLE = (bool, int, float, str)


def load_agent_class(ref: str) -> type:
    """Import ``module:Class`` or ``path/to/file.py:Class``.

    The current directory is put on ``sys.path`` so scripts next to the user resolve.
    """
    path_part, sep, attr = ref.rpartition(":")
    if not sep or not path_part or not attr:
        raise ConfigError(f"agent {ref!r} is not of the form module:Class or file.py:Class")
    if path_part.endswith(".py"):
        file = Path(path_part)
        if not file.is_file():
            raise ConfigError(f"agent file {file} does not exist; check the path")
        name = f"contlearn_user_{file.stem}"
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's file: any error is theirs to fix
            sys.modules.pop(name, None)
            raise ConfigError(
                f"agent file {file} cannot be loaded ({_where(exc)}); fix it"
            ) from exc
        if not hasattr(module, attr):
            raise ConfigError(f"{file} has no class {attr!r}; check the name")
        obj = getattr(module, attr)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        obj = load_entry_point(ref)
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
            f"agent {cls.__name__} failed to start ({_where(exc)}); fix the agent or its options"
        ) from exc


def _where(exc: BaseException) -> str:
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


def agent_ref(cls: type) -> str:
    """``module:Class`` for a class (what config.json records for a plug-in agent)."""
    return f"{cls.__module__}:{cls.__qualname__}"
