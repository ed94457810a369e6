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

Reference and backends: one minibatch step (:meth:`PPOAgent.minibatch`: the loss's gradients,
then :meth:`PPOAgent.learn`: clipping, the learner's update, its application). The reference
computes the gradients with autograd (:mod:`contlearn.agents.ppo_loss`); a backend computes the
same faster: ``ppo-gradients`` by hand (:mod:`contlearn.backends.ppo_gradients`, optionally
the two nets in two threads, ``parallel_nets``), ``ppo-gradients+value-worker`` with the value
net's steps in a second process (:mod:`contlearn.backends.ppo_worker`). The agent asks
:attr:`PPOAgent.backends` in order, once per placement, and records the choice in
:attr:`PPOAgent.backend`; ``fast=false`` runs the reference. ``update_threads`` sets more torch
threads during the update only. :meth:`PPOAgent.to` moves everything but the generators to a
device (docs/slippery_ant.md). A credit rule other than backprop (``credit``) runs the
reference with a rule per net (:mod:`contlearn.agents.ppo_credit`, docs/credit.md).

(Over 400 lines: the agent's rollout, update loop, placement, probing and checkpoints share
its state; the loss, options, statistics and networks have modules of their own.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from contlearn.agents.actor_critic import ActorCritic
from contlearn.agents.ppo_auto import resolve_auto, step_config
from contlearn.agents.ppo_credit import CreditStep, PPOCredit
from contlearn.agents.ppo_loss import (
    REFERENCE_STEP,
    PPOBackend,
    clip_by_global_norm,
    clipped_policy_loss,
    gae,
    gaussian_log_prob,
    standard_log_prob,
)
from contlearn.agents.ppo_spec import PPOSpec
from contlearn.agents.ppo_stats import count_change, probe_means, zero_stats
from contlearn.backends.adam_apply import AdamApply, adam_apply_form
from contlearn.backends.base import StepConfig, choose
from contlearn.backends.kernels import library
from contlearn.backends.ppo_acting import COMPILED_ACTING, MAX_ROWS, CompiledPolicy
from contlearn.backends.ppo_gradients import PPO_GRADIENTS
from contlearn.backends.ppo_worker import VALUE_WORKER, ValueMode, ValueWorker
from contlearn.envs.base import StreamInfo
from contlearn.errors import ConfigError
from contlearn.learners import Learner, build_learner, learner_diagnostics
from contlearn.seeding import torch_generator
from contlearn.spec import parse_int_list
from contlearn.state import load_tree, tree_leaves

__all__ = ["ActorCritic", "PPOAgent", "PPOSpec", "clipped_policy_loss", "gae", "gaussian_log_prob"]


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
    #: observe returns metrics once per update (recorded as they come, not per episode)
    rl_metrics = "update"
    Spec = PPOSpec
    #: the stream kinds it learns on (the config refuses others up front)
    stream_kinds = ("rl",)
    #: every registered credit rule (:mod:`contlearn.credit`; other than backprop: one rule per
    #: net, :mod:`contlearn.agents.ppo_credit`, on the reference step)
    credit_rules = "*"
    #: the fast paths, asked in this order (:func:`contlearn.backends.base.choose`)
    backends: tuple[PPOBackend, ...] = (VALUE_WORKER, PPO_GRADIENTS)
    #: the name of the step that runs: ``reference`` (autograd), ``ppo-gradients`` (hand-written
    #: gradients) or ``ppo-gradients+value-worker`` (those, the value net's in a second
    #: process); set when the agent is built or moved (:meth:`to`)
    backend: str
    #: learners that do not apply, with the reason (checked when a run's config is resolved)
    unsupported_learners = {
        "head-reset": "it needs visible task boundaries and an output "
        "head; RL streams have neither; use cbp, redo, snp or l2",
        "normalize-and-project": "its layer norm is a network option of the online agent "
        "only (PPO's nets have no layer_norm); use cbp, redo, snp or l2",
    }
    #: options of the online agent's network that PPO's nets do not have, with the reason
    refused_options = {
        "layer_norm": "PPO's policy and value nets have no layer norm (a network option of the "
        "online agent, docs/learners.md 'Network options'); drop it",
    }

    def __init__(
        self, info: StreamInfo, seeds: Sequence[int], spec: PPOSpec, learner: Learner
    ) -> None:
        if learner.name in self.unsupported_learners:
            raise ConfigError(
                f"learner {learner.name} does not apply to PPO: "
                f"{self.unsupported_learners[learner.name]}"
            )
        spec = resolve_auto(spec, learner)  # (a no-op for a spec the run's config resolved)
        self.info, self.spec, self.seeds = info, spec, list(seeds)
        self.learner_spec = learner
        self.gens = [torch_generator(s, "agent") for s in self.seeds]
        self.net = ActorCritic(
            math.prod(info.input_shape),
            info.num_outputs,
            parse_int_list(spec.hidden, "hidden"),
            spec.activation,
            spec.init,
            self.gens,
            spec.init_log_std,
        )
        self.learner = build_learner(learner, spec.base_optimizer(), self.net, self.seeds)
        #: the credit rules of both nets (None: backprop, autograd through the whole loss)
        self.credit = (
            None
            if learner.credit.name == "bp"
            else PPOCredit(learner.credit, self.net, self.seeds, spec.lr)
        )
        self._keys = list(self.net.params)
        self.device = torch.device("cpu")
        self._setup()
        self.buf: dict[str, torch.Tensor] = {}
        self.t = 0  # steps stored in the current rollout
        self.stats = self._zero_stats()
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: σ and the rollout's noise log-probabilities (:meth:`_noise_terms`; None: to compute)
        #: and the rollout's acting kernel where it applies (None: torch's ops)
        self._rollout_consts: tuple[torch.Tensor, torch.Tensor, CompiledPolicy | None] | None = None
        self._views_of: dict[str, torch.Tensor] | None = None  # (the buffer _np_buf views)
        self._np_buf: dict[str, Any] = {}
        self._stopped: torch.Tensor | None = None
        # (a backend that does not split the nets over threads ignores the pool)
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="ppo-value") if spec.parallel_nets else None
        )
        self._worker: ValueWorker | None = None
        self._value_mode: ValueMode | None = None  # (which process runs the value half)
        self._choose(strict=True)

    def step_config(self) -> StepConfig:
        """The resolved configuration of the minibatch step, as backends see it."""
        dtype = str(self.net.log_std.dtype).removeprefix("torch.")
        return step_config(self.spec, self.learner_spec, self.device.type, dtype)

    #: ``value_worker=auto`` resolved from the options (``ppo_auto.resolve_auto``; the run's
    #: config calls it with the run's ``threads`` and ``device``)
    resolve_auto = staticmethod(resolve_auto)

    def _choose(self, strict: bool) -> None:
        """Pick the step: the first of :attr:`backends` that supports :meth:`step_config`
        (none with ``fast=false``), else the reference. ``strict``: raise if
        ``value_worker=true`` was asked for and does not apply (on a device other than the CPU
        it is left out silently, as the run asked for the device too)."""
        cfg = self.step_config()
        chosen = choose(self.backends, cfg) if self.spec.fast else None
        reference = REFERENCE_STEP if self.credit is None else CreditStep(self.credit)
        self._step: PPOBackend = chosen or reference
        #: acting through the compiled kernel (:mod:`contlearn.backends.ppo_acting`), with a
        #: chosen backend (where every backend refuses, the reference runs, acting included)
        self._compiled_acting = chosen is not None and COMPILED_ACTING.supports(cfg)
        self.backend = self._step.name + ("+compiled-acting" if self._compiled_acting else "")
        #: plain Adam applied in place in one call (the same bits; None: the learner's update)
        fused = chosen is not None and self.credit is None and cfg.device == "cpu"
        fused = fused and cfg.dtype == "float32" and library() is not None
        applies = fused and adam_apply_form(self.learner) is not None
        self._adam_apply = AdamApply(self.learner, self.learner_state) if applies else None
        reason = VALUE_WORKER.refusal(cfg)
        if strict and self.spec.value_worker == "true" and chosen is not VALUE_WORKER and reason:
            raise ConfigError(reason)

    def _setup(self) -> None:
        """Views of the parameters and a fresh learner state on :attr:`device`."""
        for p in self.net.params.values():
            p.requires_grad_(True)
        self._views = {k: p.detach() for k, p in self.net.params.items()}
        self.learner_state = self.learner.init(self._learner_params(self._views))

    def to(self, device: str | torch.device) -> PPOAgent:
        """Move the networks, their feedback (credit rules), a fresh learner state and the
        rollout buffer to ``device`` (call before the first step). Streams stay on the CPU:
        observations and feedback are moved here, and actions, metrics, features and
        statistics are handed back on the CPU. Generators stay on the CPU (action noise and
        minibatch orders are drawn there and moved), so a run draws the same numbers on every
        device."""
        self.close()
        self.device = torch.device(device)
        self.net.to(self.device)
        if self.credit is not None:
            self.credit.to(self.device)
        self._setup()
        self._choose(strict=False)
        self.buf = {k: v.to(self.device) for k, v in self.buf.items()}
        self.stats = self._zero_stats()
        self._rollout_consts = None
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
        return zero_stats(self._keys, len(self.seeds), getattr(self, "device", None))

    def _allocate(self, num_envs: int) -> None:
        """Rollout storage for ``num_envs`` copies: ``(R, T, E, ...)``."""
        if self.spec.rollout % num_envs:
            raise ConfigError(
                f"rollout={self.spec.rollout} is not a multiple of the stream's num_envs={num_envs}"
            )
        R, T, E = len(self.seeds), self.spec.rollout // num_envs, num_envs
        D, A = math.prod(self.info.input_shape), self.info.num_outputs
        z = functools.partial(torch.zeros, device=self.device)
        self.buf = {
            "obs": z(R, T, E, D),
            "next_obs": z(R, T, E, D),
            "action": z(R, T, E, A),
            "logp": z(R, T, E),
            "reward": z(R, T, E),
            "terminated": z(R, T, E, dtype=torch.bool),
            "truncated": z(R, T, E, dtype=torch.bool),
            "noise": z(R, T, E, A),
        }
        self._draw_noise()

    def _draw_noise(self) -> None:
        """The next rollout's standard normal action noise, each replica from its generator."""
        self._rollout_consts = None  # (σ may change in the update; new noise)
        noise = self.buf["noise"]
        for r, gen in enumerate(self.gens):
            noise[r] = torch.randn(noise.shape[1:], generator=gen)  # (CPU generator)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Sample actions ``(R, E, A)`` for observations ``(R, E, obs_dim)``: ``μ(obs) + σ z``
        with this step's noise z; its log-probability is kept for :meth:`observe`."""
        if not self.buf:
            self._allocate(obs.shape[1])
        if self._rollout_consts is None:
            self._rollout_consts = self._noise_terms()
        std, logps, compiled = self._rollout_consts
        if compiled is not None:
            action = compiled.act(obs, self.t)
        else:
            with torch.no_grad():
                mean, _ = self.net.policy.forward(self._dev(obs))  # (R, E, A)
                action = self._host(torch.addcmul(mean, self.buf["noise"][:, self.t], std))
        self._last = (obs, action, logps[:, self.t])
        return action

    def _noise_terms(self) -> tuple[torch.Tensor, torch.Tensor, CompiledPolicy | None]:
        """σ ``(R, 1, A)`` and the log-probability of every step's noise ``(R, T, E)``, for the
        rest of the rollout: σ changes only in an update, and the noise is drawn for the whole
        rollout, so acting computes neither per step (the same elementwise ops and sums as a
        per-step ``standard_log_prob``, bit for bit: ``tests/test_ppo.py``); and the acting
        kernel bound to them and the weights, where it applies (at most ``MAX_ROWS`` copies)."""
        log_std = self._views["policy.log_std"]  # (R, A)
        noise = self.buf["noise"]  # (R, T, E, A)
        R, T, E, A = noise.shape
        with torch.no_grad():
            logps = standard_log_prob(noise.view(R, T * E, A), log_std).view(R, T, E)
            std = log_std.exp().unsqueeze(1)
        compiled = self._compiled_acting and E <= MAX_ROWS and self.device.type == "cpu"
        return std, logps, CompiledPolicy(self.net.policy, std, noise) if compiled else None

    def observe(
        self, obs: torch.Tensor, action: torch.Tensor, feedback: Sequence[torch.Tensor]
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
                logp = gaussian_log_prob(
                    self._dev(action),
                    self.net.policy.forward(self._dev(obs))[0],
                    self._views["policy.log_std"],
                )
        self._last = None
        b, t = self.buf, self.t
        host = self._host_views()
        for key, value in (
            ("obs", obs),
            ("next_obs", next_obs),
            ("action", action),
            ("logp", logp),
            ("reward", reward),
            ("terminated", terminated),
            ("truncated", truncated),
        ):
            if host is not None and value.device.type == "cpu" and not value.requires_grad:
                host[key][:, t] = value.numpy()  # (the same copy, without torch's dispatch)
            else:
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

    def _host_views(self) -> dict[str, Any] | None:
        """numpy views of the rollout buffer on the CPU (None on another device), kept while
        :attr:`buf` is the same dict."""
        if self.device.type != "cpu":
            return None
        if self._views_of is not self.buf:
            self._np_buf = {k: v.numpy() for k, v in self.buf.items()}
            self._views_of = self.buf
        return self._np_buf

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
        """``epochs`` passes of minibatch steps over the rollout; returns mean statistics."""
        b, s = self.buf, self.spec
        R, T, E, D = b["obs"].shape
        N = T * E
        adv, ret = self._targets()
        data = {
            "obs": b["obs"].view(R, N, D),
            "action": b["action"].view(R, N, -1),
            "logp": b["logp"].view(R, N),
            "adv": adv,
            "ret": ret,
        }
        before = {k: self._views[k].clone() for k in self._keys}
        orders = self._dev(torch.stack([self._order(N) for _ in range(s.epochs)]))  # (ep, R, N)
        totals = self._step.update(self, data, orders)
        count_change(self.stats, self._views, before)
        n = s.epochs * (N // s.minibatch_size)
        return {k: v / n for k, v in totals.items()}

    def _order(self, n: int) -> torch.Tensor:
        """One epoch's minibatch order ``(R, n)``, each replica from its generator."""
        return torch.stack([torch.randperm(n, generator=g) for g in self.gens])

    def minibatches(
        self, data: Mapping[str, torch.Tensor], orders: torch.Tensor
    ) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """The minibatches of one update: ``data`` ``{name: (R, N, ...)}`` shuffled by each
        epoch's order ``(R, N)`` of ``orders`` and cut into ``minibatch_size`` pieces; with
        each, whether it is its epoch's first (whose gradients the probe statistics sample)."""
        size = self.spec.minibatch_size
        rows = torch.arange(orders.shape[1], device=orders.device).unsqueeze(1)
        for order in orders:
            shuffled = {k: v[rows, order] for k, v in data.items()}  # (R, N, ...)
            for start in range(0, order.shape[1], size):
                yield {k: v[:, start : start + size] for k, v in shuffled.items()}, start == 0

    def run_minibatches(
        self, data: Mapping[str, torch.Tensor], orders: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One update's :meth:`minibatch` steps in this process; statistics summed."""
        totals: dict[str, torch.Tensor] = {}
        for mb, first in self.minibatches(data, orders):
            for k, v in self.minibatch(mb, record=first).items():
                totals[k] = totals[k] + v if k in totals else v
        return totals

    def minibatch(self, mb: Mapping[str, torch.Tensor], record: bool) -> dict[str, torch.Tensor]:
        """One minibatch step ``{name: (R, M, ...)}``: the chosen step's gradients, then
        :meth:`learn`; returns the minibatch's statistics ``(R,)``."""
        s = self.spec
        _, stats, grads, features = self._step.loss_and_grads(
            self.net, mb, s.clip, s.vf_coef, s.ent_coef, self._pool
        )
        self.learn(grads, features, record)
        return stats

    def learn(
        self, grads: Mapping[str, torch.Tensor], features: Mapping[str, torch.Tensor], record: bool
    ) -> dict[str, torch.Tensor]:
        """:meth:`apply_update`, adding the gradient magnitudes to the probe statistics if
        ``record`` (a sample of the minibatches: reading every gradient costs ~10%); returns
        the update applied (empty where plain Adam was applied in place)."""
        sums, updates = self.apply_update(grads, features, record)
        if sums is not None:
            for k, total in sums.items():
                self.stats["grad_sum"][k] += total
            self.stats["minibatches"] += 1
        return updates

    def apply_update(
        self, grads: Mapping[str, torch.Tensor], features: Mapping[str, torch.Tensor], record: bool
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        """Clip ``grads`` (``max_grad_norm``), run the learner's update on the parameters they
        name with ``features`` (hidden activations), add it to the weights (not those of
        stopped replicas). Returns Σ|g| per parameter ``(R,)`` float64 if ``record`` (else
        None), and the update applied (with learned feedback: where a reset wrote ``θ + u``
        itself, the update it replaced; empty where plain Adam was applied in place by
        :class:`~contlearn.backends.adam_apply.AdamApply`, without a credit rule, whose
        learning is all that reads it)."""
        with torch.no_grad():
            if self.spec.max_grad_norm > 0:
                grads = clip_by_global_norm(grads, self.spec.max_grad_norm)
            keys = list(grads)
            sums = (
                {k: g.abs().flatten(1).sum(1, dtype=torch.float64) for k, g in grads.items()}
                if record
                else None
            )
            params = self._learner_params({k: self._views[k] for k in keys})
            fused = self._adam_apply if self._stopped is None else None
            if fused is not None and fused.apply_(grads, params):  # (learner.update, the add)
                return sums, {}  # (the update itself: read only under a credit rule)
            grads = {**grads, **{k: torch.zeros_like(params[k]) for k in params if k not in grads}}
            extras = {} if self.credit is None else self.credit.update_extras()
            updates, self.learner_state = self.learner.update(
                grads,
                self.learner_state,
                params,
                features=dict(features),
                task_start=False,
                **extras,
            )
            # where a reset wrote θ + u itself, the update it replaced: what learned feedback
            # follows (Kolen–Pollack's ΔB = ΔW); returned, not applied
            kept = extras["feedback"].updates if "feedback" in extras else {}
            if self._stopped is not None:
                for u in [*updates.values(), *kept.values()]:
                    u[self._stopped] = 0.0
            torch._foreach_add_([params[k] for k in params], [updates[k] for k in params])
        return sums, {**updates, **kept}

    def _learner_params(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views``, with ``credit.regularize`` and the learned feedback
        (:meth:`~contlearn.agents.ppo_credit.PPOCredit.learner_params`)."""
        return views if self.credit is None else self.credit.learner_params(views)

    def update_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Means since the last call (:func:`~contlearn.agents.ppo_stats.probe_means`:
        ``grad_magnitude``, ``weight_change``), ``{metric: {layer: (R,)}}``; then zeroed."""
        out = probe_means(self.stats, self._views)
        self.stats = self._zero_stats()
        return {m: {k: self._host(v) for k, v in d.items()} for m, d in out.items()}

    def diagnostics(self) -> dict[str, dict[str, torch.Tensor]]:
        """The learner's bookkeeping ``{layer: {metric: (R,)}}`` (CBP: ``replacements``, ...)."""
        diag = learner_diagnostics(self.learner_spec, self.learner_state)
        return {layer: {k: self._host(v) for k, v in d.items()} for layer, d in diag.items()}

    def has_feedback(self) -> bool:
        """Whether a credit rule other than backprop runs (the alignment probes apply)."""
        return self.credit is not None

    def credit_alignment(
        self, obs: torch.Tensor, target: torch.Tensor | None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{"weight_alignment": ..., "feedback_alignment": ...}``, each ``{prefixed layer:
        (R,)}`` in degrees (docs/credit.md). RL probe batches carry no targets, so the error
        angle is taken on the last update's last minibatch (none before the first update).
        Empty for backprop."""
        if self.credit is None:
            return {}
        s = self.spec
        found = {
            "weight_alignment": self.credit.weight_alignment(self.net),
            "feedback_alignment": self.credit.feedback_alignment(
                self.net, s.clip, s.vf_coef, s.ent_coef
            ),
        }
        return {
            probe: {k: self._host(v) for k, v in values.items()}
            for probe, values in found.items()
            if values
        }

    def features(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hidden activations of both nets ``{"policy.hidden1": (R, B, H), ...}``; no learning."""
        with torch.no_grad():
            feats = self.net.forward(self._dev(obs.reshape(obs.shape[0], obs.shape[1], -1)))[2]
        return {k: self._host(v) for k, v in feats.items()}

    def state_dict(self) -> dict[str, Any]:
        """Weights, learner state, generators, the open rollout and the probe statistics
        (tensors and plain values only: ``torch.load(weights_only=True)`` reads it)."""
        return {
            "params": {k: v.clone() for k, v in self._views.items()},
            "learner": [t.clone() for t in tree_leaves(self.learner_state)],
            "generators": [g.get_state() for g in self.gens],
            "t": self.t,
            "buffer": {k: v.clone() for k, v in self.buf.items()},
            "stats": {
                k: ({n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v)
                for k, v in self.stats.items()
            },
            **({} if self.credit is None else {"credit": self.credit.state_dict()}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.close()  # a new value worker starts from the restored learner bookkeeping
        for k, v in self._views.items():
            v.copy_(state["params"][k])
        load_tree(self.learner_state, state["learner"])
        for g, s in zip(self.gens, state["generators"], strict=True):
            g.set_state(s)
        if self.credit is not None:
            self.credit.load_state_dict(state.get("credit"))
        self.buf = {k: v.to(self.device, copy=True) for k, v in state["buffer"].items()}
        self.t = int(state["t"])
        self.stats = {
            k: (
                {n: t.to(self.device, copy=True) for n, t in v.items()}
                if isinstance(v, dict)
                else int(v)
            )
            for k, v in state["stats"].items()
        }
        self._last = None
        self._rollout_consts = None  # (the restored σ and noise)
