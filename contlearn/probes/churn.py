"""``churn``: how much the network's outputs moved since the last probe point, on inputs it
keeps fixed (the output churn of Schaul et al. 2022, "The phenomenon of policy churn", and
Tang & Berseth 2024, "Improving deep reinforcement learning by reducing the chain effect of
value and policy churn", measured on a held-out batch).

At the first probe point of a run the probe keeps the first :data:`CHURN_INPUTS` inputs of
that point's probe batch, ``X`` (per replica, its own stream's inputs), and the network's
outputs on them, ``f₀(X)``; it reports nothing then. At every later probe point t it reports,
per replica, ``churn = (1/|X|) Σ_{x∈X} ‖f_t(x) − f_{t−1}(x)‖₂`` (layer ``""``): the mean
Euclidean distance between the output vectors (logits for classification, predictions for
regression) now and at the previous probe point, then keeps ``f_t(X)``. With the default
schedule (a probe point at every task start) that is the change over the last task.

``X`` and the last outputs live in the loop's probe memory
(:attr:`~contlearn.probes.measures.ProbeContext.memory`), saved in checkpoints, so a resumed run
reports what an uninterrupted one does. Needs agents with ``outputs(obs)``
(:class:`~contlearn.agents.protocol.SupportsOutputs`: the online agent); not snapshot-safe, so
a run that records it probes in line.
"""

from __future__ import annotations

import torch

from contlearn.agents.protocol import SupportsOutputs
from contlearn.probes.measures import ProbeContext, register_probe

#: the number of inputs of the first probe batch ``churn`` keeps (per replica)
CHURN_INPUTS = 256
_INPUTS, _OUTPUTS = "churn.inputs", "churn.outputs"


def churn(ctx: ProbeContext) -> dict[str, torch.Tensor]:
    """Mean ‖f_t(x) − f_{t−1}(x)‖₂ over the kept inputs (module docstring); ``{}`` at the
    first probe point."""
    agent, memory = ctx.agent, ctx.memory
    if not isinstance(agent, SupportsOutputs) or ctx.obs is None:
        return {}
    if _INPUTS not in memory:
        memory[_INPUTS] = ctx.obs[:, :CHURN_INPUTS].detach().clone()
    now = agent.outputs(memory[_INPUTS]).detach().to("cpu", torch.float64)  # (R, P, C)
    before = memory.get(_OUTPUTS)
    memory[_OUTPUTS] = now
    if before is None:
        return {}
    return {"": (now - before).norm(dim=2).mean(1)}


register_probe(
    "churn",
    churn,
    needs=("outputs(obs) (its network's outputs)", lambda a: isinstance(a, SupportsOutputs)),
)
