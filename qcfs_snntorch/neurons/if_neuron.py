"""The integrate-and-fire neuron of a converted QCFS layer (binary spikes)."""

from __future__ import annotations

from .base import MultiStepNeuron
from .fused import BinaryRule

__all__ = ["IFNeuron"]


class IFNeuron(MultiStepNeuron):
    """IF neuron with threshold θ, v(0) = shift·θ (θ/2), reset by subtraction, firing on v ≥ θ.

    Each spike is worth θ, so the layer's output rate times the step count reproduces the
    QCFS activation it replaces: fed a constant input x for T steps it emits
    ``clip(floor(T·x/θ + shift), 0, T)`` spikes, exactly QCFS with ``L = T``.
    """

    rule = BinaryRule()
