"""The multi-step kernels every neuron here runs, generic over its firing rule.

A neuron integrates ``v_t = m_{t-1} + x_t``, emits ``k_t = rule.count(v_t, θ)`` spikes of
value θ and resets by subtraction, ``m_t = v_t − k_t·θ``. The rule is all that differs
between neurons: binary IF (``k = [v ≥ θ]``), graded (``k = clamp(⌊v/θ⌋, 0, B)``) or signed
(:class:`SignedRule`: either of those, plus negative spikes bounded by a *tracer*, the net
count of spikes sent so far: ``c_t = c_{t-1} + k_t``). A rule whose ``signed`` is true gets
the tracer before the step as ``tracer``; the kernels carry it over the steps (no gradient
flows through it: it is a count that only gates which thresholds exist).

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

A signed rule's ``d_t`` has a bump at each lower threshold the tracer allows at step t, so
the fused node also saves the tracer before every step (a second tensor the size of ``v``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BinaryRule", "FusedMultiStep", "GradedRule", "SignedRule", "run_inference"]


class BinaryRule:
    """IF: one spike when ``v ≥ θ`` (the paper's rule; snnTorch itself fires on ``>``)."""

    max_spikes = 1
    signed = False

    def count(self, v: torch.Tensor, theta: torch.Tensor, out: torch.Tensor, tracer=None, scratch=None) -> torch.Tensor:
        return torch.ge(v, theta, out=out)

    def slope(self, v: torch.Tensor, theta: torch.Tensor, derivative: Callable, width: float, tracer=None) -> torch.Tensor:
        return derivative((v - theta).div_(theta), width)

    def reference_count(self, v: torch.Tensor, theta: torch.Tensor, spike: Callable, tracer=None) -> torch.Tensor:
        return spike((v - theta) / theta)


class GradedRule:
    """Graded spikes: ``k = clamp(⌊v/θ⌋, 0, B)`` per step, ``θ`` the value of one spike."""

    signed = False

    def __init__(self, max_spikes: int):
        self.max_spikes = int(max_spikes)

    def count(self, v: torch.Tensor, theta: torch.Tensor, out: torch.Tensor, tracer=None, scratch=None) -> torch.Tensor:
        return torch.div(v, theta, out=out).floor_().clamp_(0, self.max_spikes)

    def slope(self, v: torch.Tensor, theta: torch.Tensor, derivative: Callable, width: float, tracer=None) -> torch.Tensor:
        u = v / theta
        total = derivative(u - 1, width)
        for j in range(2, self.max_spikes + 1):
            total += derivative(u - j, width)
        return total

    def reference_count(self, v: torch.Tensor, theta: torch.Tensor, spike: Callable, tracer=None) -> torch.Tensor:
        u = v / theta
        return sum(spike(u - j) for j in range(1, self.max_spikes + 1))


class SignedRule:
    """Signed spikes: ``positive``'s spikes when ``v ≥ θ``, and negative spikes that take back earlier ones.

    Lower threshold: ``v < 0`` (ST-BIF of SpikeZIP-TF, ICML 2024: fire −1 when ``V < 0`` and the
    tracer is above its minimum; with v(0) = θ/2 this is Fast-SNN's symmetric ±θ/2 around the
    shifted potential). Per step ``k = max(⌊v/θ⌋, −min(c, B))`` for ``v < 0``, so a neuron never
    takes back more spikes than it has sent: its net count stays in [0, B·T] (binary: [0, T]),
    and a membrane below zero is lifted back into ``[0, θ)`` by the subtract reset, as one
    above θ is lowered into it. A neuron fed a constant input never goes below zero with
    spikes to take back, so one layer at T steps is QCFS with L = B·T, exactly as without signs.
    """

    signed = True

    def __init__(self, positive: BinaryRule | GradedRule):
        self.positive = positive
        self.max_spikes = positive.max_spikes

    def count(self, v: torch.Tensor, theta: torch.Tensor, out: torch.Tensor, tracer=None, scratch=None) -> torch.Tensor:
        # ``scratch``: a buffer of one step's size (the kernels pass one, so no step allocates: on a CPU
        # each fresh step-sized tensor costs its page faults, several times the arithmetic).
        below = torch.div(v, theta, out=scratch).floor_().clamp_(max=0)  # ⌊v/θ⌋ where v < 0, else 0
        torch.clamp(tracer, max=self.max_spikes, out=out).neg_()  # −min(c, B): the most that may be taken back
        torch.maximum(below, out, out=below)
        return self.positive.count(v, theta, out).add_(below)

    def slope(self, v: torch.Tensor, theta: torch.Tensor, derivative: Callable, width: float, tracer=None) -> torch.Tensor:
        total = self.positive.slope(v, theta, derivative, width)
        u = v / theta
        for j in range(1, self.max_spikes + 1):  # the j-th negative spike: at u < 1 − j, while c ≥ j
            total.addcmul_(derivative(u + (j - 1) if j > 1 else u, width), tracer >= j)
        return total

    def reference_count(self, v: torch.Tensor, theta: torch.Tensor, spike: Callable, tracer=None) -> torch.Tensor:
        u = v / theta
        taken = sum((spike(u + (j - 1)) - 1) * (tracer >= j) for j in range(1, self.max_spikes + 1))
        return self.positive.reference_count(v, theta, spike) + taken


def _buffers(currents: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A private fp32 copy of the membrane and an fp32 output, both in the input's memory
    layout (channels-last stays channels-last: no reorders in the next convolution)."""
    own = torch.empty_like(currents[0], dtype=torch.float32).copy_(mem)
    return own, torch.empty_like(currents, dtype=torch.float32)


def _own_tracer(tracer: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A private fp32 copy of the tracer and a scratch buffer for the rule, both one step's size (None, None
    for rules without a tracer)."""
    if tracer is None:
        return None, None
    return torch.empty_like(like).copy_(tracer), torch.empty_like(like)


def run_inference(rule, currents: torch.Tensor, mem: torch.Tensor, theta: torch.Tensor, tracer: torch.Tensor | None = None):
    """The dynamics without autograd; returns (outputs ``k·θ`` in the input's dtype, last membrane, last tracer)."""
    mem, out = _buffers(currents, mem)
    tracer, scratch = _own_tracer(tracer, mem)
    for t in range(currents.shape[0]):
        mem.add_(currents[t])
        rule.count(mem, theta, out[t], tracer, scratch)
        mem.addcmul_(out[t], theta, value=-1.0)  # subtract reset: v − k·θ
        if tracer is not None:
            tracer.add_(out[t])
    return out.mul_(theta).to(currents.dtype), mem, tracer


class FusedMultiStep(torch.autograd.Function):
    """The dynamics over T steps as one autograd node; backward is BPTT written out by hand."""

    @staticmethod
    def forward(ctx, currents, mem, theta, rule, derivative, width, detach_reset, tracer=None):
        mem, out = _buffers(currents, mem)
        v = torch.empty_like(out)
        tracer, scratch = _own_tracer(tracer, mem)
        tracers = torch.empty_like(out) if tracer is not None else None  # the tracer before each step
        for t in range(currents.shape[0]):
            torch.add(mem, currents[t], out=v[t])
            if tracer is not None:
                tracers[t].copy_(tracer)
            rule.count(v[t], theta, out[t], tracer, scratch)
            torch.addcmul(v[t], out[t], theta, value=-1.0, out=mem)
            if tracer is not None:
                tracer.add_(out[t])
        ctx.save_for_backward(v, theta, tracers)
        ctx.rule, ctx.derivative, ctx.width, ctx.detach_reset, ctx.dtype = rule, derivative, width, detach_reset, currents.dtype
        if tracer is not None:
            ctx.mark_non_differentiable(tracer)
        return out.mul_(theta).to(currents.dtype), mem, tracer

    @staticmethod
    def backward(ctx, grad_out, grad_mem, grad_tracer=None):
        v, theta, tracers = ctx.saved_tensors
        want_theta = ctx.needs_input_grad[2]
        grad_v = torch.empty_like(v)
        grad_theta = torch.zeros_like(theta) if want_theta else None
        g = grad_mem.float()  # ∂L/∂m_t, walking back from the last step
        scratch = torch.empty_like(v[0]) if tracers is not None else None
        # One step at a time: temporaries the size of one step (reused by the allocator)
        # rather than of all T steps (fresh pages to fault in at every call on CPU).
        for t in reversed(range(v.shape[0])):
            o = grad_out[t].float()
            tracer = None if tracers is None else tracers[t]
            d = ctx.rule.slope(v[t], theta, ctx.derivative, ctx.width, tracer)
            via_surrogate = o if ctx.detach_reset else o - g
            torch.addcmul(g, via_surrogate, d, out=grad_v[t])
            if want_theta:
                counts = ctx.rule.count(v[t], theta, torch.empty_like(o), tracer, scratch)
                part = counts.mul_(o - g).sub_(via_surrogate * d * v[t] / theta)
                grad_theta += part.sum_to_size(theta.shape)
            g = grad_v[t]
        grad_x = grad_v.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_v[0] if ctx.needs_input_grad[1] else None, grad_theta, None, None, None, None, None
