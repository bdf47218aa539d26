"""Accuracy of the ANN (at its trained L or at any other), and of the SNN at every T from one pass."""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch import nn

from ..spiking import SpikingModel
from ..tracing import qcfs_layers

__all__ = ["evaluate_ann", "evaluate_ann_at_levels", "evaluate_snn", "quantization_levels"]


def _progress(accelerator: Accelerator, loader, label: str):
    from rich.progress import Progress

    progress = Progress(transient=True, disable=not accelerator.is_main_process)
    return progress, progress.add_task(label, total=len(loader))


@contextlib.contextmanager
def quantization_levels(model: nn.Module, levels: int):
    """Every QCFS of ``model`` at ``levels`` for the duration (the trained L is restored after)."""
    layers = qcfs_layers(model)
    trained = [act.levels for act in layers]
    try:
        for act in layers:
            act.levels = int(levels)
        yield model
    finally:
        for act, value in zip(layers, trained):
            act.levels = value


@torch.no_grad()
def evaluate_ann(model: nn.Module, loader, accelerator: Accelerator) -> float:
    """Top-1 accuracy (fraction) of a classifier over a prepared loader, every sample once."""
    model.eval()
    correct = total = 0
    progress, task = _progress(accelerator, loader, "eval ANN")
    with progress:
        for images, labels in loader:
            with accelerator.autocast():
                logits = model(images)
            preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
            correct += (preds == labels).sum().item()
            total += labels.numel()
            progress.advance(task)
    return correct / max(total, 1)


def evaluate_ann_at_levels(model: nn.Module, loader, levels: list[int], accelerator: Accelerator) -> list[float]:
    """Top-1 of the ANN with every QCFS at L = each value of ``levels``.

    The SNN at T steps approximates the network at L = T (one layer exactly), so this is
    the accuracy each SNN row should be compared with: a network that loses accuracy here
    is sensitive to quantization, not to conversion.
    """
    results = []
    for value in levels:
        with quantization_levels(model, value):
            results.append(evaluate_ann(model, loader, accelerator))
    return results


@torch.no_grad()
def evaluate_snn(snn: SpikingModel, loader, timesteps: list[int], accelerator: Accelerator) -> list[float]:
    """Top-1 accuracy (fractions) after each T in ``timesteps``, one run of max(T) per batch."""
    snn.eval()
    correct = torch.zeros(len(timesteps), dtype=torch.long)
    total = 0
    progress, task = _progress(accelerator, loader, f"eval SNN T≤{max(timesteps)}")
    with progress:
        for images, labels in loader:
            with accelerator.autocast():
                preds = snn.cumulative_predictions(images, timesteps)  # [len(T), B]
            preds, labels = accelerator.gather_for_metrics((preds.t().contiguous(), labels))
            correct += (preds == labels[:, None]).sum(0).cpu()
            total += labels.numel()
            progress.advance(task)
    return (correct.double() / max(total, 1)).tolist()
