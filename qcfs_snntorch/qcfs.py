"""The QCFS activation: quantization, clip, floor, shift (Bu et al., ICLR 2022).

``a(z) = λ · clip(floor(z·L/λ + φ) / L, 0, 1)`` with a learnable clip λ (``threshold``),
``L`` quantization levels and the shift φ = 1/2 that makes the expected ANN→SNN
conversion error zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MIN_THRESHOLD", "QCFS", "THRESHOLD_GRADIENTS", "lsq_gradient_scale", "qcfs", "set_threshold_gradient"]

# How λ's gradient is scaled: "plain" (the exact straight-through gradient, as the QCFS paper trains) or
# "lsq" (÷ √(elements per sample sharing that λ × L), LSQ's step-size gradient scale, Esser et al. 2020).
THRESHOLD_GRADIENTS = ("plain", "lsq")


class _QCFSFunction(torch.autograd.Function):
    """QCFS with a straight-through floor, written as one autograd node.

    One node instead of the five elementwise ops of the literal formula keeps activation
    memory at one saved tensor (the input) and the backward pass to one fused kernel.
    Gradients (straight-through floor):
      ∂a/∂z = 1 for 0 < z < λ, else 0;
      ∂a/∂λ = q − z/λ for 0 < z < λ, 1 for z ≥ λ, 0 for z ≤ 0, with q = a/λ.
    """

    @staticmethod
    def forward(ctx, z, threshold, levels: int, shift: float, threshold_grad_scale: float):
        ctx.save_for_backward(z, threshold)
        ctx.levels, ctx.shift, ctx.threshold_grad_scale = levels, shift, threshold_grad_scale
        return _levels_of(z, threshold, levels, shift).mul_(threshold / levels)

    @staticmethod
    def backward(ctx, grad_out):
        z, threshold = ctx.saved_tensors
        levels, shift = ctx.levels, ctx.shift
        grad_z = grad_out * ((z > 0) & (z < threshold))
        grad_t = None
        if ctx.needs_input_grad[1]:
            q = _levels_of(z, threshold, levels, shift).div_(levels)
            # Σ g·∂a/∂λ = Σ g·q − Σ_inside g·z/λ: q is 1 above the range and 0 below it, so
            # the three cases of ∂a/∂λ collapse into two reductions and no extra tensor.
            if threshold.numel() == 1:
                grad_t = torch.dot(grad_out.reshape(-1), q.reshape(-1)) - torch.dot(grad_z.reshape(-1), z.reshape(-1)) / threshold
                grad_t = grad_t.reshape(threshold.shape)
            else:
                grad_t = (grad_out * q - grad_z * z / threshold).sum_to_size(threshold.shape)
            if ctx.threshold_grad_scale != 1.0:
                grad_t = grad_t * ctx.threshold_grad_scale
        return (grad_z if ctx.needs_input_grad[0] else None), grad_t, None, None, None


def _levels_of(z: torch.Tensor, threshold: torch.Tensor, levels: int, shift: float) -> torch.Tensor:
    """clip(floor(z·L/λ + φ), 0, L), computed in one new tensor as ⌊(z + φ·s)/s⌋ with the step
    s = λ/L: the arithmetic a graded neuron with spike unit s does in its first step, so that
    the SNN with B = L at T = 1 reproduces this activation bit for bit."""
    step = threshold / levels
    return torch.add(z, step * shift).div_(step).floor_().clamp_(0, levels)


# λ is clamped here in the forward pass: a λ ≤ 0 reached by learning would divide by zero or flip signs.
MIN_THRESHOLD = 1e-4


def qcfs(z: torch.Tensor, threshold: torch.Tensor, levels: int, shift: float = 0.5,
         threshold_grad_scale: float = 1.0) -> torch.Tensor:
    """Functional QCFS; ``threshold`` is λ (a tensor broadcastable to ``z``), used clamped to
    :data:`MIN_THRESHOLD` with a straight-through gradient, so a λ pushed below it (by weight
    decay, say) computes as that minimum and can still be pulled back. λ's gradient is
    multiplied by ``threshold_grad_scale`` (the forward pass and z's gradient do not change)."""
    # Straight-through and exact: λ − λ is 0 (gradient 1); adding a correction (clamp(λ) − λ) to λ would
    # round to 0 for a large negative λ (−1e4: 1e4 + 1e-4 is 1e4 in fp32) and divide by zero.
    threshold = (threshold - threshold.detach()) + threshold.detach().clamp_min(MIN_THRESHOLD)
    if threshold.dtype != z.dtype:
        # Under autocast z may be bf16/fp16 while λ stays fp32: compute in z's dtype.
        threshold = threshold.to(z.dtype)
    return _QCFSFunction.apply(z, threshold, int(levels), float(shift), float(threshold_grad_scale))


def lsq_gradient_scale(z: torch.Tensor, threshold: torch.Tensor, levels: int) -> float:
    """1/√(n·L), n the elements of one sample of ``z`` that share each element of λ (dim 0 is the batch).

    λ's exact gradient sums over every element it clips, so it grows with the layer's size while
    the weights' gradients do not; in a deep network with grouped convolutions that sum once
    carried λ from ~5 to −960 in one SGD step and silenced whole groups (docs/RESULTS.md). LSQ
    (Esser et al., ICLR 2020) divides its step size's gradient by this to keep the two in proportion."""
    per_sample = z.numel() // z.shape[0] if z.dim() > 1 and z.shape[0] else z.numel()
    return 1.0 / math.sqrt(max(per_sample // max(threshold.numel(), 1), 1) * levels)


def set_threshold_gradient(model: nn.Module, rule: str) -> int:
    """Set how every :class:`QCFS` in ``model`` scales λ's gradient (one of :data:`THRESHOLD_GRADIENTS`);
    returns how many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, QCFS)]
    for layer in layers:
        layer.threshold_gradient = rule
    return len(layers)


class QCFS(nn.Module):
    """Quantization-clip-floor-shift activation, the ANN side of an IF neuron.

    Args:
        levels: number of quantization levels L (> 0). An SNN run for T steps computes,
            layer by layer, what this activation computes with ``levels = T``.
        threshold: initial λ (> 0), the clip value and later the neuron's firing threshold.
            Learnable; the paper starts at 8.0 (a start near 1 can drive λ negative, so the
            forward pass clamps it at :data:`MIN_THRESHOLD`).
        shift: φ in [0, 1), 1/2 in the paper (zero expected conversion error); the
            converted neuron starts at v(0) = φ·θ, so any φ converts to the same function.
        inplace: accepted so timm can build the class as an ``act_layer``; ignored,
            because the straight-through backward needs the input.
        threshold_gradient: ``"plain"`` (λ's exact straight-through gradient) or ``"lsq"``
            (scaled by :func:`lsq_gradient_scale`; with λ from the 99th percentile no seed of
            RegNet-X or DLA-X collapsed where the plain gradient left RegNet-X at 39 % on one of
            three, though neither reached the ReLU twin; docs/RESULTS.md). Not part of the state
            dict: it shapes training only.
    """

    def __init__(self, levels: int = 4, threshold: float = 8.0, shift: float = 0.5, inplace: bool = False,
                 threshold_gradient: str = "plain"):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"QCFS threshold λ must be > 0, got {threshold!r}")
        if not 0.0 <= shift < 1.0:
            raise ValueError(f"QCFS shift φ must be in [0, 1), got {shift!r}")
        self.levels = levels
        self.shift = float(shift)
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.threshold_gradient = threshold_gradient

    @property
    def levels(self) -> int:
        return self._levels

    @levels.setter
    def levels(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"QCFS levels must be a positive integer, got {value!r}")
        self._levels = value

    @property
    def threshold_gradient(self) -> str:
        return self._threshold_gradient

    @threshold_gradient.setter
    def threshold_gradient(self, value: str) -> None:
        if value not in THRESHOLD_GRADIENTS:
            raise ValueError(f"QCFS threshold_gradient must be one of {list(THRESHOLD_GRADIENTS)}, got {value!r}")
        self._threshold_gradient = value

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scale = 1.0
        if self._threshold_gradient == "lsq" and self.threshold.requires_grad and torch.is_grad_enabled():
            scale = lsq_gradient_scale(z, self.threshold, self._levels)
        return qcfs(z, self.threshold, self._levels, self.shift, scale)

    def extra_repr(self) -> str:
        rule = "" if self._threshold_gradient == "plain" else f", threshold_gradient={self._threshold_gradient}"
        return f"levels={self._levels}, threshold={self.threshold.item():.4g}, shift={self.shift}{rule}"
