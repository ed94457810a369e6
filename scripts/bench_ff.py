"""How fast is the Forward-Forward agent? Replica-batched ``ff`` against a naive per-seed loop.

The naive loop is FF as one writes it without contlearn: one seed at a time, ``nn.Linear``
layers, autograd on each layer's local loss, ``torch.optim.SGD``, batch size 1, the same
goodness prediction (C labels as one batch). Both run online steps on MNIST inputs (act, then
learn) at the same widths; rows give steps per second summed over seeds (the median of timed
repeats, the rows' repeats interleaved), and the cost of ``predict=goodness`` (one pass per
label) against ``predict=head``. ``ff (goodness, block)`` is the agent as a run drives it
(``ff-block``: the stream's blocks of steps through ``learn_block``, one worker thread like the
naive loop); the other two ``ff`` rows step one by one (``act``, ``observe``)::

    python scripts/bench_ff.py                       # width 100, R = 32 (docs/forward_forward.md)
    python scripts/bench_ff.py --steps 50 --seeds 4  # a quick look

Prints one JSON object (``rows``, ``speedup``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_timing import Timed  # scripts/ is on sys.path

from contlearn.agents.forward_forward import FFAgent, FFAgentSpec
from contlearn.data.datasets import load_mnist
from contlearn.envs.base import StreamInfo
from contlearn.learners import Learner, learner_def
from contlearn.scripting import parse_flags


@dataclass
class Args:
    """Arguments of the benchmark (each is also a command-line flag)."""

    width: int = 100
    """hidden width (three layers)"""
    seeds: int = 32
    """replicas R (the naive loop runs them one after another)"""
    steps: int = 300
    """MNIST examples cycled through"""
    repeats: int = 5
    """timed repeats per row, interleaved (the median is reported)"""
    seconds: float = 1.0
    """wall time of one timed repeat"""
    lr: float = 0.01
    """SGD step size"""


class NaiveFF:
    """One seed's FF network written plainly (``nn.Linear``, autograd, ``torch.optim``)."""

    def __init__(self, width: int, lr: float, seed: int) -> None:
        torch.manual_seed(seed)
        self.layers = [nn.Linear(784, width), nn.Linear(width, width), nn.Linear(width, width)]
        params = [p for layer in self.layers for p in layer.parameters()]
        self.opt = torch.optim.SGD(params, lr=lr)
        self.gen = torch.Generator().manual_seed(seed)

    @staticmethod
    def embed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.one_hot(y, 10).float(), x[:, 10:]], 1)

    def goodness(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], x / (x.pow(2).mean(1, keepdim=True).sqrt() + 1e-8)
        for layer in self.layers:
            a = torch.relu(layer(h))
            out.append(a.pow(2).sum(1))
            h = (a / (a.pow(2).mean(1, keepdim=True).sqrt() + 1e-8)).detach()
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xs = torch.cat([self.embed(x, torch.full((1,), c)) for c in range(10)])
            g = self.goodness(xs)
            return (g[1] + g[2]).argmax()

    def learn(self, x: torch.Tensor, y: torch.Tensor) -> None:
        neg = (y + 1 + torch.randint(9, (1,), generator=self.gen)) % 10
        g = self.goodness(torch.cat([self.embed(x, y), self.embed(x, neg)]))
        loss = sum(0.5 * (F.softplus(100 - gl[0]) + F.softplus(gl[1] - 100)) for gl in g)
        self.opt.zero_grad()
        loss.backward()  # (each layer's input is detached: the gradients are local)
        self.opt.step()


def naive_runner(args: Args, images: torch.Tensor, labels: torch.Tensor) -> Callable[[int], None]:
    """``run(n)``: n online steps of every seed's naive loop, seeds one after another."""
    nets = [NaiveFF(args.width, args.lr, s) for s in range(args.seeds)]
    position = [0]

    def run(steps: int) -> None:
        start = position[0]
        for net in nets:
            for t in range(start, start + steps):
                x, y = images[t % len(images)].unsqueeze(0), labels[t % len(labels)].unsqueeze(0)
                net.predict(x)
                net.learn(x, y)
        position[0] = start + steps

    return run


def ff_runner(
    args: Args, images: torch.Tensor, labels: torch.Tensor, predict: str, block: bool = False
) -> Callable[[int], None]:
    """``run(n)``: n online steps of the replica-batched agent (all seeds at once), one by one
    or (``block``) through ``learn_block`` in blocks of up to the data's length."""
    R = args.seeds
    info = StreamInfo("bench", "classification", (784,), 10, False, R, "accuracy", 1)
    spec = FFAgentSpec(
        hidden=f"{args.width},{args.width},{args.width}",
        predict=predict,
        optimizer="sgd",
        lr=args.lr,
    )
    agent = FFAgent(info, list(range(R)), spec, Learner("bp", learner_def("bp").Spec()))
    agent.replica_workers = 1  # (one thread, as the naive loop)
    xs = images.view(-1, 1, 1, 784).expand(-1, R, -1, -1)
    ys = labels.view(-1, 1, 1).expand(-1, R, -1)
    position = [0]

    def run_blocks(steps: int) -> None:
        done = 0
        while done < steps:
            at = (position[0] + done) % len(xs)
            n = min(steps - done, len(xs) - at)
            agent.learn_block(xs[at : at + n], ys[at : at + n])
            done += n
        position[0] += steps

    if block:
        assert agent.backend == "ff-block", agent.block_problem
        return run_blocks

    def run(steps: int) -> None:
        start = position[0]
        for t in range(start, start + steps):
            obs = xs[t % len(xs)]  # (one object, as the engine passes batch.obs to both)
            agent.observe(obs, agent.act(obs), ys[t % len(ys)])
        position[0] = start + steps

    return run


def main() -> None:
    """Time the three rows and print them."""
    args = parse_flags(Args, __doc__.splitlines()[0])
    torch.set_num_threads(1)  # (per-op overhead dominates at batch size 1)
    images, labels = load_mnist()
    images = torch.as_tensor(images[: args.steps]).reshape(-1, 784).float() / 255.0
    labels = torch.as_tensor(labels[: args.steps]).long()
    runners = {
        "naive (goodness)": (naive_runner(args, images, labels), args.seeds),
        "ff (goodness)": (ff_runner(args, images, labels, "goodness"), args.seeds),
        "ff (head)": (ff_runner(args, images, labels, "head"), args.seeds),
        "ff (goodness, block)": (ff_runner(args, images, labels, "goodness", True), args.seeds),
    }
    # repeats interleaved, so that load from other processes hits every row alike
    timed = {name: Timed(run, R, 1, 20) for name, (run, R) in runners.items()}
    for _ in range(args.repeats):
        for t in timed.values():
            t.repeat(args.seconds)
    rows = {name: t.median for name, t in timed.items()}
    result = {
        "width": args.width,
        "seeds": args.seeds,
        "rows": {k: round(v, 1) for k, v in rows.items()},
        "speedup": round(rows["ff (goodness, block)"] / rows["naive (goodness)"], 1),
        "speedup_step_by_step": round(rows["ff (goodness)"] / rows["naive (goodness)"], 1),
        "goodness_over_head_time": round(rows["ff (head)"] / rows["ff (goodness)"], 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
