"""A tiny image stream for the conv-network tests: binary tasks on random (C, H, W) images
whose class is a per-task pattern added to noise (learnable in a few steps), per replica from
its seed. Not a benchmark: the image streams of issue #20 live in envs/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from contlearn.envs.base import Batch, StreamInfo


@dataclass(frozen=True)
class TinyImageSpec:
    """Options of :class:`TinyImageStream`."""

    examples_per_task: int = 8
    batch_size: int = 2
    channels: int = 1
    side: int = 24


class TinyImageStream:
    """Binary classification of ``(channels, side, side)`` images, a new pair of patterns a
    task."""

    Spec = TinyImageSpec
    kind = "classification"

    def __init__(self, spec: TinyImageSpec, seeds: list[int]) -> None:
        self.spec, self.seeds = spec, [int(s) for s in seeds]
        self.steps_per_task = spec.examples_per_task // spec.batch_size
        self.step, self.task = 0, -1
        self.gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.probe_gens = [torch.Generator().manual_seed(s + 2**40) for s in self.seeds]
        self.shape = (spec.channels, spec.side, spec.side)
        R = len(self.seeds)
        self.info = StreamInfo(
            "tiny-image", "classification", self.shape, 2, True, R, "accuracy", spec.batch_size
        )
        self.patterns = torch.zeros(R, 2, *self.shape)

    def _draw(self, gens: list[torch.Generator], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ys = torch.stack([torch.randint(2, (n,), generator=g) for g in gens])  # (R, n)
        noise = torch.stack([torch.rand(n, *self.shape, generator=g) for g in gens])
        pats = torch.stack([self.patterns[r, ys[r]] for r in range(len(gens))])
        return noise + pats, ys

    def next(self) -> Batch:
        new = self.step % self.steps_per_task == 0
        if new:
            self.task += 1
            fresh = [torch.rand(2, *self.shape, generator=g) for g in self.gens]
            self.patterns = torch.stack(fresh)
        x, y = self._draw(self.gens, self.spec.batch_size)
        self.step += 1
        return Batch(x, y, self.task, new)

    def score(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred.argmax(-1) == target).float()

    def probe_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._draw(self.probe_gens, size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "task": self.task,
            "patterns": self.patterns.clone(),
            "gens": [g.get_state() for g in self.gens],
            "probe_gens": [g.get_state() for g in self.probe_gens],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.task = int(state["step"]), int(state["task"])
        self.patterns = state["patterns"].clone()
        for g, s in zip(self.gens, state["gens"], strict=True):
            g.set_state(s)
        for g, s in zip(self.probe_gens, state["probe_gens"], strict=True):
            g.set_state(s)

    def close(self) -> None:
        pass
