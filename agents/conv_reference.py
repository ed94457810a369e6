"""The paper's conv net as a plain ``torch.nn.Module`` for one seed: the independent reference
the replica-batched :class:`~contlearn.agents.conv_networks.BatchedConvNet` is tested against,
and the per-seed baseline of ``scripts/bench_conv.py`` (one module per seed, ``torch.optim``).

Written as the reference code's ``ConvNet`` is (``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.Linear``,
``view`` to flatten), with no code shared with the batched network."""

from __future__ import annotations

import torch
from torch import nn


class TorchConvNet(nn.Module):
    """conv(C→32, 5) · relu · pool, conv(32→64, 3) · relu · pool, conv(64→128, 3) · relu ·
    pool, fc(→128) · relu, fc(128→128) · relu, fc(128→classes).

    Args:
        in_ch: input channels.
        side: input height = width.
        classes: outputs.
    """

    def __init__(self, in_ch: int, side: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.conv3 = nn.Conv2d(64, 128, 3)
        self.pool = nn.MaxPool2d(2, 2)
        last = (((side - 4) // 2 - 2) // 2 - 2) // 2
        self.flat = 128 * last * last
        self.fc1 = nn.Linear(self.flat, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, classes)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs and the five hidden activations (the conv ones as pooled ``(B, C, h, w)``
        maps), as the reference's ``predict``."""
        x1 = self.pool(torch.relu(self.conv1(x)))
        x2 = self.pool(torch.relu(self.conv2(x1)))
        x3 = self.pool(torch.relu(self.conv3(x2)))
        x4 = torch.relu(self.fc1(x3.view(-1, self.flat)))
        x5 = torch.relu(self.fc2(x4))
        return self.fc3(x5), [x1, x2, x3, x4, x5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs ``(B, classes)``."""
        return self.predict(x)[0]

    def load_replica(self, params: dict[str, torch.Tensor], r: int) -> TorchConvNet:
        """Copy replica ``r`` of a batched net's parameters (``conv<j>``, ``fc1``, ``fc2``,
        ``output``) into this module; returns it."""
        names: dict[str, nn.Conv2d | nn.Linear] = {
            "conv1": self.conv1,
            "conv2": self.conv2,
            "conv3": self.conv3,
            "fc1": self.fc1,
            "fc2": self.fc2,
            "output": self.fc3,
        }
        with torch.no_grad():
            for key, module in names.items():
                module.weight.copy_(params[f"{key}.weight"][r].reshape(module.weight.shape))
                module.bias.copy_(params[f"{key}.bias"][r])  # type: ignore[union-attr]
        return self
