"""Integrate-and-fire neuron of a converted QCFS layer."""

from __future__ import annotations

import torch

from .base import MultiStepNeuron

__all__ = ["IFNeuron"]


class IFNeuron(MultiStepNeuron):
    """IF neuron with threshold θ, v(0) = θ/2, reset by subtraction, firing on v ≥ θ.

    Each spike is worth θ, so the layer's output rate times the step count reproduces the
    QCFS activation it replaces: fed a constant input x for T steps it emits
    ``clip(floor(T·x/θ + 1/2), 0, T)`` spikes, exactly QCFS with ``L = T``.
    """

    def initial_potential(self, like: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.threshold.to(torch.float32)).expand(like.shape).clone()

    def integrate(self, currents: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.threshold.to(torch.float32)
        if not torch.is_grad_enabled():
            return self._integrate_inplace(currents, mem, theta)
        outputs = []
        for current in currents:
            mem = mem + current.float()
            spike = self.spike_grad((mem - theta) / theta)
            reset = spike.detach() if self.detach_reset else spike
            mem = mem - reset * theta
            outputs.append(spike * theta)
        return torch.stack(outputs).to(currents.dtype), mem

    @staticmethod
    def _integrate_inplace(currents, mem, theta):
        # Inference: one membrane buffer and one output buffer, no per-step allocations.
        mem = mem.float().clone()
        out = torch.empty(currents.shape, dtype=torch.float32, device=currents.device)
        for t, current in enumerate(currents):
            mem.add_(current)
            spiked = out[t]
            spiked.copy_(mem >= theta)
            spiked.mul_(theta)
            mem.sub_(spiked)
        return out.to(currents.dtype), mem
