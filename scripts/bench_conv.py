"""How fast are the conv networks? Images per second of the replica-batched conv net against a
plain per-seed torch loop, at R = 1 and R = 8, in one run.

Rows, for each R (all seeds together, training steps of ``--batch`` images: forward, loss,
backward, SGD update):

- ``naive``: one ``nn.Module`` per seed (agents/conv_reference.py: ``nn.Conv2d``,
  ``nn.MaxPool2d``, ``nn.Linear``) with ``torch.optim.SGD``, seeds one after another;
- ``grouped``: the batched network's forward pass (R replicas' convs as one
  ``conv2d(groups=R)``, the fc layers as ``baddbmm``), autograd, ``θ -= lr·g``;
- ``loop``: the same with one ``conv2d`` per replica (the network's CPU default);
- ``vmap``: ``torch.func.vmap`` of one replica's forward over the stacked parameters,
  autograd, the same update;
- ``agent``: the online agent's whole step (``network=convnet``, learner ``bp``; its reference
  step: act, observe, the learner chain).

ResNet-18 (``network=resnet18``) gets the ``naive`` row (``TorchResNet18`` per seed) and the
``agent`` row, over ``--resnet-steps`` steps::

    python scripts/bench_conv.py                        # docs/conv_networks.md's figures
    python scripts/bench_conv.py --steps 3 --seeds 1,2  # a quick look

Prints one JSON object (``rows``: images/s per network, R and row; ``speedup``: each row
over naive).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from contlearn.agents.conv_networks import BatchedConvNet
from contlearn.agents.conv_reference import TorchConvNet, TorchResNet18
from contlearn.agents.online import OnlineAgent, OnlineAgentSpec
from contlearn.envs.base import StreamInfo
from contlearn.learners import Learner, learner_def
from contlearn.scripting import parse_flags


@dataclass
class Args:
    """Arguments of the benchmark (each is also a command-line flag)."""

    seeds: str = "1,8"
    """replica counts R to time, comma-separated"""
    batch: int = 16
    """images per training step (per seed)"""
    steps: int = 20
    """timed steps per row (after 2 untimed warm-up steps)"""
    side: int = 32
    """image side (3 channels; Continual ImageNet's 32 × 32)"""
    threads: int = 1
    """torch intra-op threads (1: the figures in docs/conv_networks.md)"""
    device: str = "cpu"
    """torch device of the networks (cuda: synchronised before each clock reading)"""
    lr: float = 0.01
    """SGD step size"""
    resnet_steps: int = 3
    """timed steps per ResNet-18 row (0: no ResNet rows)"""


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step: Callable[[int], None], steps: int) -> float:
    """Seconds for ``steps`` calls of ``step(t)`` after two warm-up calls."""
    step(0)
    step(1)
    _sync()
    start = time.perf_counter()
    for t in range(steps):
        step(t)
    _sync()
    return time.perf_counter() - start


def naive(args: Args, R: int, x: torch.Tensor, y: torch.Tensor, network: str) -> float:
    """Seconds of the per-seed loop (seeds one after another)."""
    total = 0.0
    for r in range(R):
        torch.manual_seed(r)
        net = TorchConvNet(3, args.side, 2) if network == "convnet" else TorchResNet18(3, 2)
        net = net.to(x.device)
        opt = torch.optim.SGD(net.parameters(), lr=args.lr)

        def step(
            t: int, net: torch.nn.Module = net, opt: torch.optim.SGD = opt, r: int = r
        ) -> None:
            opt.zero_grad()
            F.cross_entropy(net(x[r]), y[r]).backward()
            opt.step()

        total += timed(step, args.steps if network == "convnet" else args.resnet_steps)
    return total


def batched(args: Args, R: int, x: torch.Tensor, y: torch.Tensor, mode: str) -> float:
    """Seconds of the batched network's steps (``mode``: grouped, loop or vmap)."""
    gens = [torch.Generator().manual_seed(r) for r in range(R)]
    net = BatchedConvNet((3, args.side, args.side), 2, "relu", "torch_default", gens)
    net.replica_convs = mode if mode != "vmap" else None
    params = {k: v.to(x.device).requires_grad_(True) for k, v in net.params.items()}

    def step(t: int) -> None:
        out = net.forward_vmap(x, params) if mode == "vmap" else net.forward(x, params)[0]
        loss = F.cross_entropy(out.reshape(-1, 2), y.reshape(-1), reduction="none")
        grads = torch.autograd.grad(loss.view(R, -1).mean(1).sum(), list(params.values()))
        with torch.no_grad():
            torch._foreach_add_(list(params.values()), list(grads), alpha=-args.lr)

    return timed(step, args.steps)


def agent(args: Args, R: int, x: torch.Tensor, y: torch.Tensor, network: str) -> float:
    """Seconds of the online agent's steps (``network``, learner bp)."""
    shape = (3, args.side, args.side)
    info = StreamInfo("bench", "classification", shape, 2, True, R, "accuracy", args.batch)
    spec = OnlineAgentSpec(network=network, init="torch_default", lr=args.lr)
    a = OnlineAgent(info, list(range(R)), spec, Learner("bp", learner_def("bp").Spec()))
    a.to(x.device)

    def step(t: int) -> None:
        a.observe(x, a.act(x), y)

    return timed(step, args.steps if network == "convnet" else args.resnet_steps)


def main() -> None:
    """Time every row and print them."""
    args = parse_flags(Args, __doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, float]] = {}
    speedup: dict[str, float] = {}
    for R in (int(s) for s in args.seeds.split(",")):
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(R, args.batch, 3, args.side, args.side, generator=gen).to(args.device)
        y = torch.randint(2, (R, args.batch), generator=gen).to(args.device)
        images = R * args.batch * args.steps
        secs = {
            "naive": naive(args, R, x, y, "convnet"),
            "grouped": batched(args, R, x, y, "grouped"),
            "loop": batched(args, R, x, y, "loop"),
            "vmap": batched(args, R, x, y, "vmap"),
            "agent": agent(args, R, x, y, "convnet"),
        }
        rows[f"convnet R={R}"] = {k: round(images / v, 1) for k, v in secs.items()}
        for mode in ("agent", "grouped", "loop", "vmap"):
            speedup[f"convnet R={R} {mode}"] = round(secs["naive"] / secs[mode], 2)
        if args.resnet_steps:
            images = R * args.batch * args.resnet_steps
            secs = {
                m: f(args, R, x, y, "resnet18") for m, f in (("naive", naive), ("agent", agent))
            }
            rows[f"resnet18 R={R}"] = {k: round(images / v, 1) for k, v in secs.items()}
            speedup[f"resnet18 R={R} agent"] = round(secs["naive"] / secs["agent"], 2)
    result = {"batch": args.batch, "side": args.side, "threads": args.threads, "rows": rows}
    result["device"] = args.device
    print(json.dumps({**result, "speedup": speedup}, indent=1))


if __name__ == "__main__":
    main()
