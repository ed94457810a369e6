"""Slippery Ant with PPO, one learner: the continual-RL experiment of Dohare et al. (2024).

The ant must keep running while the friction changes every ``change_every`` steps. The loop
below is the whole experiment: the agent acts on every env copy of every seed at once, the
stream steps them, the agent stores the transition (and updates every ``rollout`` of them),
and every finished episode becomes a row of a contlearn run directory, so ``contlearn plot``,
``contlearn.load_runs`` and ``contlearn summary`` read it like any other run::

    python scripts/slippery_ant.py --learner cbp --total-steps 1000000 --change-every 200000
    python scripts/slippery_ant.py --learner bp --seeds 3 --total-steps 20000   # a smoke test

``--paper`` (on by default) applies the reference's per-learner settings (cfg/sant/*.yml):
bp is Adam (0.9, 0.999); proper-adam, l2 and cbp use β1 = β2 = 0.99; l2 adds L2 1e-3; cbp adds
L2 1e-4, ρ = 1e-4 and maturity 10,000 minibatch updates. The same run through the library's
own loop (with probes and checkpoints) is ``contlearn run slippery-ant --learner cbp ...``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

import contlearn
from contlearn.agents.protocol import require_agent_methods
from contlearn.envs import make_stream
from contlearn.loop.records import Record, record_writer
from contlearn.results import plots
from contlearn.results.store import MetricWriter, prepare_run_dir, write_config
from contlearn.running.config import resolve
from contlearn.scripting import parse_flags

#: Dohare et al.'s Slippery Ant settings per learner (on top of the PPO defaults).
PAPER = {
    "bp": {},
    "proper-adam": {},  # the preset itself sets β1 = β2 = 0.99
    "l2": {"beta1": 0.99, "beta2": 0.99, "learner.l2": 1e-3},
    "cbp": {
        "beta1": 0.99,
        "beta2": 0.99,
        "learner.l2": 1e-4,
        "learner.replacement_rate": 1e-4,
        "learner.maturity": 10_000,
    },
}


@dataclass
class Args:
    """Arguments of the experiment (each is also a command-line flag)."""

    learner: str = "cbp"
    """learner: bp, proper-adam, l2, cbp, redo, snp, l2-init, snp-init"""
    paper: bool = True
    """apply Dohare et al.'s settings for the learner (see PAPER)"""
    seed: int = 0
    """first seed"""
    seeds: int = 1
    """seeds, run as one replica-batched model (each with its own envs and frictions)"""
    total_steps: int = 1_000_000
    """environment steps of each seed (summed over its copies; a multiple of num_envs)"""
    change_every: int = 200_000
    """environment steps between friction changes (paper: 2,000,000)"""
    num_envs: int = 1
    """env copies per seed (paper: 1); a PPO rollout is 2048 transitions over all copies"""
    vector: str = "auto"
    """step the copies in this process (sync), one process per copy (async), half in one
    worker process (split), or auto (split for num_envs > 1 with 2+ cores)"""
    lr: float = 1e-4
    """Adam step size (paper: 1e-4)"""
    torch_threads: int = 1
    """torch threads (1 is fastest for these small networks on a shared machine)"""
    out: str = "runs/slippery_ant"
    """folder of the run directory"""


def parse_args() -> Args:
    """Command-line flags from the fields of :class:`Args`."""
    return parse_flags(Args, __doc__.splitlines()[0])


def main() -> None:
    """Run one learner on Slippery Ant and plot its episode returns."""
    args = parse_args()
    torch.set_num_threads(args.torch_threads)
    run_name = f"slippery-ant__{args.learner}__s{args.seed}x{args.seeds}__{int(time.time())}"
    path = Path(args.out) / run_name
    options = {
        "change_every": args.change_every,
        "num_envs": args.num_envs,
        "vector": args.vector,
        "lr": args.lr,
        "steps": args.total_steps,
        **(PAPER.get(args.learner, {}) if args.paper else {}),
    }
    cfg = resolve(
        {
            "stream": "slippery-ant",
            "learner": args.learner,
            "seed": args.seed,
            "seeds": args.seeds,
            **options,
        }
    )
    stream = make_stream(cfg.stream, cfg.stream_spec, cfg.seeds)
    agent = cfg.agent_cls(stream.info, stream.seeds, cfg.agent_spec, cfg.learner)
    require_agent_methods(agent)
    prepare_run_dir(path)
    write_config(path, cfg.to_dict(), cfg.seeds)
    writer = MetricWriter(path, run_name, cfg.stream, args.learner)
    emit = record_writer(writer, stream.seeds)  # records to rows, as contlearn.run writes them

    start = time.monotonic()
    while stream.step < args.total_steps:  # (stream.step: environment steps of each seed)
        obs = stream.obs  # (R, E, obs_dim)
        action = agent.act(obs)  # (R, E, act_dim)
        feedback, ended = stream.advance(action)  # (reward, next_obs, terminated, truncated)
        step = stream.step
        update = agent.observe(obs, action, feedback)  # a PPO update every rollout
        for ep in ended:  # one row per finished episode, task = that seed's friction index
            values = {
                "episode_return": ep.ret,
                "episode_length": ep.length,
                "friction": ep.friction,
            }
            emit(
                Record(
                    "episode",
                    step,
                    ep.task,
                    {k: torch.tensor([float(v)]) for k, v in values.items()},
                    replica=ep.replica,
                )
            )
        if update:
            emit(Record("update", step, int(stream.task.max()), update))
            rate = step * args.seeds / (time.monotonic() - start)
            print(
                f"step {step:>9,}  {rate:6.0f} env-steps/s  friction index "
                f"{stream.task.tolist()}  value loss {update['value_loss'].mean():.1f}",
                flush=True,
            )
    writer.close()
    stream.close()

    df = contlearn.load_runs(path)
    width = max(1, args.total_steps // 50)  # 50 points: each the mean of a window's episodes
    df["step"] = df["step"] // width * width + width // 2
    fig = plots.plot_decay(df, metric="episode_return", x="step")
    plots.save_figure(fig, path / "returns.png")
    print(f"{path} ({time.monotonic() - start:.0f} s); figure {path / 'returns.png'}")


if __name__ == "__main__":
    main()
