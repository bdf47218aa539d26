"""calibrate_from_data: BatchNorm statistics and QCFS thresholds λ from a few batches.

A freshly built network has BN running statistics of (0, 1) and every λ at its initial
value (8.0), so its QCFS layers mostly output zero: a meaningless regime for testing
conversion. A pretrained ReLU network turned into QCFS needs λ set too. Both are fixed
here the way data-based normalisation is done in the ANN→SNN literature (Rueckauer et
al. 2017): λ is a high percentile of each activation's positive inputs.

While calibrating, every QCFS acts as a plain ReLU (a forward hook replaces its output):
with λ = 8 and L = 4, a QCFS would zero most of a normalised signal and the later
layers would be calibrated on nothing. The percentiles are therefore those of the ReLU
network, which the QCFS network then approximates by clipping at λ and quantizing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .qcfs import QCFS

__all__ = ["calibrate_from_data"]

# torch.quantile refuses more than 2**24 elements; a strided subset this large is plenty
# for a 99.9th percentile.
_MAX_SAMPLES = 1 << 24


def _inputs(batch) -> torch.Tensor:
    # Accept (images, labels) pairs as a DataLoader yields them.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _as_relu(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return torch.relu(args[0])


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
            generator, which is materialised because the batches are read twice).
        percentile: λ of each QCFS becomes this percentile of its positive inputs
            (99.9 discards rare outliers that would waste quantization levels). All
            positive inputs are kept until the end: a few batches are enough.
        update_bn: recompute BN running statistics first (train mode, cumulative average
            over the batches). Leave False for a pretrained network whose statistics are right.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    if iter(batches) is batches:  # a one-pass iterator (generator): keep it for both passes
        batches = list(batches)
    activations = [m for m in model.modules() if isinstance(m, QCFS)]
    relu_hooks = [act.register_forward_hook(_as_relu) for act in activations]
    try:
        if update_bn:
            _update_bn(model, batches)
        model.eval()
        positives: dict[QCFS, list[torch.Tensor]] = {act: [] for act in activations}

        def record(module, args, output):
            values = args[0].detach().flatten().float()
            positives[module].append(values[values > 0])

        record_hooks = [act.register_forward_hook(record, prepend=True) for act in activations]
        try:
            for batch in batches:
                model(_inputs(batch))
        finally:
            for hook in record_hooks:
                hook.remove()
    finally:
        for hook in relu_hooks:
            hook.remove()
    for act, chunks in positives.items():
        values = torch.cat(chunks) if chunks else torch.empty(0)
        if values.numel() == 0:
            continue  # a dead layer: no evidence, keep its λ
        if values.numel() > _MAX_SAMPLES:
            values = values[:: -(-values.numel() // _MAX_SAMPLES)]
        act.threshold.fill_(torch.quantile(values, percentile / 100).item())
    return model.eval()


def _update_bn(model: nn.Module, batches) -> None:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    model.eval()  # dropout and drop-path off: only BN should see "training"
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches, not an EMA
        bn.train()
    try:
        for batch in batches:
            model(_inputs(batch))
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
