"""A complete plug-in agent: your own class, outside the package, run by contlearn.

It needs no base class: an ``__init__(info, seed, **options)``, ``act`` and ``observe``
(the Agent Protocol). Options with defaults become config keys (``--set lr=0.05``).

Run it from the repository root either way::

    contlearn run permuted-mnist --agent scripts/my_agent.py:LinearAgent --tasks 3 \\
        --set examples_per_task=1000 --set lr=0.05
    python scripts/my_agent.py        # the same through the Python API
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LinearAgent:
    """Online multinomial logistic regression (or linear regression) trained by plain SGD.

    It does not set ``supports_replicas``, so contlearn runs each seed on its own and this
    class sees ``(B, ...)`` tensors.
    """

    def __init__(self, info, seed: int, lr: float = 0.05) -> None:
        gen = torch.Generator().manual_seed(seed)
        in_dim = 1
        for d in info.input_shape:
            in_dim *= d
        self.kind = info.kind
        self.lr = lr
        self.w = torch.randn(in_dim, info.num_outputs, generator=gen) * 0.01
        self.b = torch.zeros(info.num_outputs)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Predictions (B, num_outputs) for inputs (B, ...)."""
        return obs.reshape(obs.shape[0], -1) @ self.w + self.b

    def observe(self, obs: torch.Tensor, action: torch.Tensor, feedback: torch.Tensor) -> dict:
        """One SGD step on the loss of the answer just given; returns the loss."""
        x = obs.reshape(obs.shape[0], -1)
        if self.kind == "classification":
            loss = F.cross_entropy(action, feedback)
            err = torch.softmax(action, -1) - F.one_hot(feedback, action.shape[-1])
        else:
            loss = (action - feedback).pow(2).sum(-1).mean()
            err = 2 * (action - feedback)
        err = err / x.shape[0]
        self.w -= self.lr * x.T @ err
        self.b -= self.lr * err.sum(0)
        return {"loss": loss}


if __name__ == "__main__":
    import contlearn

    result = contlearn.run(
        "permuted-mnist",
        agent=LinearAgent,
        seeds=2,
        tasks=3,
        config={"examples_per_task": 1000, "lr": 0.05},
    )
    df = result.metrics()
    print(df[df.metric == "accuracy"][["seed", "task", "value"]].to_string(index=False))
    print(f"run written to {result.path}")
