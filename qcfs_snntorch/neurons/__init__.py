"""Spiking neurons, one per file, all on :class:`MultiStepNeuron` (an ``snntorch.Leaky``)."""

from .base import MIN_THRESHOLD, MultiStepNeuron
from .graded_if import GradedIFNeuron
from .if_neuron import IFNeuron
from .kinds import NEURON_KINDS, make_neuron
from .signed_if import SignedIFNeuron
from .surrogate import SURROGATES, get_surrogate

__all__ = ["MIN_THRESHOLD", "NEURON_KINDS", "GradedIFNeuron", "IFNeuron", "MultiStepNeuron", "SURROGATES", "SignedIFNeuron",
           "get_surrogate", "make_neuron"]
