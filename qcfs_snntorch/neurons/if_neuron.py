"""Integrate-and-fire neuron of a converted QCFS layer, with fused multi-step kernels.

Three implementations of the same dynamics over ``T`` steps (all exactly equal forward):

- inference (no gradient needed): one membrane buffer, spikes written straight into the
  preallocated output, no allocation per step;
- training: :class:`_IFMultiStep`, one autograd node for the whole loop over T that saves
  only the pre-spike membrane ``v`` (one fp32 tensor the size of the output, as much as a
  QCFS activation saves in the ANN at batch T·B) and runs backward through time itself;
- ``fused = False``: the plain per-step autograd graph, kept as the reference.
"""

from __future__ import annotations

import torch

from .base import MultiStepNeuron
from .surrogate import SURROGATES

__all__ = ["IFNeuron"]


def _buffers(currents: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A private fp32 copy of the membrane and an fp32 output, both in the input's memory
    layout (channels-last stays channels-last: no reorders in the next convolution)."""
    own = torch.empty_like(currents[0], dtype=torch.float32).copy_(mem)
    return own, torch.empty_like(currents, dtype=torch.float32)


def _if_inference(currents: torch.Tensor, mem: torch.Tensor, theta: torch.Tensor):
    mem, out = _buffers(currents, mem)
    for t in range(currents.shape[0]):
        mem.add_(currents[t])
        torch.ge(mem, theta, out=out[t])  # spikes as 0/1, written in place
        mem.addcmul_(out[t], theta, value=-1.0)  # subtract reset: v − s·θ
    return out.mul_(theta).to(currents.dtype), mem  # each spike is worth θ


class _IFMultiStep(torch.autograd.Function):
    """IF over T steps as one autograd node; backward is BPTT written out by hand.

    Per step: ``v_t = m_{t-1} + x_t``, ``s_t = [v_t ≥ θ]`` (surrogate ``d_t = σ'(u_t)``,
    ``u_t = (v_t − θ)/θ``), ``m_t = v_t − r_t·θ`` with ``r_t = s_t`` (detached or not), output
    ``s_t·θ``. With ``g_t = ∂L/∂m_t`` and ``o_t = ∂L/∂out_t``:

    - ``∂L/∂v_t = g_t + (o_t − [not detached]·g_t)·d_t`` and ``g_{t-1} = ∂L/∂v_t``;
    - ``∂L/∂θ = Σ_t s_t·(o_t − g_t) − (o_t − [not detached]·g_t)·d_t·v_t/θ``.
    """

    @staticmethod
    def forward(ctx, currents, mem, theta, derivative, width, detach_reset):
        mem, out = _buffers(currents, mem)
        v = torch.empty_like(out)
        for t in range(currents.shape[0]):
            torch.add(mem, currents[t], out=v[t])
            torch.ge(v[t], theta, out=out[t])
            torch.addcmul(v[t], out[t], theta, value=-1.0, out=mem)
        ctx.save_for_backward(v, theta)
        ctx.derivative, ctx.width, ctx.detach_reset, ctx.dtype = derivative, width, detach_reset, currents.dtype
        return out.mul_(theta).to(currents.dtype), mem

    @staticmethod
    def backward(ctx, grad_out, grad_mem):
        v, theta = ctx.saved_tensors
        want_theta = ctx.needs_input_grad[2]
        grad_v = torch.empty_like(v)
        grad_theta = torch.zeros_like(theta) if want_theta else None
        g = grad_mem.float()  # ∂L/∂m_t, walking back from the last step
        # One step at a time: temporaries the size of one step (reused by the allocator)
        # rather than of all T steps (fresh pages to fault in at every call on CPU).
        for t in reversed(range(v.shape[0])):
            o = grad_out[t].float()
            d = ctx.derivative((v[t] - theta).div_(theta), ctx.width)
            via_surrogate = o if ctx.detach_reset else o - g
            torch.addcmul(g, via_surrogate, d, out=grad_v[t])
            if want_theta:
                spiked = (v[t] >= theta).to(o.dtype)
                part = spiked.mul_(o - g).sub_(via_surrogate * d * v[t] / theta)
                grad_theta += part.sum_to_size(theta.shape)
            g = grad_v[t]
        grad_x = grad_v.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_v[0] if ctx.needs_input_grad[1] else None, grad_theta, None, None, None


class IFNeuron(MultiStepNeuron):
    """IF neuron with threshold θ, v(0) = θ/2, reset by subtraction, firing on v ≥ θ.

    Each spike is worth θ, so the layer's output rate times the step count reproduces the
    QCFS activation it replaces: fed a constant input x for T steps it emits
    ``clip(floor(T·x/θ + 1/2), 0, T)`` spikes, exactly QCFS with ``L = T``.

    The surrogate gradient of the fused training path is looked up in
    :data:`~qcfs_snntorch.neurons.SURROGATES` by ``surrogate`` / ``surrogate_width``.
    """

    fused = True  # False: the per-step autograd graph (reference; slower, more memory)

    def initial_potential(self, like: torch.Tensor) -> torch.Tensor:
        v0 = 0.5 * self.threshold.to(torch.float32) + self.initial_offset
        return v0.expand(like.shape)  # integrate copies it

    def integrate(self, currents: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.threshold.to(torch.float32)
        if not (torch.is_grad_enabled() and (currents.requires_grad or mem.requires_grad or theta.requires_grad)):
            return _if_inference(currents, mem, theta)
        if self.fused:
            derivative = SURROGATES[self.surrogate]
            return _IFMultiStep.apply(currents, mem, theta, derivative, self.surrogate_width, self.detach_reset)
        return self._integrate_autograd(currents, mem, theta)

    def _integrate_autograd(self, currents, mem, theta):
        outputs = []
        for current in currents:
            mem = mem + current.float()
            spike = self.spike_grad((mem - theta) / theta)
            reset = spike.detach() if self.detach_reset else spike
            mem = mem - reset * theta
            outputs.append(spike * theta)
        return torch.stack(outputs).to(currents.dtype), mem
