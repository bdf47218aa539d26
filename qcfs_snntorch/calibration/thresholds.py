"""The ANN's λ and BatchNorm statistics from a few batches of data.

A freshly built network has BN running statistics of (0, 1) and every λ at its initial
value (8.0), so its QCFS layers mostly output zero: training starts with most levels
unused. A pretrained ReLU network turned into QCFS needs λ set too. Both are done the
way data-based normalisation is done in the ANN→SNN literature (Rueckauer et al. 2017):
λ is a high percentile of each activation's positive inputs.

While calibrating, every QCFS acts as a plain ReLU (a forward hook replaces its output):
with λ = 8 and L = 4, a QCFS would zero most of a normalised signal and the later layers
would be calibrated on nothing. The percentiles are therefore those of the ReLU network,
which the QCFS network then approximates by clipping at λ and quantizing.

Where the percentiles are measured matters. A fresh network trains with each BatchNorm
normalising by its batch's statistics, so that is what λ is measured on (and the running
statistics are accumulated in the same pass). Measuring it in eval mode instead, right
after re-estimating the running statistics, breaks on channels whose inputs are the
same for every calibration image: timm zero-initialises the last BN of each residual
block, so a chain of strided 1×1 shortcuts (RegNet, ResNet-D) carries only the image
corner into the last stage, which is background on digit-like images; eval-mode BN then
divides float rounding by √eps, ×316 per layer, and λ reached 10⁵. A network whose
statistics are trusted (pretrained, ``update_bn=False``) is measured in eval mode.

A layer whose inputs are (numerically) never positive carries no evidence about its
scale, and a λ of ~0 would block its gradient: it takes the median λ of the layers that
do (printed as "silent" by the run).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..qcfs import QCFS
from ..tracing import batchnorms, forward_hooks, qcfs_layers

__all__ = ["SILENT_FRACTION", "calibrate_from_data", "silent_layers"]

# torch.quantile refuses more than 2**24 elements; a strided subset this large is plenty
# for a 99.9th percentile.
_MAX_SAMPLES = 1 << 24
# A layer whose percentile is below this fraction of the network's median has no evidence.
SILENT_FRACTION = 1e-2


def _inputs(batch) -> torch.Tensor:
    # Accept (images, labels) pairs as a DataLoader yields them.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@contextlib.contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """BN normalises by batch statistics and accumulates a cumulative average of them;
    everything else (dropout, drop-path) stays in eval mode."""
    norms = batchnorms(model)
    momenta = [bn.momentum for bn in norms]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches, not an EMA
        bn.train()
    try:
        yield
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.eval()


def _percentile(chunks: list[torch.Tensor], percentile: float) -> float | None:
    values = torch.cat(chunks) if chunks else torch.empty(0)
    if values.numel() == 0:
        return None
    if values.numel() > _MAX_SAMPLES:
        values = values[:: -(-values.numel() // _MAX_SAMPLES)]
    return torch.quantile(values, percentile / 100).item()


def silent_layers(measured: list[float | None]) -> list[int]:
    """Indices of layers without evidence: never positive, or far below the network's median."""
    evidenced = [v for v in measured if v is not None and v > 0]
    if not evidenced:
        return list(range(len(measured)))
    floor = SILENT_FRACTION * statistics.median(evidenced)
    return [i for i, v in enumerate(measured) if v is None or v <= floor]


@torch.no_grad()
def calibrate_from_data(
    model: nn.Module,
    batches: Iterable,
    *,
    percentile: float = 99.9,
    update_bn: bool = True,
) -> nn.Module:
    """Set BN running statistics and every QCFS λ from data; returns ``model`` in eval mode.

    Args:
        model: a network with :class:`~qcfs_snntorch.QCFS` activations (modified in place).
        batches: input tensors or ``(inputs, labels)`` pairs (a list, a DataLoader, or a
            generator). A few batches are enough.
        percentile: λ of each QCFS becomes this percentile of its positive inputs
            (99.9 discards rare outliers that would waste quantization levels).
        update_bn: recompute BN running statistics (cumulative average over the batches)
            and measure λ with batch statistics, as training will see the network. Leave
            False for a pretrained network whose statistics are right: λ is then measured
            in eval mode.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    activations = qcfs_layers(model)
    positives: dict[QCFS, list[torch.Tensor]] = {act: [] for act in activations}

    def record_as_relu(module, args, output):
        z = args[0].detach()
        values = z.flatten().float()
        positives[module].append(values[values > 0])
        return torch.relu(z)

    mode = _batch_statistics(model) if update_bn else contextlib.nullcontext(model.eval())
    with mode, forward_hooks((act, record_as_relu) for act in activations):
        for batch in batches:
            model(_inputs(batch))
    measured = [_percentile(positives[act], percentile) for act in activations]
    silent = set(silent_layers(measured))
    evidenced = [v for i, v in enumerate(measured) if i not in silent]
    fallback = statistics.median(evidenced) if evidenced else None
    for index, (act, value) in enumerate(zip(activations, measured)):
        chosen = fallback if index in silent else value
        if chosen is not None:  # nothing positive anywhere: keep every λ as it was
            act.threshold.fill_(chosen)
    return model.eval()
