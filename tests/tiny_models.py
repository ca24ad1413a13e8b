"""Small models with layer names unlike torchvision's, shared by the export tests."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv, batch norm, in-place ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """``stem`` then ``blocks.0..2``: 16 channels at 1/4 resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_block(3, 8, 2)
        self.blocks = nn.Sequential(conv_block(8, 16, 2), conv_block(16, 16), conv_block(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))
