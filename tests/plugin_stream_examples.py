"""Plug-in streams for the tests: a correct one written from scratch (no base class), and one
that breaks the protocol in several ways :func:`contlearn.envs.check_stream` must name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from contlearn.envs.base import Batch, StreamInfo


@dataclass(frozen=True)
class DriftSpec:
    """Options of :class:`DriftStream`."""

    examples_per_task: int = 6
    batch_size: int = 2
    inputs: int = 3


class DriftStream:
    """Regression whose target weights are drawn anew each task, per replica from its seed."""

    Spec = DriftSpec
    kind = "regression"

    def __init__(self, spec: DriftSpec, seeds: list[int]) -> None:
        self.spec, self.seeds = spec, [int(s) for s in seeds]
        self.steps_per_task = spec.examples_per_task // spec.batch_size
        self.step, self.task = 0, -1
        self.gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.probe_gens = [torch.Generator().manual_seed(s + 2**40) for s in self.seeds]
        R = len(self.seeds)
        self.info = StreamInfo(
            "drift", "regression", (spec.inputs,), 1, False, R, "squared_error", spec.batch_size
        )
        self.w = torch.zeros(R, spec.inputs, 1)

    def _x(self, gens: list[torch.Generator], n: int) -> torch.Tensor:
        return torch.stack([torch.randn(n, self.spec.inputs, generator=g) for g in gens])

    def next(self) -> Batch:
        new = self.step % self.steps_per_task == 0
        if new:
            self.task += 1
            self.w = torch.stack([torch.randn(self.spec.inputs, 1, generator=g) for g in self.gens])
        x = self._x(self.gens, self.spec.batch_size)  # (R, B, inputs)
        self.step += 1
        return Batch(x, torch.bmm(x, self.w), self.task, new)

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target).pow(2).sum(-1)

    def probe_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._x(self.probe_gens, size)
        return x, torch.bmm(x, self.w)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "task": self.task,
            "w": self.w.clone(),
            "gens": [g.get_state() for g in self.gens],
            "probe_gens": [g.get_state() for g in self.probe_gens],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.task, self.w = int(state["step"]), int(state["task"]), state["w"].clone()
        for g, s in zip(self.gens, state["gens"], strict=True):
            g.set_state(s)
        for g, s in zip(self.probe_gens, state["probe_gens"], strict=True):
            g.set_state(s)

    def close(self) -> None:
        pass


class BrokenStream(DriftStream):
    """Replicas share one generator seeded by every seed, probing draws from the stream's own
    generators, the state forgets the generators, and a second close fails."""

    def __init__(self, spec: DriftSpec, seeds: list[int]) -> None:
        super().__init__(spec, seeds)
        shared = torch.Generator().manual_seed(sum(self.seeds) * 7919)
        self.gens = [shared] * len(self.seeds)
        self.closed = False

    def probe_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._x(self.gens, size)
        return x, torch.bmm(x, self.w)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "task": self.task, "w": self.w.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.task, self.w = int(state["step"]), int(state["task"]), state["w"].clone()

    def close(self) -> None:
        if self.closed:
            raise RuntimeError("already closed")
        self.closed = True


class NotAStream:
    """No Spec dataclass, an unknown kind, and no methods."""

    Spec = dict
    kind = "video"


class NoScore(DriftStream):
    """A regression stream without ``score`` or ``probe_batch``."""

    score = None  # type: ignore[assignment]
    probe_batch = None  # type: ignore[assignment]


class NoInfo(DriftStream):
    """Builds without the ``info`` attribute."""

    def __init__(self, spec: DriftSpec, seeds: list[int]) -> None:
        super().__init__(spec, seeds)
        del self.info
