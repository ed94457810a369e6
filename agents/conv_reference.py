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


class _Block(nn.Module):
    """torchvision's BasicBlock with biased convs (the reference's change)."""

    def __init__(self, inp: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inp != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inp, planes, 1, stride), nn.BatchNorm2d(planes)
            )
        self.hidden: torch.Tensor | None = None  # conv1's activation of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        self.hidden = out
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + skip)


class TorchResNet18(nn.Module):
    """The reference's ResNet-18 for one seed: a 3×3 stride-1 stem with bias and BN, no
    max-pool, layers of two BasicBlocks (64, 128, 256, 512), global average pool, fc."""

    def __init__(self, in_ch: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, inp = [], 64
        for s, planes in enumerate((64, 128, 256, 512)):
            for b in range(2):
                blocks.append(_Block(inp, planes, 2 if s > 0 and b == 0 else 1))
                inp = planes
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs ``(B, classes)``; each block's conv1 activation is kept (``hidden``)."""
        a = torch.relu(self.bn1(self.conv1(x)))
        for block in self.blocks:
            a = block(a)
        return self.fc(a.mean((2, 3)))

    def pairs(self) -> dict[str, tuple[nn.Conv2d | nn.Linear, nn.BatchNorm2d | None]]:
        """Each batched layer name with its conv (or fc) and batch norm."""
        out: dict[str, tuple[nn.Conv2d | nn.Linear, nn.BatchNorm2d | None]] = {
            "stem": (self.conv1, self.bn1)
        }
        for k, block in enumerate(self.blocks):
            assert isinstance(block, _Block)
            p = f"layer{k // 2 + 1}.{k % 2}"
            out[f"{p}.conv1"] = (block.conv1, block.bn1)
            out[f"{p}.conv2"] = (block.conv2, block.bn2)
            if block.downsample is not None:
                conv, bn = block.downsample[0], block.downsample[1]
                assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                out[f"{p}.downsample"] = (conv, bn)
        out["output"] = (self.fc, None)
        return out

    def load_replica(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], r: int
    ) -> TorchResNet18:
        """Copy replica ``r`` of a batched ResNet's parameters and statistics; returns it."""
        with torch.no_grad():
            for name, (conv, bn) in self.pairs().items():
                conv.weight.copy_(params[f"{name}.weight"][r].reshape(conv.weight.shape))
                conv.bias.copy_(params[f"{name}.bias"][r])  # type: ignore[union-attr]
                if bn is not None:
                    bn.weight.copy_(params[f"{name}.bn_weight"][r])
                    bn.bias.copy_(params[f"{name}.bn_bias"][r])
                    mean, var = bn.running_mean, bn.running_var
                    assert mean is not None and var is not None  # (track_running_stats)
                    mean.copy_(buffers[f"{name}.running_mean"][r])
                    var.copy_(buffers[f"{name}.running_var"][r])
        return self
