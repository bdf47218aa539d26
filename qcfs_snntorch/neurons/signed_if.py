"""The signed IF neuron: +θ spikes as an IF neuron, and −θ spikes that take back earlier ones.

A binary IF neuron can never take back a spike sent too early: in a deep network whose
inputs arrive unevenly over time, a neuron that fired on an early surge keeps that spike
even when its later input is negative. This one sends a negative spike when its membrane
falls below zero and it has a spike to take back (Fast-SNN's signed IF, Hu et al., TPAMI
2023; SpikeZIP-TF's ST-BIF, ICML 2024), so its net output can follow what the layer's
input says by the end of the window. See :class:`~qcfs_snntorch.neurons.fused.SignedRule`
for the exact rule.
"""

from __future__ import annotations

import torch

from .base import MultiStepNeuron
from .fused import BinaryRule, GradedRule, SignedRule

__all__ = ["SignedIFNeuron"]


class SignedIFNeuron(MultiStepNeuron):
    """IF neuron with signed spikes: binary (``max_spikes=1``) or graded (up to B spikes of θ per step, each sign).

    Up: ``k = [v ≥ θ]`` (binary) or ``clamp(⌊v/θ⌋, 0, B)`` (graded), as
    :class:`~qcfs_snntorch.neurons.IFNeuron` and :class:`~qcfs_snntorch.neurons.GradedIFNeuron`.
    Down: when ``v < 0``, ``k = max(⌊v/θ⌋, −min(c, B))`` where the tracer ``c`` is the net
    number of spikes sent so far, so ``c`` stays in ``[0, B·T]``. Reset by subtraction both
    ways (``v − k·θ``), v(0) = shift·θ. Fed a constant input for T steps it sends no negative
    spike and equals QCFS with L = B·T, like the unsigned neurons; the difference is only in
    how it follows inputs that change over time. The surrogate gradient has a bump at each
    threshold (θ, …, Bθ up; 0, −θ, … down while the tracer allows them); the tracer itself
    carries no gradient.
    """

    def __init__(self, threshold: float | torch.Tensor = 1.0, *, max_spikes: int = 1, **kwargs):
        if isinstance(max_spikes, bool) or not isinstance(max_spikes, int) or max_spikes < 1:
            raise ValueError(f"SignedIFNeuron: max_spikes must be a positive integer, got {max_spikes!r}")
        super().__init__(threshold, **kwargs)
        self.rule = SignedRule(BinaryRule() if max_spikes == 1 else GradedRule(max_spikes))
