"""``check_agent``: run a plug-in agent for a few steps and name every contract it breaks.

Like gymnasium's ``check_env``: the agent is built as a run would build it, on the stream's
default settings, and taken through what a run asks of it, each check reported in plain
words:

1. its class: ``act`` and ``observe``, constructor options with simple defaults;
2. its constructor, with the stream's ``StreamInfo`` and the seed (a list of seeds for a
   replica agent);
3. ``steps`` steps of the run's own loop, which checks every return
   (:mod:`contlearn.agents.contract`): ``act`` gives a float tensor of the stream's shape,
   ``observe`` a dict of metrics of the right type and shape, and neither raises;
4. the optional capabilities it has: ``features`` (per-layer activations of the probe batch's
   shape), ``parameters``, ``state_dict`` (it must load with ``torch.load(weights_only=True)``
   and, loaded into a fresh agent, give the same answers), and determinism (two agents built
   with the same seed answer the first inputs alike).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

from contlearn.agents.contract import AgentContractError
from contlearn.agents.protocol import SupportsCheckpoints, SupportsFeatures, capabilities
from contlearn.errors import ConfigError
from contlearn.loop.adapter import SingleReplicaAdapter
from contlearn.loop.progress import Progress
from contlearn.probes.measures import network_of
from contlearn.running.plugins import _where


@dataclass
class AgentReport:
    """What :func:`check_agent` found on an agent that keeps the contract.

    Attributes:
        agent: the agent's name as a run records it.
        capabilities: the optional capabilities it has (names of
            :mod:`contlearn.agents.protocol` Protocols, as the engine sees it).
        notes: what it lacks that a run would miss (no probes, no resume), in words.
    """

    agent: str
    capabilities: list[str]
    notes: list[str] = field(default_factory=list)


def check_agent(
    agent: str | type,
    stream: str = "permuted-mnist",
    *,
    seeds: int = 2,
    steps: int = 20,
    config: dict[str, Any] | None = None,
) -> AgentReport:
    """Build ``agent`` on ``stream`` and run it ``steps`` steps, checking every contract.

    Args:
        agent: the agent class, ``module:Class``, ``file.py:Class`` or a registered name.
        stream: a registered stream id.
        seeds: replicas (a replica agent gets them all; others one each).
        steps: steps to run.
        config: config keys for the stream and the agent's options (as ``--set``).

    Returns:
        An :class:`AgentReport` if the agent keeps every contract.

    Raises:
        AgentContractError: listing every contract the agent breaks, on one line.
        ConfigError: an unknown stream or a bad config key.
    """
    from contlearn.running.config import resolve
    from contlearn.running.runner import make_agent, make_loop, open_streams

    values = {"stream": stream, "agent": agent, "seeds": seeds, "probes": "none", **(config or {})}
    try:
        cfg = resolve(values)
    except ConfigError as exc:
        if isinstance(agent, str) and ":" not in agent:
            raise
        raise AgentContractError(f"{_name(agent)} breaks the agent contract: {exc}") from exc
    problems: list[str] = []
    notes: list[str] = []
    with open_streams(cfg) as built:
        first = built[0]
        try:
            made = make_agent(cfg, first)
        except (ConfigError, TypeError) as exc:
            raise AgentContractError(f"{cfg.agent} breaks the agent contract: {exc}") from exc
        obs = _first_obs(cfg)
        answer = _answer(made, obs, problems)
        quiet = Progress(steps, first.info.metric, False)
        loop = make_loop(first, made, lambda record: None, quiet, _no_probes(), cfg)
        for _ in range(steps):
            try:
                loop.step()
            except AgentContractError as exc:
                problems.append(str(exc))
                break
            except Exception as exc:  # noqa: BLE001 - the user's code: its error, in words
                problems.append(f"a step raised {_where(exc)}")
                break
        _check_capabilities(made, obs, problems, notes)
        if isinstance(made, SupportsCheckpoints) and answer is not None:
            _check_state(cfg, made, obs, problems)
        if answer is not None:
            with open_streams(cfg) as again:
                twin = make_agent(cfg, again[0])
                other = _answer(twin, obs, problems)
                if other is not None and not torch.equal(answer, other):
                    problems.append(
                        "two agents built with the same seed answer the same first inputs "
                        "differently; draw every random number from a generator seeded with "
                        "the seed it is given"
                    )
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise AgentContractError(f"{cfg.agent} breaks the agent contract: {listed}")
    return AgentReport(cfg.agent, capabilities(made), notes)


def _name(agent: Any) -> str:
    return agent if isinstance(agent, str) else getattr(agent, "__name__", repr(agent))


def _no_probes() -> Any:
    from contlearn.probes.schedule import ProbeSchedule

    return ProbeSchedule()


def _first_obs(cfg: Any) -> torch.Tensor:
    """Inputs to answer: the first observation of a stream of their own (the run's first)."""
    from contlearn.running.runner import open_streams

    with open_streams(cfg) as built:
        stream: Any = built[0]  # (an RL or a supervised stream, by its info.kind)
        return (stream.obs if stream.info.kind == "rl" else stream.next().obs).clone()


def _answer(agent: Any, obs: torch.Tensor, problems: list[str]) -> torch.Tensor | None:
    try:
        out = agent.act(obs)
    except AgentContractError as exc:
        problems.append(str(exc))
        return None
    except Exception as exc:  # noqa: BLE001 - the user's code
        problems.append(f"act raised {_where(exc)}")
        return None
    return out.detach().clone() if isinstance(out, torch.Tensor) else None


def _check_capabilities(
    agent: Any, obs: torch.Tensor, problems: list[str], notes: list[str]
) -> None:
    """``features`` and ``parameters`` where the agent has them; notes for what it lacks."""
    if isinstance(agent, SupportsFeatures):
        try:
            found = agent.features(obs)
            for layer, h in found.items():
                if not isinstance(h, torch.Tensor) or h.shape[:2] != obs.shape[:2]:
                    shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                    problems.append(
                        f"features gave {layer}={shape} for inputs {tuple(obs.shape)}; "
                        "give (R, P, H) per layer (an agent without replicas: (P, H))"
                    )
        except AgentContractError as exc:
            problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - the user's code
            problems.append(f"features raised {_where(exc)}")
    else:
        notes.append("no features(obs): the activation probes (ranks, dead units) do not run")
    params, _ = network_of(agent)
    if not params:
        notes.append("no parameters(): the weight probes do not run")
    if not isinstance(agent, SupportsCheckpoints):
        notes.append("no state_dict()/load_state_dict(): its runs cannot be resumed")
    if isinstance(agent, SingleReplicaAdapter):
        notes.append("no supports_replicas = True: seeds run one after another")


def _check_state(cfg: Any, agent: Any, obs: torch.Tensor, problems: list[str]) -> None:
    """``state_dict`` loads with ``weights_only=True`` and restores the agent's answers."""
    from contlearn.running.runner import make_agent, open_streams

    try:
        buffer = io.BytesIO()
        torch.save(agent.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - what the user's state holds
        problems.append(
            f"state_dict() cannot be saved and loaded with torch.load(weights_only=True) "
            f"({_where(exc)}); keep tensors, numbers, strings, lists and dicts in it"
        )
        return
    mine = _answer(agent, obs, problems)
    with open_streams(cfg) as again:
        fresh = make_agent(cfg, again[0])
        try:
            fresh.load_state_dict(state)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - the user's code
            problems.append(f"load_state_dict raised {_where(exc)}")
            return
        theirs = _answer(fresh, obs, problems)
    if mine is not None and theirs is not None and not torch.equal(mine, theirs):
        problems.append(
            "an agent given load_state_dict(state_dict()) answers differently from the agent "
            "it was saved from; put everything act and observe use in state_dict()"
        )
