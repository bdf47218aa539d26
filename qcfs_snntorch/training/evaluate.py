"""Accuracy of the ANN (at its trained L or at any other), and of the SNN at every T from one pass."""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch import nn

from ..early_exit import exit_steps, summarise_exits
from ..progress import Progress
from ..spiking import SpikingModel
from ..tracing import qcfs_layers

__all__ = ["evaluate_ann", "evaluate_ann_at_levels", "evaluate_snn", "evaluate_snn_exits", "quantization_levels"]


def _progress(accelerator: Accelerator, loader, label: str) -> Progress:
    return Progress(label, len(loader), enabled=accelerator.is_main_process, unit="batches")


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
def evaluate_ann(model: nn.Module, loader, accelerator: Accelerator, label: str = "eval ANN") -> float:
    """Top-1 accuracy (fraction) of a classifier over a prepared loader, every sample once."""
    model.eval()
    correct = total = 0
    with _progress(accelerator, loader, label) as progress:
        for images, labels in loader:
            with accelerator.autocast():
                logits = model(images)
            preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
            correct += (preds == labels).sum().item()
            total += labels.numel()
            progress.advance()
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
            results.append(evaluate_ann(model, loader, accelerator, label=f"eval ANN at L={value}"))
    return results


@torch.no_grad()
def evaluate_snn_exits(
    snn: SpikingModel,
    loader,
    timesteps: list[int],
    accelerator: Accelerator,
    *,
    exit_thresholds: list[float] = (),
    exit_rule: str = "confidence",
) -> dict:
    """Top-1 after each T in ``timesteps`` and, for each early-exit threshold τ, the accuracy and
    the mean / 95th-percentile steps of samples stopped by ``exit_rule`` (at most max(T) steps).

    All from one run of max(T) steps per batch: an early-exit prediction at step t is the
    argmax of the mean over the first t steps, which the full run already holds.
    """
    snn.eval()
    total = max(timesteps)
    rows = [int(t) - 1 for t in timesteps]
    correct = torch.zeros(len(timesteps), dtype=torch.long)
    seen = 0
    exit_steps_all, exit_correct_all = [], []
    with _progress(accelerator, loader, f"eval SNN T≤{total}") as progress:
        for images, labels in loader:
            with accelerator.autocast():
                means = snn.running_means(images, total)  # [T, b, C]
            fixed = means[rows].argmax(-1).t().contiguous()  # [b, len(T)]
            exits = [exit_steps(means, tau, exit_rule) for tau in exit_thresholds]
            steps = torch.stack([s for s, _ in exits], 1) if exits else torch.zeros(len(labels), 0, dtype=torch.long)
            preds = torch.stack([p for _, p in exits], 1) if exits else torch.zeros(len(labels), 0, dtype=torch.long)
            fixed, steps, preds, labels = accelerator.gather_for_metrics((fixed, steps.to(fixed.device), preds.to(fixed.device), labels))
            correct += (fixed == labels[:, None]).sum(0).cpu()
            seen += labels.numel()
            exit_steps_all.append(steps.cpu())
            exit_correct_all.append((preds == labels[:, None]).cpu())
            progress.advance()
    result = {"timesteps": list(timesteps), "top1": (correct.double() / max(seen, 1)).tolist()}
    if exit_thresholds:
        steps, hits = torch.cat(exit_steps_all), torch.cat(exit_correct_all)
        per_tau = [summarise_exits(steps[:, i], hits[:, i]) for i in range(len(exit_thresholds))]
        result["early_exit"] = {"rule": exit_rule, "max_timesteps": total, "thresholds": list(exit_thresholds),
                                **{key: [row[key] for row in per_tau] for key in per_tau[0]}}
    return result


def evaluate_snn(snn: SpikingModel, loader, timesteps: list[int], accelerator: Accelerator) -> list[float]:
    """Top-1 accuracy (fractions) after each T in ``timesteps``, one run of max(T) per batch."""
    return evaluate_snn_exits(snn, loader, timesteps, accelerator)["top1"]
