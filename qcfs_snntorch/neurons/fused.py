"""The multi-step kernels every neuron here runs, generic over its firing rule.

A neuron integrates ``v_t = m_{t-1} + x_t``, emits ``k_t = rule.count(v_t, θ)`` spikes of
value θ and resets by subtraction, ``m_t = v_t − k_t·θ``. The rule is all that differs
between neurons: binary IF (``k = [v ≥ θ]``) or graded (``k = clamp(⌊v/θ⌋, 0, B)``).

Three implementations of the same dynamics over ``T`` steps (all exactly equal forward):

- :func:`run_inference` (no gradient needed): one membrane buffer, spike counts written
  straight into the preallocated output, no allocation per step;
- :class:`FusedMultiStep`: one autograd node for the whole loop over T that saves only the
  pre-spike membrane ``v`` (one fp32 tensor the size of the output) and runs
  backpropagation through time itself;
- the plain per-step autograd graph through ``rule.reference_count`` (the neuron's
  ``fused = False``), kept as the reference the fused node is tested against.

Gradients (surrogate ``σ'``, widths in units of θ): ``d_t = rule.slope(v_t, θ)`` is
``∂k/∂(v/θ)`` with each step of the staircase replaced by a surrogate bump. With
``g_t = ∂L/∂m_t`` and ``o_t = ∂L/∂out_t`` (out = k·θ):

- ``∂L/∂v_t = g_t + (o_t − [not detached]·g_t)·d_t`` and ``g_{t-1} = ∂L/∂v_t``;
- ``∂L/∂θ = Σ_t k_t·(o_t − g_t) − (o_t − [not detached]·g_t)·d_t·v_t/θ``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BinaryRule", "FusedMultiStep", "GradedRule", "run_inference"]


class BinaryRule:
    """IF: one spike when ``v ≥ θ`` (the paper's rule; snnTorch itself fires on ``>``)."""

    max_spikes = 1

    def count(self, v: torch.Tensor, theta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.ge(v, theta, out=out)

    def slope(self, v: torch.Tensor, theta: torch.Tensor, derivative: Callable, width: float) -> torch.Tensor:
        return derivative((v - theta).div_(theta), width)

    def reference_count(self, v: torch.Tensor, theta: torch.Tensor, spike: Callable) -> torch.Tensor:
        return spike((v - theta) / theta)


class GradedRule:
    """Graded spikes: ``k = clamp(⌊v/θ⌋, 0, B)`` per step, ``θ`` the value of one spike."""

    def __init__(self, max_spikes: int):
        self.max_spikes = int(max_spikes)

    def count(self, v: torch.Tensor, theta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.div(v, theta, out=out).floor_().clamp_(0, self.max_spikes)

    def slope(self, v: torch.Tensor, theta: torch.Tensor, derivative: Callable, width: float) -> torch.Tensor:
        u = v / theta
        total = derivative(u - 1, width)
        for j in range(2, self.max_spikes + 1):
            total += derivative(u - j, width)
        return total

    def reference_count(self, v: torch.Tensor, theta: torch.Tensor, spike: Callable) -> torch.Tensor:
        u = v / theta
        return sum(spike(u - j) for j in range(1, self.max_spikes + 1))


def _buffers(currents: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A private fp32 copy of the membrane and an fp32 output, both in the input's memory
    layout (channels-last stays channels-last: no reorders in the next convolution)."""
    own = torch.empty_like(currents[0], dtype=torch.float32).copy_(mem)
    return own, torch.empty_like(currents, dtype=torch.float32)


def run_inference(rule, currents: torch.Tensor, mem: torch.Tensor, theta: torch.Tensor):
    """The dynamics without autograd; returns (outputs ``k·θ`` in the input's dtype, last membrane)."""
    mem, out = _buffers(currents, mem)
    for t in range(currents.shape[0]):
        mem.add_(currents[t])
        rule.count(mem, theta, out[t])
        mem.addcmul_(out[t], theta, value=-1.0)  # subtract reset: v − k·θ
    return out.mul_(theta).to(currents.dtype), mem


class FusedMultiStep(torch.autograd.Function):
    """The dynamics over T steps as one autograd node; backward is BPTT written out by hand."""

    @staticmethod
    def forward(ctx, currents, mem, theta, rule, derivative, width, detach_reset):
        mem, out = _buffers(currents, mem)
        v = torch.empty_like(out)
        for t in range(currents.shape[0]):
            torch.add(mem, currents[t], out=v[t])
            rule.count(v[t], theta, out[t])
            torch.addcmul(v[t], out[t], theta, value=-1.0, out=mem)
        ctx.save_for_backward(v, theta)
        ctx.rule, ctx.derivative, ctx.width, ctx.detach_reset, ctx.dtype = rule, derivative, width, detach_reset, currents.dtype
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
            d = ctx.rule.slope(v[t], theta, ctx.derivative, ctx.width)
            via_surrogate = o if ctx.detach_reset else o - g
            torch.addcmul(g, via_surrogate, d, out=grad_v[t])
            if want_theta:
                counts = ctx.rule.count(v[t], theta, torch.empty_like(o))
                part = counts.mul_(o - g).sub_(via_surrogate * d * v[t] / theta)
                grad_theta += part.sum_to_size(theta.shape)
            g = grad_v[t]
        grad_x = grad_v.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_v[0] if ctx.needs_input_grad[1] else None, grad_theta, None, None, None, None
