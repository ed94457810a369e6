"""Resolving a run's configuration from defaults, a TOML/JSON file and ``--set`` overrides.

Keys are flat and the same everywhere (CLI ``--set``, config files, ``config.json``):

- identity: ``stream``, ``agent``, ``learner``, ``credit`` (the credit-assignment rule);
- run: ``seed``, ``seeds``, ``tasks``, ``steps``, ``flush_rows``, ``flush_seconds``;
- every option of the chosen stream (``examples_per_task``, ``batch_size``, ...);
- every option of the chosen agent (``hidden``, ``activation``, ``lr``, ``optimizer``, ...);
- ``learner.<param>`` for the chosen learner's options, ``credit.<param>`` for the rule's.

Precedence, lowest first: option defaults < the stream's suggested agent defaults < the
learner's agent defaults (``proper-adam`` sets Adam) < config file < ``--set``; for learner
options, the agent's ``learner_defaults`` (``ff`` sets CBP's local utility) < config file <
``--set``. An agent class may declare ``stream_kinds`` (the stream kinds it learns on),
``unsupported_learners``, ``learner_problem(learner) -> reason | None`` and
``options_problem(agent_spec, learner) -> reason | None`` (combinations of its options with
the learner) and ``resolve_auto`` (speed options left at ``auto``, chosen here so that
``config.json`` records the choice: :mod:`contlearn.backends.auto`). Unknown keys,
bad values and such refusals are :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contlearn.backends.auto import resolve_auto
from contlearn.errors import ConfigError
from contlearn.spec import FieldInfo, build_spec, param, parse_value, spec_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

IDENTITY_KEYS = ("stream", "agent", "learner", "credit")
#: the most intra-op threads a run may ask for (torch crashes, without a message, far above)
MAX_THREADS = 1024


@dataclass(frozen=True)
class RunSpec:
    """Options of the run itself."""

    seed: int = param(0, "first seed; replicas use seed, seed+1, ...", low=0, high=2**62)
    seeds: int = param(1, "number of seeds (replicas)", low=1)
    tasks: int = param(0, "tasks to run (0: use steps, or 100 tasks if neither is set)", low=0)
    steps: int = param(0, "steps to run instead of tasks (0: use tasks)", low=0)
    probes: str = param("default", "probes to record: default, none, or a comma-separated list")
    probe_every: int = param(0, "probe every N steps (0: at the start of every task)", low=0)
    probe_size: int = param(2000, "inputs per probe batch (per seed)", low=1)
    on_divergence: str = param(
        "mark",
        "a NaN/inf loss marks that seed diverged and stops its "
        "learning (mark) or stops the run (stop)",
        choices=("mark", "stop"),
    )
    checkpoint_every: int = param(0, "checkpoint every N steps (0: by time only)", low=0)
    checkpoint_minutes: float = param(10.0, "checkpoint every so many minutes (0: never)", low=0.0)
    checkpoint_keep: int = param(2, "newest checkpoints kept", low=1)
    flush_rows: int = param(50_000, "metric rows buffered before a parquet part is written", low=1)
    flush_seconds: float = param(60.0, "longest time metric rows stay only in memory (s)", low=0.0)
    threads: int = param(
        0,
        "intra-op CPU threads (0: auto, 1 for small networks, every core "
        "for large ones; see docs/performance.md)",
        low=0,
        high=MAX_THREADS,
    )
    device: str = param(
        "cpu",
        "torch device of the network and learner state (cpu, cuda, "
        "cuda:1, ...); streams stay on the CPU",
    )
    log: str = param(
        "none",
        "stream every metric live to experiment trackers: none, tensorboard, wandb or "
        "tensorboard,wandb (one tracker run per seed; docs/trackers.md)",
    )

    def validate(self) -> None:
        """Tasks and steps are alternatives; the trackers are installed; the device exists."""
        if self.tasks and self.steps:
            raise ConfigError(f"give tasks ({self.tasks}) or steps ({self.steps}), not both")
        from contlearn.probes.measures import parse_probes
        from contlearn.results.trackers import parse_trackers

        parse_probes(self.probes)
        parse_trackers(self.log)
        import torch

        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(
                f"device={self.device!r} is not a torch device; e.g. cpu or cuda"
            ) from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(
                f"device={self.device} is not supported (networks and learner state run on "
                "cpu or cuda); use device=cpu or device=cuda"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device} but torch sees no CUDA device; use device=cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"device={self.device} but torch sees {torch.cuda.device_count()} CUDA "
                "device(s); use cuda:0 or fewer"
            )


DEFAULT_TASKS = 100


@dataclass
class RunConfig:
    """A fully resolved run configuration.

    Attributes:
        stream: registered stream id, or ``module:Class`` / ``/abs/file.py:Class`` of a
            plug-in stream.
        agent: registered agent name or ``module:Class`` / ``/abs/file.py:Class`` of a
            plug-in agent.
        learner: a :class:`contlearn.learners.Learner` (name + options).
        run: the :class:`RunSpec`.
        stream_spec: the stream's Spec instance.
        agent_spec: the agent's Spec instance (built-in) or option dict (plug-in).
        agent_cls: the agent class.
        stream_cls: the stream class (None: look ``stream`` up again).
    """

    stream: str
    agent: str
    learner: Any
    run: RunSpec
    stream_spec: Any
    agent_spec: Any
    agent_cls: type
    stream_cls: type | None = None

    @property
    def stream_label(self) -> str:
        """The stream's short name: its id, or a plug-in's class name (run names, metrics)."""
        return self.stream.rpartition(":")[2] if ":" in self.stream else self.stream

    @property
    def seeds(self) -> list[int]:
        """The replicas' root seeds."""
        return list(range(self.run.seed, self.run.seed + self.run.seeds))

    def to_dict(self) -> dict[str, Any]:
        """Flat ``key -> value`` with every resolved option (what ``config.json`` holds)."""
        out: dict[str, Any] = {
            "stream": self.stream,
            "agent": self.agent,
            "learner": self.learner.name,
            "credit": self.learner.credit.name,
        }
        out.update(asdict(self.run))
        out.update(asdict(self.stream_spec))
        agent = self.agent_spec if isinstance(self.agent_spec, dict) else asdict(self.agent_spec)
        out.update(agent)
        out.update({f"learner.{k}": v for k, v in asdict(self.learner.spec).items()})
        if self.learner.credit.spec is not None:
            out.update({f"credit.{k}": v for k, v in asdict(self.learner.credit.spec).items()})
        return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted keys; a ``[learner]`` table's ``name`` is the learner id."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} is not a string")
        full = prefix + key
        if isinstance(value, Mapping):
            for k, v in flatten(value, full + ".").items():
                out[full if k == f"{full}.name" and full in IDENTITY_KEYS else k] = v
        else:
            out[full] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (or JSON, e.g. a run's ``config.json``) config file into flat keys.

    Raises:
        ConfigError: the file is missing or malformed.
    """
    file = Path(path)
    try:
        text = file.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {file} ({exc.strerror}); check the path"
        ) from None
    try:
        data = json.loads(text) if file.suffix == ".json" else tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {file} is malformed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a table of keys")
    return flatten(data)


def parse_set(items: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` from ``--set`` into a dict (later items win)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; e.g. --set lr=0.01")
        out[key.strip()] = value
    return out


def _unknown(key: str, known: list[str], context: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown config key {key!r} for {context}{hint}; see `contlearn list` for the options"
    )


def _agent_fields(agent_cls: type) -> list[FieldInfo]:
    spec_cls = getattr(agent_cls, "Spec", None)
    if spec_cls is None:
        from contlearn.running.plugins import agent_options

        return agent_options(agent_cls)
    return spec_fields(spec_cls)


def resolve(values: Mapping[str, Any]) -> RunConfig:
    """Resolve a run's config from user values (file values updated by ``--set`` values).

    Args:
        values: flat keys as described in the module docstring; must include ``stream``.

    Raises:
        ConfigError: missing stream, unknown names or keys, bad values.
    """
    from contlearn.agents import agents
    from contlearn.credit import Credit, check_agent_credit, credit_def
    from contlearn.envs.plugins import resolve_stream
    from contlearn.learners import Learner, learner_def
    from contlearn.registry import absolute_ref
    from contlearn.running.plugins import agent_ref, load_agent_class

    values = dict(values)
    stream = values.pop("stream", None)
    if not isinstance(stream, (str, type)) or not stream:
        raise ConfigError("no stream given; name one, e.g. `contlearn run permuted-mnist`")
    stream_cls, stream = resolve_stream(stream)
    agent = values.pop("agent", getattr(stream_cls, "default_agent", "online"))
    if isinstance(agent, type):
        agent_cls, agent = agent, agent_ref(agent)
    elif not isinstance(agent, str):
        raise ConfigError(f"agent={agent!r} must be a registered name or module:Class")
    elif ":" in agent:
        agent_cls, agent = load_agent_class(agent), absolute_ref(agent)
    else:
        agent_cls = agents.get(agent)
    kinds = getattr(agent_cls, "stream_kinds", None)
    if kinds is not None and getattr(stream_cls, "kind", None) not in kinds:
        raise ConfigError(
            f"agent {agent} learns on {' or '.join(kinds)} streams, and {stream} is a "
            f"{stream_cls.kind} stream; choose another agent or stream (see `contlearn list`)"
        )
    learner_name = values.pop("learner", "bp")
    if not isinstance(learner_name, str):
        raise ConfigError(f"learner={learner_name!r} must be a learner name")
    ldef = learner_def(learner_name)
    reason = getattr(agent_cls, "unsupported_learners", {}).get(learner_name)
    if reason:
        raise ConfigError(f"learner {learner_name} does not apply to agent {agent}: {reason}")
    _check_stream_kind(agent_cls, agent, stream_cls, stream)

    credit_name = values.pop("credit", "bp")
    if not isinstance(credit_name, str):
        raise ConfigError(f"credit={credit_name!r} must be a credit rule name")
    cdef = credit_def(credit_name)
    check_agent_credit(agent_cls, agent, credit_name)

    run_fields = [f.name for f in spec_fields(RunSpec)]
    stream_fields = [f.name for f in spec_fields(stream_cls.Spec)]
    agent_fields = {f.name: f for f in _agent_fields(agent_cls)}
    learner_fields = [f"learner.{f.name}" for f in spec_fields(ldef.Spec)]
    credit_fields = [f"credit.{f.name}" for f in spec_fields(cdef.Spec)]

    groups: dict[str, dict[str, Any]] = {
        "run": {},
        "stream": {},
        "agent": {},
        "learner": {},
        "credit": {},
    }
    for key, value in values.items():
        if key in run_fields:
            groups["run"][key] = value
        elif key in stream_fields:
            groups["stream"][key] = value
        elif key in agent_fields:
            groups["agent"][key] = value
        elif key in learner_fields:
            groups["learner"][key.removeprefix("learner.")] = value
        elif key in credit_fields:
            groups["credit"][key.removeprefix("credit.")] = value
        else:
            reason = getattr(agent_cls, "refused_options", {}).get(key)
            if reason:  # (an option other agents have, which this one declares it lacks)
                raise ConfigError(f"{key} does not apply to agent {agent}: {reason}")
            known = run_fields + stream_fields + list(agent_fields) + learner_fields + credit_fields
            raise _unknown(
                key,
                known,
                f"stream {stream!r}, agent {agent!r}, learner {learner_name!r}, "
                f"credit {credit_name!r}",
            )

    suggested = {**getattr(stream_cls, "agent_defaults", {}), **ldef.agent_defaults}
    agent_values = {k: v for k, v in suggested.items() if k in agent_fields}
    agent_values.update(groups["agent"])
    spec_cls = getattr(agent_cls, "Spec", None)
    if spec_cls is not None:
        agent_spec: Any = build_spec(spec_cls, agent_values)
    else:
        agent_spec = {f.name: f.default for f in agent_fields.values()}
        agent_spec.update({k: parse_value(agent_fields[k], v, k) for k, v in agent_values.items()})
    # the agent's defaults for this learner's options (ff: CBP's local utility), then the user's
    learner_values = {**getattr(agent_cls, "learner_defaults", {}).get(learner_name, {})}
    learner_values.update(groups["learner"])
    chosen = Learner(
        learner_name,
        build_spec(ldef.Spec, learner_values, "learner."),
        Credit(credit_name, build_spec(cdef.Spec, groups["credit"], "credit.")),
    )
    problem = getattr(agent_cls, "learner_problem", None)
    if callable(problem) and (why := problem(chosen)):
        raise ConfigError(f"learner {learner_name} does not apply to agent {agent}: {why}")
    options = getattr(agent_cls, "options_problem", None)
    if callable(options) and (why := options(agent_spec, chosen)):
        raise ConfigError(f"agent {agent}: {why}")
    run_spec = build_spec(RunSpec, groups["run"])
    stream_spec = build_spec(stream_cls.Spec, groups["stream"])
    agent_spec, stream_spec = resolve_auto(agent_cls, agent_spec, stream_spec, chosen, run_spec)
    config = RunConfig(
        stream=stream,
        agent=agent,
        learner=chosen,
        run=run_spec,
        stream_spec=stream_spec,
        agent_spec=agent_spec,
        agent_cls=agent_cls,
        stream_cls=stream_cls,
    )
    from contlearn.loop.held_out import check_held_out
    from contlearn.running.limits import check_limits

    check_limits(config)
    check_held_out(config.agent_cls, agent, stream_cls, config.stream_spec)
    copies = getattr(config.stream_spec, "num_envs", 1)
    if getattr(stream_cls, "kind", None) == "rl" and config.run.steps % copies:
        raise ConfigError(
            f"steps={config.run.steps} must be a multiple of num_envs={copies}: RL steps count "
            "the environment steps of a seed over all its copies, and a loop step takes one "
            "of each"
        )
    return config


def _check_stream_kind(agent_cls: type, agent: str, stream_cls: type, stream: str) -> None:
    """An agent class that declares ``stream_kinds`` learns only on streams of those kinds."""
    kinds = getattr(agent_cls, "stream_kinds", None)
    kind = getattr(stream_cls, "kind", None)
    if kinds is not None and kind not in kinds:
        raise ConfigError(
            f"agent {agent} learns only on {' or '.join(kinds)} streams; stream {stream} is of "
            f"kind {kind}"
        )


def total_steps(
    config: RunConfig, steps_per_task: int, steps_until: Callable[[int], int] | None = None
) -> int:
    """Steps the run takes: ``steps``, or ``tasks`` × steps per task (100 tasks by default),
    or ``steps_until(tasks)`` for a stream whose tasks differ in length."""
    if config.run.steps:
        return config.run.steps
    tasks = config.run.tasks or DEFAULT_TASKS
    return steps_until(tasks) if steps_until is not None else tasks * steps_per_task
