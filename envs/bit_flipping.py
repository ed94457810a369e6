"""The Bit-Flipping problem: a slowly changing regression (Dohare, Sutton & Mahmood 2021).

Each example has ``num_bits`` (m) input bits. The first ``slow_bits`` (f) stay fixed except that
every ``examples_per_task`` (T) examples one of them, chosen at random, flips; the other m - f are
drawn fresh for every example. The target is a fixed random network: ``target_hidden`` linear
threshold units (LTUs) over the bits and a constant 1,

    z_i = 1[ w_i · [x, 1] > θ_i ],  θ_i = (m + 1)·β − S_i,   y = Σ_i v_i z_i,

with every w_ij, v_i ∈ {−1, +1} uniformly and S_i the number of negative entries of w_i.
Each flip period is one task; the loss is squared error. Everything is drawn per replica from its
own generator, so no data files are needed.

Version History:
    * v0: initial version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from contlearn.envs.base import StreamInfo, SupervisedStream
from contlearn.errors import ConfigError
from contlearn.spec import param

#: fast bits are drawn per replica in blocks of this many steps (fixed, for determinism).
_BLOCK = 1024


@dataclass(frozen=True)
class BitFlippingSpec:
    """Options of the Bit-Flipping stream."""

    examples_per_task: int = param(10_000, "T: examples between flips of a slow bit", low=1)
    batch_size: int = param(1, "examples per step (1 = the online protocol)", low=1)
    num_bits: int = param(20, "m: input bits", low=1)
    slow_bits: int = param(15, "f: slow bits (flip one every T examples)", low=0)
    target_hidden: int = param(100, "LTUs in the target network", low=1)
    beta: float = param(0.7, "β: LTU threshold parameter", low=0.0, high=1.0)
    boundaries_visible: bool = param(False, "tell the agent when a bit flips")

    def validate(self) -> None:
        """Check cross-option constraints."""
        if self.slow_bits > self.num_bits:
            raise ConfigError(f"slow_bits={self.slow_bits} exceeds num_bits={self.num_bits}")
        if self.examples_per_task % self.batch_size:
            raise ConfigError(
                f"examples_per_task={self.examples_per_task} is not a multiple of "
                f"batch_size={self.batch_size}; make it one"
            )


def ltu_target(
    bits: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """The target network's output.

    Args:
        bits: ``(R, B, m)`` inputs in {0, 1}.
        w: ``(R, H, m + 1)`` LTU weights in {−1, +1} (last column multiplies the constant 1).
        theta: ``(R, H)`` thresholds.
        v: ``(R, H)`` output weights in {−1, +1}.

    Returns:
        ``(R, B, 1)`` targets.
    """
    ones = torch.ones(*bits.shape[:-1], 1, dtype=bits.dtype)
    pre = torch.bmm(torch.cat([bits, ones], -1), w.transpose(1, 2))  # (R, B, H)
    z = (pre > theta.unsqueeze(1)).to(bits.dtype)
    return torch.bmm(z, v.unsqueeze(-1))  # (R, B, 1)


class BitFlippingStream(SupervisedStream):
    """Bit-Flipping regression stream (see the module docstring)."""

    Spec: ClassVar[type] = BitFlippingSpec
    #: the CBP paper's learner: one hidden layer of 5 units.
    agent_defaults: ClassVar[dict] = {"hidden": "5"}
    #: small settings for :func:`contlearn.envs.check_stream`
    check_settings: ClassVar[dict] = {"examples_per_task": 4, "batch_size": 2, "target_hidden": 8}
    name = "bit-flipping"
    kind = "regression"
    metric = "squared_error"

    def __init__(self, spec: BitFlippingSpec, seeds) -> None:
        super().__init__(seeds, spec.examples_per_task, spec.batch_size, spec.boundaries_visible)
        self.spec = spec
        m, f, H = spec.num_bits, spec.slow_bits, spec.target_hidden
        w = np.empty((self.num_replicas, H, m + 1))
        v = np.empty((self.num_replicas, H))
        slow = np.empty((self.num_replicas, f))
        for r, rng in enumerate(self.rngs):
            w[r] = rng.choice([-1.0, 1.0], size=(H, m + 1))
            v[r] = rng.choice([-1.0, 1.0], size=H)
            slow[r] = rng.integers(0, 2, size=f)
        self.w = torch.tensor(w, dtype=torch.float32)
        self.theta = (m + 1) * spec.beta - (self.w < 0).sum(-1).to(torch.float32)  # (R, H)
        self.v = torch.tensor(v, dtype=torch.float32)
        self.slow = torch.tensor(slow, dtype=torch.float32)  # (R, f)
        self.fast = torch.empty(self.num_replicas, 0, m - f)  # buffered fast bits (R, n, m-f)
        self.info = StreamInfo(
            self.name,
            "regression",
            (m,),
            1,
            spec.boundaries_visible,
            self.num_replicas,
            "squared_error",
            spec.batch_size,
        )

    def _begin_task(self, replica: int, rng: np.random.Generator) -> None:
        if self.task == 0 or self.spec.slow_bits == 0:
            return  # the first task uses the initial slow bits
        i = int(rng.integers(0, self.spec.slow_bits))
        self.slow[replica, i] = 1.0 - self.slow[replica, i]

    def _draw(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        fast_width = self.spec.num_bits - self.spec.slow_bits
        while self.fast.shape[1] < batch_size:
            block = np.stack([rng.integers(0, 2, size=(_BLOCK, fast_width)) for rng in self.rngs])
            self.fast = torch.cat([self.fast, torch.tensor(block, dtype=torch.float32)], 1)
        fast, self.fast = self.fast[:, :batch_size], self.fast[:, batch_size:]
        slow = self.slow.unsqueeze(1).expand(-1, batch_size, -1)  # (R, B, f)
        bits = torch.cat([slow, fast], -1)  # (R, B, m)
        return bits, ltu_target(bits, self.w, self.theta, self.v)

    def _draw_block(self, steps: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` batches of the current task at once (the slow bits are the task's): the
        fast bits of ``steps · batch_size`` examples from the same buffer, in the same order,
        as ``steps`` calls of :meth:`_draw`, and the target network's outputs for them all in
        one pass: ``((T, R, B, m), (T, R, B, 1))``."""
        bits, target = self._draw(steps * batch_size)  # (R, T·B, m), (R, T·B, 1)
        R = self.num_replicas
        return (
            bits.view(R, steps, batch_size, -1).transpose(0, 1),
            target.view(R, steps, batch_size, -1).transpose(0, 1),
        )

    def _probe_draw(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.spec.num_bits - self.spec.slow_bits
        fast = torch.tensor(
            np.stack([rng.integers(0, 2, size=(size, width)) for rng in self.probe_rngs]),
            dtype=torch.float32,
        )
        bits = torch.cat([self.slow.unsqueeze(1).expand(-1, size, -1), fast], -1)  # (R, P, m)
        return bits, ltu_target(bits, self.w, self.theta, self.v)

    def _extra_state(self) -> dict[str, Any]:
        return {"slow": self.slow.clone(), "fast": self.fast.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.slow = state["slow"].clone()
        self.fast = state["fast"].clone()
