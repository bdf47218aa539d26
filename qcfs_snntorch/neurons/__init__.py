"""Spiking neurons, one per file, all on :class:`MultiStepNeuron` (an ``snntorch.Leaky``)."""

from .base import MultiStepNeuron
from .if_neuron import IFNeuron
from .surrogate import SURROGATES, get_surrogate

__all__ = ["MultiStepNeuron", "IFNeuron", "SURROGATES", "get_surrogate"]
