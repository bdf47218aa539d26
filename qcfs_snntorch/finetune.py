"""Hybrid fine-tuning: train the converted SNN through T steps with surrogate gradients."""

from __future__ import annotations

import torch
from torch import nn

from .spiking import SpikingModel

__all__ = ["TimeAveraged"]


class TimeAveraged(nn.Module):
    """An SNN as a classifier for the training loop: ``forward(x)`` = mean output over T steps.

    With ``bn="frozen"`` BatchNorm layers stay in eval mode (their running statistics,
    computed on the ANN, keep describing the inputs the SNN's rates approximate); with
    ``bn="train"`` they normalise with statistics over the time-folded batch.
    """

    def __init__(self, snn: SpikingModel, timesteps: int, bn: str = "frozen"):
        super().__init__()
        self.snn, self.timesteps, self.bn = snn, timesteps, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.snn(x, timesteps=self.timesteps).mean(0)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.bn == "frozen":
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
