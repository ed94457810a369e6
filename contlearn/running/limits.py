"""Limits of the machine a run must fit: refused up front, with the limit named.

Options are checked one by one where they are declared (:func:`contlearn.spec.param`'s bounds,
whole numbers at most :data:`contlearn.spec.MAX_INT`); what depends on several of them at once,
and on the machine, is checked here, once the config is resolved and before anything is
written:

- the run length: tasks × examples per task must fit the store's int64 step column;
- memory: the replicas' networks, learner state and probe batches must fit in the machine's
  memory. The estimate is a lower bound (weights, gradients and two optimizer moments in
  float32, the probe batch's and a step's activations twice, a few KiB of stream state per
  seed), so a run it refuses could never have run; one it lets through can still be too large.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contlearn.errors import ConfigError
from contlearn.spec import MAX_INT

if TYPE_CHECKING:
    from contlearn.running.config import RunConfig

#: bytes a seed needs besides its network (stream position, permutations, generators)
STREAM_BYTES_PER_SEED = 16 * 1024


def machine_memory() -> int:
    """Bytes of memory this process may use: the physical memory, or a smaller cgroup limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # (not POSIX: no limit known)
        return 1 << 62
    for file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _widths(agent_spec: Any) -> list[int]:
    hidden = getattr(agent_spec, "hidden", None)
    if hidden is None and isinstance(agent_spec, dict):
        hidden = agent_spec.get("hidden")
    if not isinstance(hidden, str):
        return []
    try:
        return [int(p) for p in hidden.split(",") if p.strip()]
    except ValueError:
        return []


#: parameters of one replica of the online agent's conv networks, a lower bound over input
#: shapes (agents/conv_networks.py: convnet at 1 × 28 × 28 has the fewest; resnet18 ~11.2 M)
CONV_PARAMS = {"convnet": 120_000, "resnet18": 11_000_000}


def bytes_per_seed(cfg: RunConfig) -> int:
    """A lower bound of the memory one replica needs (see the module docstring)."""
    network = getattr(cfg.agent_spec, "network", "mlp")
    if network in CONV_PARAMS:  # (weights, gradients, two moments; activations not counted)
        return 4 * 4 * CONV_PARAMS[network] + STREAM_BYTES_PER_SEED
    widths = _widths(cfg.agent_spec)
    params = sum(a * b + b for a, b in zip(widths, widths[1:], strict=False)) + sum(widths)
    probe = cfg.run.probe_size * sum(widths) if cfg.run.probes != "none" else 0
    batch = getattr(cfg.stream_spec, "batch_size", 1)
    batch = batch * (sum(widths) + 1) if isinstance(batch, int) else 0  # a step's activations
    return 4 * (4 * params + 2 * probe + 2 * batch) + STREAM_BYTES_PER_SEED


def _gib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} KiB"


def check_limits(cfg: RunConfig) -> None:
    """Refuse a config the machine cannot hold (see the module docstring).

    Raises:
        ConfigError: the run length overflows the step count, or the replicas cannot fit in
            memory; the message names the limit.
    """
    from contlearn.agents.protocol import supports_replicas

    examples = getattr(cfg.stream_spec, "examples_per_task", None)
    if isinstance(examples, int) and cfg.run.tasks * examples > MAX_INT:
        raise ConfigError(
            f"tasks={cfg.run.tasks} × examples_per_task={examples} is more than 2**62 steps, "
            "what the run store counts; give fewer tasks or fewer examples per task"
        )
    together = cfg.run.seeds if supports_replicas(cfg.agent_cls) else 1
    per_seed = bytes_per_seed(cfg)
    need, have = together * per_seed, machine_memory()
    if need > have:
        raise ConfigError(
            f"this run needs at least {_gib(need)} ({_gib(per_seed)} a seed for seeds="
            f"{cfg.run.seeds} at these widths, batch and probe sizes), more than this machine's "
            f"{_gib(have)} of memory; run fewer seeds per run (a sweep groups them), smaller "
            "networks or batches"
        )
