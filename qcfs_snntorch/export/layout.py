"""Arrays for the NIR export: scales of signals, conv weights in the forms nir 1.0.8 types, dense matrices.

Scales. Every signal of the exported graph carries a scale, its real value = scale × its NIR
value: a scalar, per channel (``[C, 1, 1]``, e.g. the spikes of an IF with per-channel θ)
or per element. A layer folds the scale of its input into its weights, column by column,
where its weights have one column per factor: a conv needs a factor per input channel,
an affine or a dense layer takes one per input element.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import numpy as np
import torch

from .errors import ExportError

__all__ = ["as_scale", "is_one", "linear_matrix", "per_channel", "square_taps", "ungrouped", "window_sizes"]


def as_scale(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def is_one(scale: np.ndarray) -> bool:
    return bool(np.all(scale == 1))


def per_channel(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """One factor per entry of dim 0 of ``shape`` if ``scale`` does not vary over the other dims, else None.

    A conv's weight has one column per input channel, so only such a scale folds into it;
    for a 1-d signal (features) every factor is its own channel.
    """
    rows = np.broadcast_to(scale, shape).reshape(shape[0], -1)
    return rows[:, 0].copy() if np.all(rows == rows[:, :1]) else None


def window_sizes(n: int, outputs: int, kernel: int, stride: int, padding: int, include_pad: bool) -> np.ndarray:
    """What torch's avg_pool divides each window along one dimension by (floor or ceil mode).

    A window starts at ``i·stride − padding``; it is cut at the end of the right padding
    (ceil_mode's overhang never counts). Without ``count_include_pad`` only input elements count.
    """
    start = np.arange(outputs) * stride - padding
    end = np.minimum(start + kernel, n + padding)
    return end - start if include_pad else np.minimum(end, n) - np.maximum(start, 0)


def ungrouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's weight ``[C_out, C_in / groups, …]`` as the block-diagonal ``[C_out, C_in, …]``.

    nir 1.0.8 takes a conv's input channels from ``weight.shape[1]`` whatever ``groups``
    is, so a grouped (e.g. depthwise) conv fails the type check of ``nir.read``; the dense
    form computes the same and reads back (its zeros compress away in the HDF5 file).
    """
    if groups == 1:
        return weight
    out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
    dense = np.zeros((weight.shape[0], in_per_group * groups, *weight.shape[2:]), weight.dtype)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group:(g + 1) * in_per_group] = weight[rows]
    return dense


def square_taps(weight: np.ndarray, padding, stride, in_hw, out_hw, path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """A conv weight ``[…, kh, kw]`` placed in a square ``K×K`` kernel of zeros, with a padding
    that keeps its windows (left padding, then the taps) and gives ``out_hw`` outputs.

    nir 1.0.8 sizes a Conv2d's output by ``weight.shape[2]`` in both dimensions, so a
    non-square kernel would type wrong and fail ``nir.read``. Taps at offset ``a`` under a
    padding ``p + a`` see what they saw under ``p``; ``a`` is chosen per dimension so that
    ``(n + 2(p + a) − K) // s + 1`` outputs come out: the zeros padded at the end stand in
    for torch's asymmetric extra (ceil_mode) and are never weighted.
    """
    kh, kw = weight.shape[-2:]
    for size in range(max(kh, kw), max(kh, kw) + 2 * max(stride) + 2):
        offsets = [
            next((a for a in range(size - k + 1) if (n + 2 * (p + a) - size) // s + 1 == o), None)
            for n, o, k, s, p in zip(in_hw, out_hw, (kh, kw), stride, padding)
        ]
        if None not in offsets:
            (a, b) = offsets
            square = np.zeros((*weight.shape[:-2], size, size), weight.dtype)
            square[..., a:a + kh, b:b + kw] = weight
            return square, (padding[0] + a, padding[1] + b)
    raise ExportError(f"export_nir: {path!r} maps {tuple(in_hw)} to {tuple(out_hw)}, which no symmetrically padded NIR Conv2d reproduces")


def linear_matrix(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: tuple[int, ...]) -> np.ndarray:
    """The ``[n_out, n_in]`` matrix of a bias-free linear map of one sample, read off its outputs on the unit basis.

    Element order is torch's C order on both sides (what ``flatten`` gives), so the matrix
    acts on flattened samples. Each column is the map of one unit vector: exactly the
    weights torch multiplies by, whatever the layer (conv, pooling with any divisor).
    """
    n_in = prod(in_shape)
    columns = []
    with torch.no_grad():
        for start in range(0, n_in, 256):  # a few unit vectors at a time: memory of the size of the matrix, not n_in²
            basis = torch.zeros(min(256, n_in - start), n_in)
            basis[:, start:start + len(basis)] = torch.eye(len(basis))
            columns.append(fn(basis.reshape(len(basis), *in_shape)).reshape(len(basis), -1))
    return torch.cat(columns).T.contiguous().numpy()
