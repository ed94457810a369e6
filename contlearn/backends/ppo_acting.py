"""PPO's acting forward compiled (``compiled-acting``): each loop step's policy mean and action
``μ(obs) + σ z`` in one C call (``cl_policy_act``, C source in ``policy_act.c``).

At one env copy, acting is one row through the policy (~0.2 MFLOP at 256-256): torch spends
~20 µs dispatching three batched products and an ``addcmul`` for ~6 µs of arithmetic, every
step. The kernel computes the same values, float rounding aside (its dot products add in a
fixed order of its own: the same bits whatever the replicas, rows or instruction set). It
applies (:func:`refusal` names the first reason it does not, None where it does) to:

- PPO's actor-critic with ``fast=true``, ReLU hidden layers (at most
  :data:`MAX_LAYERS` affine layers), float32 on the CPU, no network option, the compiled
  kernels available, any learner; the agent uses it beside a chosen update backend only
  (where every backend refuses, e.g. under a credit rule other than backprop, the reference
  runs, acting included);
- at most :data:`MAX_ROWS` env copies per replica (more rows go to torch's products, which
  read each weight once for all of them).

**The binding checks once per rollout.** What stays put between two updates (each layer's
weights and bias, σ and the rollout's pre-drawn noise) is checked when the agent starts a
rollout (:class:`CompiledPolicy`: dtype, device, layout and each shape against the others) and
kept, with references to the tensors, in one argument struct; a step checks only its
observations and the step index. The agent builds a new one whenever σ or the noise is
recomputed (after each update, :meth:`~contlearn.agents.ppo.PPOAgent.to` and
:meth:`~contlearn.agents.ppo.PPOAgent.load_state_dict`); updates write the weights in place,
so the pointers stay the tensors' own. ``tests/test_ppo_acting.py`` checks the actions against
torch's path, the exact bits across replicas and rows, the errors, and a run.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from contlearn.backends import binding
from contlearn.backends.base import StepConfig, declares
from contlearn.backends.kernels import library, need

#: affine layers the argument struct holds (``CL_POLICY_MAX_LAYERS``)
MAX_LAYERS = 8
#: env copies per replica up to which acting runs in the kernel
MAX_ROWS = 4
#: hidden activations the kernel computes, by its code
ACTIVATIONS = {"relu": 0}
_P, _I = ctypes.c_void_p, ctypes.c_int64
_F32 = torch.float32


class PolicyActArgs(ctypes.Structure):
    """``cl_policy_act``'s argument struct (the C ``PolicyActArgs``, same fields in order)."""

    _fields_ = [
        *[(n, _I) for n in ("R", "E", "T", "layers", "act")],
        ("dims", _I * (MAX_LAYERS + 1)),
        ("weight", _P * MAX_LAYERS),
        ("bias", _P * MAX_LAYERS),
        *[(n, _P) for n in ("noise", "std", "scratch")],
    ]


def check_layout(lib: ctypes.CDLL) -> bool:
    """Whether the compiled library's ``PolicyActArgs`` has :class:`PolicyActArgs`'s size."""
    lib.cl_policy_act_args_size.restype = _I
    lib.cl_policy_act_args_size.argtypes = []
    return int(lib.cl_policy_act_args_size()) == ctypes.sizeof(PolicyActArgs)


class CompiledActing:
    """The backend: :func:`refusal` decides, :class:`CompiledPolicy` acts."""

    name = "compiled-acting"
    description = "PPO's acting forward (policy mean and μ + σz) in one compiled call a step"

    def refusal(self, cfg: StepConfig) -> str | None:
        """Why the kernel does not compute ``cfg``'s acting step (None: it does)."""
        if not cfg.options.get("fast", True):
            return "fast=false"
        if cfg.network != "actor-critic" or cfg.task != "rl":
            return f"acting is PPO's ({cfg.network} on {cfg.task})"
        if cfg.activation not in ACTIVATIONS:
            return f"activation {cfg.activation} (the kernel has {', '.join(ACTIVATIONS)})"
        if not 1 <= cfg.depth < MAX_LAYERS:
            return f"{cfg.depth} hidden layers (the kernel takes 1 to {MAX_LAYERS - 1})"
        if cfg.device != "cpu" or cfg.dtype != "float32":
            return f"{cfg.dtype} on {cfg.device} (the kernel takes float32 on the CPU)"
        if not declares(cfg):
            return f"network options {sorted(cfg.network_options)}"
        if library() is None:
            return "the compiled kernels are unavailable"
        return None

    def supports(self, cfg: StepConfig) -> bool:
        """Whether the kernel computes ``cfg``'s acting step (:func:`refusal` is None)."""
        return self.refusal(cfg) is None


#: the backend
COMPILED_ACTING = CompiledActing()


class CompiledPolicy:
    """One rollout's acting kernel: the policy's weights, σ and the rollout's noise, checked
    once (module docstring).

    Args:
        policy: the policy :class:`~contlearn.agents.networks.BatchedMLP` (its own params).
        std: σ ``(R, 1, A)`` (or ``(R, A)``).
        noise: the rollout's standard normal noise ``(R, T, E, A)``.
    """

    def __init__(self, policy: Any, std: torch.Tensor, noise: torch.Tensor) -> None:
        if policy.activation not in ACTIVATIONS or policy.layer_norm:
            raise ValueError(f"the acting kernel has no {policy.activation} / layer norm")
        layers = policy.layers
        if not 1 < len(layers) <= MAX_LAYERS:
            raise ValueError(f"the acting kernel takes 2 to {MAX_LAYERS} layers, not {len(layers)}")
        R, T, E, A = binding.check("noise", noise, _F32, (None, None, None, None)).shape
        self.shape = (R, E)
        self.steps = T
        dims = [layers[0].fan_in]
        kept: list[torch.Tensor] = [noise]
        args = PolicyActArgs(R=R, E=E, T=T, layers=len(layers), act=ACTIVATIONS[policy.activation])
        for i, layer in enumerate(layers):
            w = binding.check(
                f"{layer.name}.weight",
                policy.params[f"{layer.name}.weight"].detach(),
                _F32,
                (R, layer.fan_out, dims[-1]),
            )
            b = binding.check(
                f"{layer.name}.bias",
                policy.params[f"{layer.name}.bias"].detach(),
                _F32,
                (R, layer.fan_out),
            )
            args.weight[i], args.bias[i] = w.data_ptr(), b.data_ptr()
            kept += [w, b]
            dims.append(layer.fan_out)
        if dims[-1] != A:
            raise ValueError(f"kernel argument noise: {A} actions, the policy has {dims[-1]}")
        std = binding.contiguous("std", std).detach()
        if tuple(std.shape) not in ((R, 1, A), (R, A)):
            raise ValueError(
                f"kernel argument std: shape {tuple(std.shape)}, expected ({R}, 1, {A}) or "
                f"({R}, {A}) from the other arguments"
            )
        std = binding.check("std", std.reshape(R, A), _F32, (R, A))
        scratch = torch.empty(2 * max(dims[1:]))
        kept += [std, scratch]
        for i, d in enumerate(dims):
            args.dims[i] = d
        args.noise, args.std, args.scratch = noise.data_ptr(), std.data_ptr(), scratch.data_ptr()
        self.dims = dims
        self._args = args
        self._kept = kept  # (the tensors the struct points into live as long as it does)
        self._fn = need().cl_policy_act
        self._ref = ctypes.byref(args)

    def act(self, obs: torch.Tensor, t: int) -> torch.Tensor:
        """Actions ``(R, E, A)`` for observations ``(R, E, obs_dim)`` at rollout step ``t``."""
        x = binding.check("obs", binding.contiguous("obs", obs), _F32, (*self.shape, self.dims[0]))
        if not 0 <= t < self.steps:
            raise ValueError(f"kernel argument t: step {t} outside the rollout's {self.steps}")
        action = torch.empty(*self.shape, self.dims[-1])
        self._fn(self._ref, x.data_ptr(), t, action.data_ptr())
        return action
