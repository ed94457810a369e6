"""Benchmark: PPO on Slippery Ant, end to end, next to raw gymnasium Ant-v5 stepping.

Both are measured in the same process, alternating in rounds so that a machine shared with
other jobs slows both alike. The headline (the defaults) is the recommended setting for 2
cores: 16 env copies, half-and-more of them stepped in a worker process (``vector=split``), and
the value net's minibatch updates in a second process (``value_worker``)::

    python scripts/bench_rl.py                        # recommended: 16 copies, split, value worker
    python scripts/bench_rl.py --num-envs 1 --vector sync --value-worker 0   # paper defaults
    python scripts/bench_rl.py --num-envs 8 --vector split --update-threads 2 --value-worker 0

*raw*: ``gymnasium.make("Ant-v5")``, random actions, reset at episode ends: the ceiling.
*PPO*: the library's stream and agent (policy and value 256-256, rollout 2048, 10 epochs of 16
minibatches of 128, Adam, a learner chain), every step acting, stepping, storing, and an update
every rollout, i.e. exactly what ``contlearn run slippery-ant`` does minus probes and the
writer. The PPO column also splits its time into acting, env stepping and learning.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from contlearn.envs import make_stream
from contlearn.running.config import resolve
from contlearn.scripting import parse_flags


@dataclass
class Args:
    """Arguments of the benchmark (each is also a command-line flag)."""

    steps: int = 16384
    """PPO env steps per round, all copies (a multiple of the rollout, 2048, so updates are
    included)"""
    raw_steps: int = 4000
    """raw Ant-v5 steps per round"""
    rounds: int = 3
    """alternating rounds of raw and PPO"""
    num_envs: int = 16
    """env copies per replica (paper: 1)"""
    vector: str = "split"
    """sync, async or split env copies (split: half in one worker process)"""
    seeds: int = 1
    """replicas (R)"""
    learner: str = "bp"
    """learner chain of the PPO agent"""
    threads: int = 1
    """torch threads (acting, env stepping)"""
    update_threads: int = 0
    """torch threads during PPO's update phase only (0: as --threads)"""
    parallel_nets: int = 0
    """1: policy and value passes of each minibatch in two threads"""
    value_worker: int = 1
    """1: the value net's minibatch updates in a second process (paper defaults: 0)"""
    fast: int = 1
    """1: hand-written minibatch backward; 0: the autograd reference"""


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args`."""
    return parse_flags(Args, __doc__.splitlines()[0])


def raw_rate(env: gym.Env, steps: int) -> float:
    """Env steps/s of random-action stepping."""
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def ppo_rate(stream, agent, steps: int) -> tuple[float, dict[str, float]]:
    """Env steps/s of the PPO loop and the share of time in each phase."""
    phases = {"act": 0.0, "env": 0.0, "learn": 0.0}
    start = time.perf_counter()
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
    total = time.perf_counter() - start
    env_steps = steps * stream.num_envs * stream.num_replicas
    return env_steps / total, {k: v / total for k, v in phases.items()}


def main() -> None:
    """Alternate raw and PPO rounds; print each round and the medians."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    env = gym.make("Ant-v5")
    env.reset(seed=0)
    env.action_space.seed(0)
    cfg = resolve(
        {
            "stream": "slippery-ant",
            "learner": args.learner,
            "seeds": args.seeds,
            "num_envs": args.num_envs,
            "vector": args.vector,
            "update_threads": args.update_threads,
            "fast": bool(args.fast),
            "parallel_nets": bool(args.parallel_nets),
            "value_worker": bool(args.value_worker),
        }
    )
    stream = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    agent = cfg.agent_cls(stream.info, stream.seeds, cfg.agent_spec, cfg.learner)
    ppo_rate(stream, agent, 64)  # warm up (allocations, first forward passes)
    raw_rate(env, 200)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
        f"(update: {args.update_threads or args.threads}); R={args.seeds}, "
        f"num_envs={args.num_envs} ({args.vector}), learner {args.learner}, "
        f"fast={args.fast}, parallel_nets={args.parallel_nets}, "
        f"value_worker={args.value_worker}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    raws, ppos = [], []
    for r in range(args.rounds):
        raws.append(raw_rate(env, args.raw_steps))
        rate, phases = ppo_rate(stream, agent, max(1, args.steps // args.num_envs))
        ppos.append(rate)
        split = ", ".join(f"{k} {v:.0%}" for k, v in phases.items())
        print(
            f"round {r}: raw Ant-v5 {raws[-1]:7.0f} steps/s | PPO {rate:7.0f} env-steps/s "
            f"({rate / raws[-1]:.0%}; {split})"
        )
    raw, ppo = float(np.median(raws)), float(np.median(ppos))
    print(
        f"median: raw {raw:.0f} steps/s, PPO {ppo:.0f} env-steps/s = {ppo / raw:.0%} of raw "
        f"(load average {os.getloadavg()[0]:.2f})"
    )
    stream.close()
    agent.close()


if __name__ == "__main__":
    main()
