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


class SmallResNet(nn.Module):
    """conv-BN-QCFS stem, one residual block (identity or 1×1-conv shortcut), avgpool, linear."""

    def __init__(self, conv_shortcut: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), QCFS(threshold=1.7))
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), QCFS(threshold=0.8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)) if conv_shortcut else nn.Identity()
        self.act2 = QCFS(threshold=1.3)
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        x = self.act2(y + self.shortcut(x))
        return self.fc(self.flatten(self.pool(x)))


def fused_and_stepwise_gradients(make_neuron, x: torch.Tensor, chunks: list[int]) -> dict[bool, tuple]:
    """Run a neuron over ``x`` ``[T, B, ...]`` in time chunks (the membrane and its gradient cross calls), once
    with the fused kernel and once step by step; per mode: (output, ∂loss/∂x, ∂loss/∂θ)."""
    grads = {}
    for fused in (False, True):
        n = make_neuron()
        n.fused = fused
        outs = []
        for chunk in x.split(chunks):
            n.timesteps = chunk.shape[0]
            outs.append(n(chunk.flatten(0, 1)))
        out = torch.cat(outs)
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum() + n.mem.square().sum()
        grads[fused] = (out.detach(), *torch.autograd.grad(loss, [x, n.threshold]))
    return grads
