"""Surrogate gradients for a firing rule ``spike = [v ≥ θ]``, in units of θ.

snnTorch's surrogates fire on the strict ``v > θ`` and take their width in absolute
voltage, so a layer with θ = 8 and one with θ = 0.5 would see very different gradients.
Here the argument is ``u = (v − θ) / θ`` and every width is relative to θ. (snnTorch
1.0.0's ``triangular`` also returns a constant ±θ rather than a triangle.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["SURROGATES", "get_surrogate"]


def _triangle(u: torch.Tensor, width: float) -> torch.Tensor:
    return (1.0 - u.abs() / width).clamp_min(0.0) / width


def _rectangle(u: torch.Tensor, width: float) -> torch.Tensor:
    return (u.abs() < width / 2).to(u.dtype) / width


def _atan(u: torch.Tensor, width: float) -> torch.Tensor:
    # Derivative of 1/π·atan(π·u/width) + 1/2: integrates to one, like the others.
    return 1.0 / (width * (1.0 + (math.pi * u / width) ** 2))


def _sigmoid(u: torch.Tensor, width: float) -> torch.Tensor:
    s = torch.sigmoid(4.0 * u / width)
    return 4.0 / width * s * (1.0 - s)


SURROGATES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "triangle": _triangle,
    "rectangle": _rectangle,
    "atan": _atan,
    "sigmoid": _sigmoid,
}


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, derivative, width):
        ctx.save_for_backward(u)
        ctx.derivative, ctx.width = derivative, width
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (u,) = ctx.saved_tensors
        return grad_out * ctx.derivative(u, ctx.width), None, None


def get_surrogate(name: str = "triangle", width: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Heaviside ``u ≥ 0`` whose backward pass is the named surrogate of the given width."""
    if name not in SURROGATES:
        raise ValueError(f"unknown surrogate {name!r}; valid: {', '.join(SURROGATES)}")
    if not width > 0:
        raise ValueError(f"surrogate width must be > 0, got {width!r}")
    derivative = SURROGATES[name]

    def spike(u: torch.Tensor) -> torch.Tensor:
        return _Spike.apply(u, derivative, float(width))

    spike.__name__ = f"{name}(width={width})"
    return spike
