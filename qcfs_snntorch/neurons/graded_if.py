"""The graded-spike IF neuron: up to B spikes per step (burst / multi-threshold neurons)."""

from __future__ import annotations

import torch

from .base import MultiStepNeuron
from .fused import GradedRule

__all__ = ["GradedIFNeuron"]


class GradedIFNeuron(MultiStepNeuron):
    """IF neuron that emits ``k = clamp(⌊v/θ⌋, 0, B)`` spikes of value θ per step.

    θ (``threshold``) is the spike unit: a QCFS layer of clip λ becomes θ = λ/B, v(0) =
    shift·θ, reset by subtracting k·θ. Fed a constant input x for T steps it emits
    ``clip(floor(T·x/θ + shift), 0, B·T)`` spikes: one layer at T steps is QCFS with
    L = B·T, and with B = L the network at T = 1 is the QCFS network itself. One step
    sends one event carrying a payload of k (Loihi 2 and SpiNNaker2 carry such payloads).
    The surrogate gradient of the staircase is a sum of B surrogate bumps, at v = jθ.
    """

    def __init__(self, threshold: float | torch.Tensor = 1.0, *, max_spikes: int = 2, **kwargs):
        if isinstance(max_spikes, bool) or not isinstance(max_spikes, int) or max_spikes < 1:
            raise ValueError(f"GradedIFNeuron: max_spikes must be a positive integer, got {max_spikes!r}")
        super().__init__(threshold, **kwargs)
        self.rule = GradedRule(max_spikes)
