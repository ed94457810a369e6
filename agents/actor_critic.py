"""The actor-critic network of PPO: a policy and a value :class:`BatchedMLP` seen as one network.

Both nets carry the replica dim R natively; their layers are named ``policy.hidden1`` …
``value.output``, so a learner chain (``bp``, ``l2``, ``snp``, ``cbp``, ``redo``, ...) and the
probes act on both at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from contlearn.agents.networks import BatchedMLP


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

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int],
        activation: str,
        init: str,
        generators: Sequence[torch.Generator],
        init_log_std: float,
    ) -> None:
        self.policy = BatchedMLP(obs_dim, hidden, act_dim, activation, init, generators)
        self.value = BatchedMLP(obs_dim, hidden, 1, activation, init, generators)
        self.nets = {"policy": self.policy, "value": self.value}
        self.activation = activation
        #: the init both nets were drawn from (learners that read init bounds need it)
        self.init = init
        self.log_std = torch.full((len(generators), act_dim), float(init_log_std))  # (R, A)
        self.params = {f"{p}.{k}": v for p, net in self.nets.items() for k, v in net.params.items()}
        self.params["policy.log_std"] = self.log_std
        self.layers = [
            replace(
                layer, name=f"{p}.{layer.name}", next=f"{p}.{layer.next}" if layer.next else None
            )
            for p, net in self.nets.items()
            for layer in net.layers
        ]
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

    def sample_init(
        self, name: str, rows: int, generator: torch.Generator
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
        return self.value_output(feats[self.value.layers[-2].name]), feats

    def value_output(
        self, h: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """State values ``(R, B)`` from the value net's last hidden activations ``h (R, B, H)``
        (:meth:`values`' multiply-and-sum; ``params``: the value net's, default its own)."""
        p = self.value.params if params is None else params
        w, b = p["output.weight"], p["output.bias"]  # (R, 1, H), (R, 1)
        return (h * w).sum(-1) + b

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Action means ``(R, B, A)``, values ``(R, B)`` and prefixed hidden activations."""
        mean, f_pol = self.policy.forward(obs)
        value, f_val = self.values(obs)
        feats = {
            **{f"policy.{k}": v for k, v in f_pol.items()},
            **{f"value.{k}": v for k, v in f_val.items()},
        }
        return mean, value, feats
