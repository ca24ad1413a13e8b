"""Random-weight models with ordinary activation scales, for the benchmarks and the LRP tests.

torchvision's initial batch-norm statistics (mean 0, variance 1) leave random networks with activations that
vanish or explode layer by layer; calibrating them on a few random images gives every layer ordinary
scales. With every bias and shift then set to zero, LRP's rules conserve relevance exactly, which is what
the conservation checks need.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def calibrate_batch_norms(model: nn.Module, side: int, images: int = 4) -> nn.Module:
    """Set every batch norm to the statistics of ``images`` seeded random images; return the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics exactly
    if norms:
        model.train()
        with torch.no_grad():
            model(torch.randn(images, 3, side, side, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def without_biases(model: nn.Module) -> nn.Module:
    """Zero every bias and batch-norm shift, and set ConvNeXt's layer scales to 1: the rules then conserve.

    At torchvision's initial 1e-6, a layer scale makes every ConvNeXt block nearly the identity, so its
    residual branches would carry no relevance.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.bias.zero_()
            elif isinstance(module, nn.Conv2d | nn.Linear | nn.LayerNorm) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, torchvision.models.convnext.CNBlock):
                module.layer_scale.fill_(1.0)
    return model
