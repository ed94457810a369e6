"""Benchmark: PPO on Slippery Ant, end to end, next to raw gymnasium Ant-v5 stepping.

Both are measured in the same process, alternating in rounds (raw, then each setting in turn)
so that a machine shared with other jobs slows them alike. A *setting* is a named set of run
options; the defaults compare the paper's configuration (one env copy, rollout 2048, 10 epochs
of 16 minibatches of 128, Adam) as a run gets it, with the speed options left at ``auto``
(:mod:`contlearn.backends.auto`), against the same with every speed option off::

    python scripts/bench_rl.py                                   # paper-auto vs paper-plain
    python scripts/bench_rl.py --settings paper-auto,split16     # and 16 copies, split, worker
    python scripts/bench_rl.py --settings custom --num-envs 8 --vector split --update-threads 2
    python scripts/bench_rl.py --busy 3                          # beside 3 spinning processes

*raw*: ``gymnasium.make("Ant-v5")``, random actions, reset at episode ends: the ceiling.
*PPO*: the library's stream and agent (policy and value 256-256, rollout 2048, 10 epochs of 16
minibatches of 128, Adam, a learner chain), every step acting, stepping, storing, and an update
every rollout, i.e. exactly what ``contlearn run slippery-ant`` does minus probes and the
writer. Each PPO figure also splits its time into acting, env stepping and learning, and
names the backend and vector env the setting resolved to. Every line gives the load average.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from contlearn.envs import make_stream
from contlearn.running.config import resolve
from contlearn.scripting import parse_flags

#: named settings: run options over the defaults (``custom``: from the flags)
SETTINGS: dict[str, dict[str, object]] = {
    "paper-auto": {},  # the paper's configuration, speed options as a run resolves them
    "paper-plain": {"value_worker": False, "vector": "sync"},  # every speed option off
    "split16": {"num_envs": 16, "vector": "split", "value_worker": True},
}


@dataclass
class Args:
    """Arguments of the benchmark (each is also a command-line flag)."""

    settings: str = "paper-auto,paper-plain"
    """comma-separated names of :data:`SETTINGS` (or ``custom``: the flags below)"""
    steps: int = 8192
    """PPO env steps per round and setting, all copies (a multiple of the rollout, 2048, so
    updates are included)"""
    raw_steps: int = 4000
    """raw Ant-v5 steps per round"""
    rounds: int = 3
    """alternating rounds of raw and each setting"""
    seeds: int = 1
    """replicas (R)"""
    learner: str = "bp"
    """learner chain of the PPO agent"""
    threads: int = 1
    """torch threads (acting, env stepping)"""
    num_envs: int = 1
    """custom: env copies per replica (paper: 1)"""
    vector: str = "auto"
    """custom: sync, async, split or auto"""
    update_threads: int = 0
    """custom: torch threads during PPO's update phase only (0: as --threads)"""
    parallel_nets: int = 0
    """custom: 1: policy and value passes of each minibatch in two threads"""
    value_worker: str = "auto"
    """custom: true, false or auto"""
    fast: int = 1
    """custom: 1: hand-written minibatch backward; 0: the autograd reference"""
    busy: int = 0
    """processes spinning beside the benchmark (a busy machine, on purpose)"""


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args`."""
    return parse_flags(Args, __doc__.splitlines()[0])


def raw_rate(env: gym.Env, steps: int) -> tuple[float, float]:
    """Env steps/s of random-action stepping: per wall-clock second and per CPU second of
    this thread."""
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start), steps / (time.thread_time() - cpu)


def ppo_rate(stream, agent, steps: int) -> tuple[float, float, dict[str, float]]:
    """Env steps/s of the PPO loop (per wall-clock second and per CPU second of this thread,
    which leaves out worker processes and the time spent waiting for them) and the share of
    wall-clock time in each phase."""
    phases = {"act": 0.0, "env": 0.0, "learn": 0.0}
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        obs = stream.obs
        action = agent.act(obs)
        t1 = time.perf_counter()
        feedback, _ = stream.advance(action)
        t2 = time.perf_counter()
        agent.observe(obs, action, feedback)
        t3 = time.perf_counter()
        phases["act"] += t1 - t0
        phases["env"] += t2 - t1
        phases["learn"] += t3 - t2
    total, cpu = time.perf_counter() - start, time.thread_time() - cpu
    env_steps = steps * stream.num_envs * stream.num_replicas
    return env_steps / total, env_steps / cpu, {k: v / total for k, v in phases.items()}


def build(args: Args, name: str) -> tuple[object, object]:
    """The stream and agent of setting ``name``, resolved as a run resolves them."""
    if name == "custom":
        options: dict[str, object] = {
            "num_envs": args.num_envs,
            "vector": args.vector,
            "update_threads": args.update_threads,
            "fast": bool(args.fast),
            "parallel_nets": bool(args.parallel_nets),
            "value_worker": args.value_worker,
        }
    elif name in SETTINGS:
        options = SETTINGS[name]
    else:
        raise SystemExit(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}, custom")
    cfg = resolve(
        {"stream": "slippery-ant", "learner": args.learner, "seeds": args.seeds, **options}
    )
    stream = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    agent = cfg.agent_cls(stream.info, stream.seeds, cfg.agent_spec, cfg.learner)
    print(
        f"{name}: num_envs={cfg.stream_spec.num_envs} ({cfg.stream_spec.vector}), "
        f"backend {agent.backend}, update_threads={cfg.agent_spec.update_threads}"
    )
    return stream, agent


def _spin() -> None:
    while True:
        pass


def main() -> None:
    """Alternate raw and each setting in rounds; print each round and the medians."""
    args = parse_args()
    busy = [mp.get_context("fork").Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    try:
        _bench(args)
    finally:
        for p in busy:
            p.terminate()


def _bench(args: Args) -> None:
    torch.set_num_threads(args.threads)
    env = gym.make("Ant-v5")
    env.reset(seed=0)
    env.action_space.seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); R={args.seeds}, "
        f"learner {args.learner}; {len(os.sched_getaffinity(0))} usable cores; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    runs = {name: build(args, name) for name in names}
    try:
        for stream, agent in runs.values():
            ppo_rate(stream, agent, 64)  # warm up (allocations, first forward passes)
        raw_rate(env, 200)
        raws: list[float] = []
        raw_cpus: list[float] = []
        rates: dict[str, list[float]] = {name: [] for name in names}
        cpus: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            raw, raw_cpu = raw_rate(env, args.raw_steps)
            raws.append(raw)
            raw_cpus.append(raw_cpu)
            line = [f"round {r}: raw Ant-v5 {raws[-1]:6.0f}/s"]
            order = names if r % 2 == 0 else names[::-1]  # (no setting always runs first)
            for name in order:
                stream, agent = runs[name]
                copies = stream.num_envs * stream.num_replicas
                rate, cpu, phases = ppo_rate(stream, agent, max(1, args.steps // copies))
                rates[name].append(rate)
                cpus[name].append(cpu / raw_cpu)
                split = "/".join(f"{v:.0%}" for v in phases.values())
                line.append(f"{name} {rate:6.0f}/s {rate / raws[-1]:4.0%} (act/env/learn {split})")
            print(" | ".join(line) + f" | load {os.getloadavg()[0]:.2f}")
        raw = float(np.median(raws))
        for name in names:  # (the CPU-time ratio leaves out workers and waits: not a headline)
            ppo = float(np.median(rates[name]))
            per_round = ", ".join(f"{p / q:.0%}" for p, q in zip(rates[name], raws, strict=True))
            print(
                f"median {name}: {ppo:.0f} env-steps/s = {ppo / raw:.0%} of raw {raw:.0f}/s "
                f"(rounds {per_round}; load average {os.getloadavg()[0]:.2f}); per CPU second "
                f"of this process's thread {float(np.median(cpus[name])):.0%} of raw's"
            )
    finally:
        for stream, agent in runs.values():
            stream.close()
            agent.close()


if __name__ == "__main__":
    main()
