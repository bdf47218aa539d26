"""Spiking neurons, one per file, all on :class:`MultiStepNeuron` (an ``snntorch.Leaky``)."""

from .base import MIN_THRESHOLD, MultiStepNeuron
from .graded_if import GradedIFNeuron
from .if_neuron import IFNeuron
from .surrogate import SURROGATES, get_surrogate

__all__ = ["MIN_THRESHOLD", "GradedIFNeuron", "IFNeuron", "MultiStepNeuron", "SURROGATES", "get_surrogate"]
