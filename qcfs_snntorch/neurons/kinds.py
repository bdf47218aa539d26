"""The kinds of neuron a QCFS activation can become: the table behind ``convert(neuron=...)`` and ``snn.neuron``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import MultiStepNeuron
from .graded_if import GradedIFNeuron
from .if_neuron import IFNeuron
from .signed_if import SignedIFNeuron

__all__ = ["NEURON_KINDS", "make_neuron"]


def _unsigned(unit: torch.Tensor, max_spikes: int, **common) -> MultiStepNeuron:
    if max_spikes == 1:
        return IFNeuron(unit, **common)
    return GradedIFNeuron(unit, max_spikes=max_spikes, **common)


def _signed(unit: torch.Tensor, max_spikes: int, **common) -> MultiStepNeuron:
    return SignedIFNeuron(unit, max_spikes=max_spikes, **common)


# name → builder(spike unit θ, spikes per step B, **shift/learn_threshold/surrogate…) → neuron.
NEURON_KINDS: dict[str, Callable[..., MultiStepNeuron]] = {
    "if": _unsigned,  # binary IF (B = 1) or graded IF (B > 1): spikes of +θ only
    "signed": _signed,  # also −θ spikes that take back earlier ones (net count in [0, B·T])
}


def make_neuron(kind: str, unit: torch.Tensor, max_spikes: int = 1, **common) -> MultiStepNeuron:
    """A neuron of ``kind`` (a key of :data:`NEURON_KINDS`) with spike value ``unit`` and up to ``max_spikes`` per step."""
    if kind not in NEURON_KINDS:
        raise ValueError(f"unknown neuron kind {kind!r}; valid: {', '.join(NEURON_KINDS)}")
    return NEURON_KINDS[kind](unit, max_spikes, **common)
