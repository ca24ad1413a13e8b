"""ShapesCNN: the small all-convolutional classifier of the demo.

Four named stages halve the resolution each time, so a 128x128 input gives a 128-channel 8x8 map at
``block3``, the layer whose activations LaFAM explains. The forward pass has no data-dependent control
flow, so the model traces with ``torch.jit.trace`` and exports to ONNX as is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 6
"""How many shape classes there are, ``len(scenes.synthetic.CLASSES)`` (a test checks it): an archive ships only
this package as the eager model's code, so nothing here imports ``scenes``."""

INPUT_SIZE: tuple[int, int] = (128, 128)
"""``(H, W)`` the model is trained and served at."""

MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel RGB mean of the input normalisation, on [0, 1] pixel values."""

STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel RGB standard deviation of the input normalisation."""

STAGES: tuple[str, ...] = ("stem", "block1", "block2", "block3")
"""Names of the convolutional stages, in forward order."""

LAST_CONV_STAGE = "block3"
"""The stage whose output is the last convolutional map (128 x 8 x 8 at 128x128 input)."""

STAGE_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
"""Output channels of each stage of :data:`STAGES`."""


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class ShapesCNN(nn.Module):
    """A small all-convolutional classifier: four stride-2 stages, global average pooling, a linear head.

    Attributes:
        stem: 3 -> 16 channels, 1/2 resolution (one conv).
        block1: 16 -> 32 channels, 1/4 resolution (two convs).
        block2: 32 -> 64 channels, 1/8 resolution (two convs).
        block3: 64 -> 128 channels, 1/16 resolution (three convs); 8x8 at 128x128 input.
        pool: global average pooling.
        head: linear classifier on the pooled 128-vector.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        """Build the network.

        Args:
            num_classes: number of output logits.

        Raises:
            ValueError: if ``num_classes`` is smaller than 1.
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        c0, c1, c2, c3 = STAGE_CHANNELS
        self.stem = nn.Sequential(*_conv_bn_relu(3, c0, stride=2))
        self.block1 = nn.Sequential(*_conv_bn_relu(c0, c1, stride=2), *_conv_bn_relu(c1, c1, stride=1))
        self.block2 = nn.Sequential(*_conv_bn_relu(c1, c2, stride=2), *_conv_bn_relu(c2, c2, stride=1))
        self.block3 = nn.Sequential(
            *_conv_bn_relu(c2, c3, stride=2), *_conv_bn_relu(c3, c3, stride=1), *_conv_bn_relu(c3, c3, stride=1)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c3, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last convolutional map (the output of ``block3``).

        Args:
            x: normalised images, ``(N, 3, H, W)``.

        Returns:
            ``(N, 128, H/16, W/16)`` activations.
        """
        return self.block3(self.block2(self.block1(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class logits.

        Args:
            x: normalised images, ``(N, 3, H, W)``.

        Returns:
            ``(N, num_classes)`` logits.
        """
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def preprocess(images: np.ndarray) -> torch.Tensor:
    """Turn uint8 RGB images into the normalised float32 batch the model expects.

    Args:
        images: ``(N, H, W, 3)`` or ``(H, W, 3)`` uint8 array.

    Returns:
        ``(N, 3, H, W)`` float32 tensor, ``(pixel / 255 - MEAN) / STD``.

    Raises:
        ValueError: if ``images`` is not uint8 with 3 trailing channels.
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3) or (H, W, 3), got {images.dtype} {images.shape}")
    # A copy, not from_numpy: scenes' arrays are read-only and the batch must not alias the caller's data.
    batch = torch.tensor(images if images.ndim == 4 else images[None])
    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def shapes_cnn(num_classes: int = NUM_CLASSES) -> ShapesCNN:
    """Build an untrained :class:`ShapesCNN`.

    Args:
        num_classes: number of output logits (6 for the demo's shape classes).

    Returns:
        The model, in training mode, with freshly initialised weights.
    """
    return ShapesCNN(num_classes=num_classes)
