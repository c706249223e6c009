"""Tiny models shared by tests: fast to export and small enough to count by hand."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv+BN+ReLU, a strided depthwise conv, global pool, linear: 1x3x8x8 -> 5 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
