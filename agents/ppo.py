"""PPO with a Gaussian policy, replica-batched, trained by any contlearn learner.

Proximal policy optimisation (Schulman et al. 2017) as Dohare et al. (Nature 2024) ran it on
Slippery Ant: policy and value MLPs (256-256 ReLU, LeCun-uniform init), a Gaussian policy with a
state-independent log-std (initially 0), rollouts of 2048 transitions, 10 epochs of 16
minibatches of 128, GAE (γ = 0.99, λ = 0.95) with advantages normalised over the rollout, the
clipped objective (ε = 0.2) plus the squared value error (weight 1), no entropy bonus, no
gradient clipping, and one Adam (lr 1e-4) over both networks. As in the reference, a time-limit
truncation ends the bootstrap like a termination unless ``bootstrap_truncated=true``.

Both networks are :class:`~contlearn.agents.networks.BatchedMLP` (the replica dim R is native)
joined by :class:`ActorCritic`, which names their layers ``policy.hidden1`` …
``value.output``, so a learner chain (``bp``, ``l2``, ``snp``, ``cbp``, ``redo``, ...) acts on
both networks at once. The learner's ``update`` runs once per minibatch, with this minibatch's
hidden activations as ``features``: continual backprop's maturity and ReDo's period count
minibatch updates (the paper's m = 10,000), and their resets clear Adam's state of the units
they re-initialise. Each replica draws its action noise and minibatch order from its own
generator (seeded like its initial weights), so replica r in a batch equals r run alone.

Speed: the minibatch gradient is computed by hand (:mod:`contlearn.agents.ppo_fast`, no
autograd graph; ``fast=false`` is the autograd reference), optionally with the two nets in two
threads (``parallel_nets``) and more torch threads during the update only (``update_threads``).
:meth:`PPOAgent.to` moves everything but the generators to a device (docs/slippery_ant.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from contlearn.agents import ppo_fast, ppo_worker
from contlearn.agents.networks import ACTIVATIONS, INITS, BatchedMLP
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import Learner, build_learner, learner_diagnostics
from contlearn.learners.base import GradientTransformation
from contlearn.learners.optim import adam, sgd
from contlearn.seeding import torch_generator
from contlearn.spec import param, parse_int_list
from contlearn.state import load_tree, tree_leaves

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class PPOSpec:
    """Options of the PPO agent; defaults are Dohare et al.'s Slippery Ant settings."""

    hidden: str = param("256,256", "hidden widths of the policy and of the value net")
    activation: str = param("relu", "hidden nonlinearity", choices=tuple(ACTIVATIONS))
    init: str = param("lecun_uniform", "weight init distribution", choices=INITS)
    optimizer: str = param("adam", "base optimizer (one, over both networks)",
                           choices=("sgd", "adam"))
    lr: float = param(1e-4, "learning rate (step size)", low=0.0, low_open=True)
    momentum: float = param(0.0, "SGD momentum", low=0.0, high=1.0)
    beta1: float = param(0.9, "Adam β1 (paper: 0.9 for PPO, 0.99 with CBP, L2, proper Adam)",
                         low=0.0, high=1.0)
    beta2: float = param(0.999, "Adam β2 (paper: 0.999 for PPO, 0.99 with CBP, L2, proper Adam)",
                         low=0.0, high=1.0)
    eps: float = param(1e-8, "Adam ε", low=0.0, low_open=True)
    rollout: int = param(2048, "transitions per replica between updates (all env copies)", low=1)
    epochs: int = param(10, "passes over each rollout", low=1)
    minibatch_size: int = param(128, "transitions per minibatch update (16 per rollout)", low=1)
    gamma: float = param(0.99, "discount γ", low=0.0, high=1.0)
    gae_lambda: float = param(0.95, "GAE λ", low=0.0, high=1.0)
    clip: float = param(0.2, "PPO clip ε of the probability ratio", low=0.0)
    vf_coef: float = param(1.0, "weight of the squared value error in the loss", low=0.0)
    ent_coef: float = param(0.0, "weight of the entropy bonus", low=0.0)
    norm_adv: bool = param(True, "normalise advantages over each rollout, per replica")
    max_grad_norm: float = param(0.0, "clip each replica's gradient norm (0: off)", low=0.0)
    init_log_std: float = param(0.0, "initial log standard deviation of the policy")
    bootstrap_truncated: bool = param(False, "bootstrap from V(final obs) at time-limit"
                                      " truncations (paper: no, a truncation ends the return)")
    fast: bool = param(True, "hand-written forward/backward of the minibatch loss (false: the"
                       " autograd reference; same numbers to float rounding)")
    update_threads: int = param(0, "torch threads during the update phase only (0: the run's"
                                " setting; acting and env stepping keep the run's threads)",
                                low=0)
    parallel_nets: bool = param(False, "run the policy's and the value net's passes of each"
                                " minibatch in two threads (fast path; for 2 free cores)")
    value_worker: bool = param(False, "run the value net's minibatch updates in a second"
                               " process while this one runs the policy's (2 cores; learners"
                               " bp, adam, proper-adam; same numbers)")

    def validate(self) -> None:
        """Hidden widths parse; minibatches tile the rollout."""
        parse_int_list(self.hidden, "hidden")
        if self.rollout % self.minibatch_size:
            raise ConfigError(f"rollout={self.rollout} is not a multiple of "
                              f"minibatch_size={self.minibatch_size}")

    def base_optimizer(self) -> GradientTransformation:
        """The base optimizer transform (the learner chain wraps it)."""
        if self.optimizer == "adam":
            return adam(self.lr, self.beta1, self.beta2, self.eps)
        return sgd(self.lr, self.momentum)


def gaussian_log_prob(action: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
                      ) -> torch.Tensor:
    """log N(action; mean, exp(log_std)²) summed over action dims: ``(R, B, A) -> (R, B)``;
    ``log_std`` is ``(R, A)``."""
    z = (action - mean) * torch.exp(-log_std).unsqueeze(1)
    return -(0.5 * z.pow(2) + log_std.unsqueeze(1) + 0.5 * _LOG_2PI).sum(-1)


def gae(reward: torch.Tensor, value: torch.Tensor, next_value: torch.Tensor,
        terminal: torch.Tensor, episode_end: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates (Schulman et al. 2016) over a rollout.

    ``δ_t = r_t + γ (1 − terminal_t) V(s'_t) − V(s_t)``,
    ``A_t = δ_t + γ λ (1 − episode_end_t) A_{t+1}`` (``A_T = 0``), returns ``A_t + V(s_t)``.

    Args:
        reward, value, next_value: ``(R, T, E)``; ``next_value`` is V of each step's next
            observation (the final one where an episode ended).
        terminal: ``(R, T, E)`` bool, no bootstrap from ``s'_t``.
        episode_end: ``(R, T, E)`` bool, step t+1 starts a new episode.
        gamma, lam: γ and λ.

    Returns:
        ``(advantages, returns)``, both ``(R, T, E)``.
    """
    delta = reward + gamma * next_value * (~terminal) - value  # (R, T, E) in value's dtype
    carry = (~episode_end).to(value.dtype) * (gamma * lam)
    adv = torch.zeros_like(value)
    running = torch.zeros_like(value[:, 0])
    for t in range(value.shape[1] - 1, -1, -1):
        running = torch.addcmul(delta[:, t], carry[:, t], running)
        adv[:, t] = running
    return adv, adv + value


def clipped_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor,
                        clip: float) -> torch.Tensor:
    """PPO's clipped surrogate, to minimise: ``mean_b max(−ρA, −clip(ρ, 1−ε, 1+ε)A)``, with
    ``ρ = exp(logp − logp_old)``; ``(R, B)`` inputs, ``(R,)`` out."""
    ratio = torch.exp(logp - logp_old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean(1)


class ActorCritic:
    """A policy and a value :class:`BatchedMLP` seen as one network by learners and probes.

    Parameters are ``policy.<layer>.weight`` … ``value.output.bias`` plus ``policy.log_std``
    ``(R, A)``; ``layers``, ``hidden_layers``, ``by_name`` and ``sample_init`` use the prefixed
    names, so continual backprop and ReDo treat the hidden layers of both nets alike.

    Args:
        obs_dim, act_dim: input and action sizes.
        hidden: hidden widths of each net.
        activation, init: as for :class:`BatchedMLP`.
        generators: one per replica; the policy's weights are drawn first, then the value's.
        init_log_std: initial log standard deviation.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str,
                 init: str, generators: Sequence[torch.Generator], init_log_std: float) -> None:
        self.policy = BatchedMLP(obs_dim, hidden, act_dim, activation, init, generators)
        self.value = BatchedMLP(obs_dim, hidden, 1, activation, init, generators)
        self.nets = {"policy": self.policy, "value": self.value}
        self.activation = activation
        self.log_std = torch.full((len(generators), act_dim), float(init_log_std))  # (R, A)
        self.params = {f"{p}.{k}": v for p, net in self.nets.items() for k, v in net.params.items()}
        self.params["policy.log_std"] = self.log_std
        self.layers = [replace(layer, name=f"{p}.{layer.name}",
                               next=f"{p}.{layer.next}" if layer.next else None)
                       for p, net in self.nets.items() for layer in net.layers]
        self.by_name = {layer.name: layer for layer in self.layers}

    def to(self, device: torch.device) -> None:
        """Move every parameter to ``device`` (the dicts keep their names)."""
        for net in self.nets.values():
            net.params = {k: v.detach().to(device) for k, v in net.params.items()}
        self.log_std = self.log_std.detach().to(device)
        self.params = {f"{p}.{k}": v for p, net in self.nets.items() for k, v in net.params.items()}
        self.params["policy.log_std"] = self.log_std

    @property
    def hidden_layers(self) -> list[Any]:
        """Hidden layers of both nets (``policy.hidden1``, ..., ``value.hidden2``)."""
        return [layer for layer in self.layers if layer.next is not None]

    def sample_init(self, name: str, rows: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh rows for prefixed layer ``name`` from its net's own init distribution."""
        net, _, layer = name.partition(".")
        return self.nets[net].sample_init(layer, rows, generator)

    def values(self, obs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """State values ``(R, B)`` and the value net's hidden activations.

        The single output unit is computed as a multiply-and-sum over the last hidden layer:
        ``baddbmm`` with one output column takes another BLAS path for R = 1 than for R > 1,
        whose results differ in the last bits, which would break replica equality.
        """
        _, feats = self.value.forward(obs)
        h = feats[self.value.layers[-2].name]  # (R, B, H)
        w, b = self.value.params["output.weight"], self.value.params["output.bias"]  # (R, 1, H)
        return (h * w).sum(-1) + b, feats

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Action means ``(R, B, A)``, values ``(R, B)`` and prefixed hidden activations."""
        mean, f_pol = self.policy.forward(obs)
        value, f_val = self.values(obs)
        feats = {**{f"policy.{k}": v for k, v in f_pol.items()},
                 **{f"value.{k}": v for k, v in f_val.items()}}
        return mean, value, feats


class PPOAgent:
    """Replica-batched PPO (satisfies :class:`contlearn.agents.Agent`); see the module docstring.

    Observations are ``(R, E, obs_dim)`` (E env copies per replica); a rollout is
    ``rollout / E`` steps. ``observe`` stores each transition and, when the rollout is full,
    runs the update and returns its means ``(R,)``: ``loss``, ``policy_loss``, ``value_loss``,
    ``entropy``, ``approx_kl``, ``clip_fraction``.

    Args:
        info: the stream's :class:`StreamInfo` (``input_shape``, ``num_outputs`` actions).
        seeds: one root seed per replica.
        spec: PPO and network options.
        learner: the learner (optimizer chain) applied to both networks.
    """

    supports_replicas = True
    Spec = PPOSpec
    #: learners that do not apply, with the reason (checked when a run's config is resolved)
    unsupported_learners = {"head-reset": "it needs visible task boundaries and an output "
                            "head; RL streams have neither; use cbp, redo, snp or l2"}

    def __init__(self, info: StreamInfo, seeds: Sequence[int], spec: PPOSpec,
                 learner: Learner) -> None:
        if learner.name in self.unsupported_learners:
            raise ConfigError(f"learner {learner.name} does not apply to PPO: "
                              f"{self.unsupported_learners[learner.name]}")
        self.info, self.spec, self.seeds = info, spec, list(seeds)
        self.learner_spec = learner
        self.gens = [torch_generator(s, "agent") for s in self.seeds]
        self.net = ActorCritic(math.prod(info.input_shape), info.num_outputs,
                               parse_int_list(spec.hidden, "hidden"), spec.activation, spec.init,
                               self.gens, spec.init_log_std)
        self.learner = build_learner(learner, spec.base_optimizer(), self.net, self.seeds)
        self._keys = list(self.net.params)
        self.device = torch.device("cpu")
        self._setup()
        self.buf: dict[str, torch.Tensor] = {}
        self.t = 0  # steps stored in the current rollout
        self.stats = self._zero_stats()
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._stopped: torch.Tensor | None = None
        self._fast = spec.fast and ppo_fast.supports(self.net)
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="ppo-value")
                      if self._fast and spec.parallel_nets else None)
        self._worker: ppo_worker.ValueWorker | None = None
        if spec.value_worker:
            ppo_worker.check_supported(self)

    def _setup(self) -> None:
        """Views of the parameters and a fresh learner state on :attr:`device`."""
        for p in self.net.params.values():
            p.requires_grad_(True)
        self._views = {k: p.detach() for k, p in self.net.params.items()}
        self.learner_state = self.learner.init(self._views)

    def to(self, device: str | torch.device) -> PPOAgent:
        """Move the networks, a fresh learner state and the rollout buffer to ``device`` (call
        before the first step). Streams stay on the CPU: observations and feedback are moved
        here, and actions, metrics, features and statistics are handed back on the CPU.
        Generators stay on the CPU (action noise and minibatch orders are drawn there and
        moved), so a run draws the same numbers on every device."""
        self.close()
        self.device = torch.device(device)
        self.net.to(self.device)
        self._setup()
        self.buf = {k: v.to(self.device) for k, v in self.buf.items()}
        self.stats = self._zero_stats()
        return self

    def close(self) -> None:
        """End the value worker process, if any (a later update starts a new one)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device, non_blocking=True)

    @staticmethod
    def _host(t: torch.Tensor) -> torch.Tensor:
        return t if t.device.type == "cpu" else t.to("cpu")

    def preferred_threads(self) -> int:
        """Intra-op threads for ``threads=0`` (auto): 1. Minibatches of 128 through 256-unit
        layers are dominated by per-op overhead; 2 threads ran 4× slower on a 2-core machine."""
        return 1

    def stop_replicas(self, mask: torch.Tensor) -> None:
        """Stop learning for the replicas in ``mask`` (R,) (e.g. diverged ones)."""
        self._stopped = mask.clone() if bool(mask.any()) else None

    def _zero_stats(self) -> dict[str, Any]:
        R = len(self.seeds)
        dev = getattr(self, "device", None)
        return {"grad_sum": {k: torch.zeros(R, dtype=torch.float64, device=dev)
                             for k in self._keys},
                "change_sum": {k: torch.zeros(R, dtype=torch.float64, device=dev)
                               for k in self._keys},
                "minibatches": 0, "rollouts": 0}

    def _allocate(self, num_envs: int) -> None:
        """Rollout storage for ``num_envs`` copies: ``(R, T, E, ...)``."""
        if self.spec.rollout % num_envs:
            raise ConfigError(f"rollout={self.spec.rollout} is not a multiple of the stream's "
                              f"num_envs={num_envs}")
        R, T, E = len(self.seeds), self.spec.rollout // num_envs, num_envs
        D, A = math.prod(self.info.input_shape), self.info.num_outputs
        z = functools.partial(torch.zeros, device=self.device)
        self.buf = {"obs": z(R, T, E, D), "next_obs": z(R, T, E, D), "action": z(R, T, E, A),
                    "logp": z(R, T, E), "reward": z(R, T, E),
                    "terminated": z(R, T, E, dtype=torch.bool),
                    "truncated": z(R, T, E, dtype=torch.bool), "noise": z(R, T, E, A)}
        self._draw_noise()

    def _draw_noise(self) -> None:
        """The next rollout's standard normal action noise, each replica from its generator."""
        noise = self.buf["noise"]
        for r, gen in enumerate(self.gens):
            noise[r] = torch.randn(noise.shape[1:], generator=gen)  # (CPU generator)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Sample actions ``(R, E, A)`` for observations ``(R, E, obs_dim)``."""
        if not self.buf:
            self._allocate(obs.shape[1])
        log_std = self._views["policy.log_std"]
        with torch.no_grad():
            mean, _ = self.net.policy.forward(self._dev(obs))  # (R, E, A)
            noise = self.buf["noise"][:, self.t]  # (R, E, A)
            action = torch.addcmul(mean, noise, log_std.exp().unsqueeze(1))
            logp = -(0.5 * noise.pow(2) + log_std.unsqueeze(1) + 0.5 * _LOG_2PI).sum(-1)
        action = self._host(action)
        self._last = (obs, action, logp)
        return action

    def observe(self, obs: torch.Tensor, action: torch.Tensor, feedback: Sequence[torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """Store one transition; after ``rollout`` transitions, update and return the means.

        Args:
            obs: ``(R, E, obs_dim)`` the observations acted on.
            action: ``(R, E, A)`` the actions taken.
            feedback: ``(reward, next_obs, terminated, truncated)`` as the stream returns it.
        """
        reward, next_obs, terminated, truncated = feedback
        if self._last is not None and self._last[0] is obs and self._last[1] is action:
            logp = self._last[2]
        else:  # an action this agent did not just sample: score it under the current policy
            with torch.no_grad():
                logp = gaussian_log_prob(self._dev(action), self.net.policy.forward(
                    self._dev(obs))[0], self._views["policy.log_std"])
        self._last = None
        b, t = self.buf, self.t
        for key, value in (("obs", obs), ("next_obs", next_obs), ("action", action),
                           ("logp", logp), ("reward", reward), ("terminated", terminated),
                           ("truncated", truncated)):
            b[key][:, t] = value  # (a copy to the device)
        self.t += 1
        if self.t < b["obs"].shape[1]:
            return {}
        threads = torch.get_num_threads()
        if self.spec.update_threads:  # e.g. 2 while the env workers are idle
            torch.set_num_threads(self.spec.update_threads)
        try:
            metrics = self._update()
        finally:
            torch.set_num_threads(threads)
        self.t = 0
        self._draw_noise()
        return {k: self._host(v) for k, v in metrics.items()}

    def _targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages and value targets of the stored rollout, flattened to ``(R, N)``."""
        b, s = self.buf, self.spec
        R, T, E, D = b["obs"].shape
        with torch.no_grad():
            v = self.net.values(b["obs"].view(R, T * E, D))[0].view(R, T, E)
            v_next = self.net.values(b["next_obs"].view(R, T * E, D))[0].view(R, T, E)
        ended = b["terminated"] | b["truncated"]
        terminal = b["terminated"] if s.bootstrap_truncated else ended
        adv, ret = gae(b["reward"], v, v_next, terminal, ended, s.gamma, s.gae_lambda)
        adv, ret = adv.view(R, -1), ret.view(R, -1)
        if s.norm_adv:
            adv = (adv - adv.mean(1, keepdim=True)) / (adv.std(1, keepdim=True) + 1e-8)
        return adv, ret

    def _update(self) -> dict[str, torch.Tensor]:
        """``epochs`` passes of minibatch updates over the rollout; returns mean statistics."""
        b, s = self.buf, self.spec
        R, T, E, D = b["obs"].shape
        N = T * E
        adv, ret = self._targets()
        data = {"obs": b["obs"].view(R, N, D), "action": b["action"].view(R, N, -1),
                "logp": b["logp"].view(R, N), "adv": adv, "ret": ret}
        before = [self._views[k].clone() for k in self._keys]
        if s.value_worker and self.device.type == "cpu":
            totals = ppo_worker.split_update(self, data)
        else:
            rows = torch.arange(R, device=adv.device).unsqueeze(1)
            totals = {}
            for _ in range(s.epochs):
                order = self._dev(self._order(N))
                shuffled = {k: v[rows, order] for k, v in data.items()}  # (R, N, ...)
                for start in range(0, N, s.minibatch_size):
                    out = self._minibatch({k: v[:, start:start + s.minibatch_size]
                                           for k, v in shuffled.items()}, record=start == 0)
                    for k, v in out.items():
                        totals[k] = totals[k] + v if k in totals else v
        self._count_change(before)
        n = s.epochs * (N // s.minibatch_size)
        return {k: v / n for k, v in totals.items()}

    def _order(self, n: int) -> torch.Tensor:
        """One epoch's minibatch order ``(R, n)``, each replica from its generator."""
        return torch.stack([torch.randperm(n, generator=g) for g in self.gens])

    def _loss(self, mb: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-replica loss ``(R,)``, statistics and hidden activations of one minibatch."""
        s = self.spec
        log_std = self.net.params["policy.log_std"]
        mean, value, feats = self.net.forward(mb["obs"])
        logp = gaussian_log_prob(mb["action"], mean, log_std)  # (R, M)
        policy_loss = clipped_policy_loss(logp, mb["logp"], mb["adv"], s.clip)
        value_loss = (value - mb["ret"]).pow(2).mean(1)
        entropy = (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1)  # (R,)
        loss = policy_loss + s.vf_coef * value_loss - s.ent_coef * entropy
        with torch.no_grad():
            log_ratio = logp - mb["logp"]
            stats = {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
                     "entropy": entropy, "approx_kl": (log_ratio.exp() - 1 - log_ratio).mean(1),
                     "clip_fraction": ((log_ratio.exp() - 1).abs() > s.clip).float().mean(1)}
        return loss, {k: v.detach() for k, v in stats.items()}, feats

    def _minibatch(self, mb: dict[str, torch.Tensor], record: bool) -> dict[str, torch.Tensor]:
        """One learner update on a minibatch ``{name: (R, M, ...)}``; returns its statistics.
        ``record``: add its gradient magnitudes to the probe statistics (a sample of the
        minibatches, as reading every gradient costs ~10% of the update)."""
        if self._fast:
            with torch.no_grad():
                loss, stats, grads_by_name, feats = ppo_fast.loss_and_grads(
                    self.net, mb, self.spec.clip, self.spec.vf_coef, self.spec.ent_coef,
                    self._pool)
            grads = tuple(grads_by_name[k] for k in self._keys)
        else:
            with torch.enable_grad():
                loss, stats, feats = self._loss(mb)
                grads = torch.autograd.grad(loss.sum(), [self.net.params[k] for k in self._keys])
        with torch.no_grad():
            if self.spec.max_grad_norm > 0:
                grads = self._clip(list(grads))
            if record:
                for k, g in zip(self._keys, grads, strict=True):
                    self.stats["grad_sum"][k] += g.abs().flatten(1).sum(1, dtype=torch.float64)
                self.stats["minibatches"] += 1
            updates, self.learner_state = self.learner.update(
                dict(zip(self._keys, grads, strict=True)), self.learner_state, self._views,
                features={k: v.detach() for k, v in feats.items()}, loss=loss.detach(),
                task_start=False)
            if self._stopped is not None:
                for u in updates.values():
                    u[self._stopped] = 0.0
            torch._foreach_add_([self._views[k] for k in self._keys],
                                [updates[k] for k in self._keys])
        return stats

    def _clip(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scale each replica's gradients to a global norm of at most ``max_grad_norm``."""
        norm = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()  # (R,)
        factor = (self.spec.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        return [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in grads]

    def _count_change(self, before: list[torch.Tensor]) -> None:
        for k, old in zip(self._keys, before, strict=True):
            diff = (self._views[k] - old).abs().flatten(1).sum(1, dtype=torch.float64)
            self.stats["change_sum"][k] += diff
        self.stats["rollouts"] += 1

    def update_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Means since the last call, ``{metric: {layer: (R,)}}`` (layer ``""``: all params).

        ``grad_magnitude``: mean |g| of the minibatch updates (the first of every epoch);
        ``weight_change``: mean |Δθ| per rollout's update phase. Empty if no update happened
        since the last call.
        """
        st, out = self.stats, {}
        for metric, key, n in (("grad_magnitude", "grad_sum", st["minibatches"]),
                               ("weight_change", "change_sum", st["rollouts"])):
            if n:
                out[metric] = self._per_layer(st[key], n)
        self.stats = self._zero_stats()
        return out

    def _per_layer(self, sums: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """Per-parameter sums of |x| to per-layer means (weights and biases together)."""
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for k, total in sums.items():
            layer = k.rsplit(".", 1)[0] if k.endswith((".weight", ".bias")) else k
            totals[layer] = totals.get(layer, 0) + total
            counts[layer] = counts.get(layer, 0) + self._views[k][0].numel()
        out = {layer: totals[layer] / (counts[layer] * n) for layer in totals}
        out[""] = sum(totals.values()) / (sum(counts.values()) * n)
        return {k: self._host(v) for k, v in out.items()}

    def diagnostics(self) -> dict[str, dict[str, torch.Tensor]]:
        """The learner's bookkeeping ``{layer: {metric: (R,)}}`` (CBP: ``replacements``, ...)."""
        diag = learner_diagnostics(self.learner_spec, self.learner_state)
        return {layer: {k: self._host(v) for k, v in d.items()} for layer, d in diag.items()}

    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden activations of both nets ``{"policy.hidden1": (R, B, H), ...}``; no learning."""
        with torch.no_grad():
            feats = self.net.forward(self._dev(obs.reshape(obs.shape[0], obs.shape[1], -1)))[2]
        return {k: self._host(v) for k, v in feats.items()}

    def state_dict(self) -> dict[str, Any]:
        """Weights, learner state, generators, the open rollout and the probe statistics
        (tensors and plain values only: ``torch.load(weights_only=True)`` reads it)."""
        return {"params": {k: v.clone() for k, v in self._views.items()},
                "learner": [t.clone() for t in tree_leaves(self.learner_state)],
                "generators": [g.get_state() for g in self.gens], "t": self.t,
                "buffer": {k: v.clone() for k, v in self.buf.items()},
                "stats": {k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v)
                          for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.close()  # a new value worker starts from the restored learner bookkeeping
        for k, v in self._views.items():
            v.copy_(state["params"][k])
        load_tree(self.learner_state, state["learner"])
        for g, s in zip(self.gens, state["generators"], strict=True):
            g.set_state(s)
        self.buf = {k: v.to(self.device, copy=True) for k, v in state["buffer"].items()}
        self.t = int(state["t"])
        self.stats = {k: ({n: t.to(self.device, copy=True) for n, t in v.items()}
                          if isinstance(v, dict) else int(v))
                      for k, v in state["stats"].items()}
        self._last = None
