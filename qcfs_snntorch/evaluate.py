"""Accuracy of the ANN, and of the SNN at every T from one pass of max(T) steps."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from .spiking import SpikingModel

__all__ = ["evaluate_ann", "evaluate_snn"]


def _progress(accelerator: Accelerator, loader, label: str):
    from rich.progress import Progress

    progress = Progress(transient=True, disable=not accelerator.is_main_process)
    return progress, progress.add_task(label, total=len(loader))


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
