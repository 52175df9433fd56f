"""A small custom classifier of the kind a user brings: a stem, residual blocks with a depthwise
convolution and squeeze-excitation, global pooling and a linear head."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(scale))))


class Block(nn.Module):
    """Pointwise expand -> depthwise 3x3 -> SE -> pointwise project, plus the skip connection."""

    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        wide = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False), nn.BatchNorm2d(wide), nn.ReLU()
        )
        self.se = SqueezeExcite(wide)
        self.project = nn.Sequential(nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.project(self.se(self.depthwise(self.expand(x)))))


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 32, blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def build(in_channels: int = 1, width: int = 32, blocks: int = 2, num_classes: int = 10) -> TinyNet:
    """The factory shrinkflow calls (``model.factory: models.tinynet:build``)."""
    return TinyNet(in_channels, width, blocks, num_classes)
