"""Helpers shared by several test files (pytest puts this folder on sys.path)."""

import torch
from torch import nn

from qcfs_snntorch import QCFS


def randomise(model: nn.Module, seed: int = 0, thresholds: tuple[float, float] | None = None) -> nn.Module:
    """BN statistics (and optionally λ) away from the untrained defaults, which produce exact ties."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.1, 0.2, generator=gen)
        if thresholds is not None and isinstance(m, QCFS):
            m.threshold.data = torch.empty(()).uniform_(*thresholds, generator=gen)
    return model.eval()
