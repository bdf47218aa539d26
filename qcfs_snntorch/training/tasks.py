"""What one training step computes: the loss and its parts, returned, never stashed on a module.

:func:`~qcfs_snntorch.training.fit` knows nothing about spikes; it calls a task
``task(model, images, labels, step)`` inside autocast and gets back
``{"loss": tensor, "output": [B, C] logits for the accuracy, <part>: float, ...}``.

- :class:`Classification`: the ANN; optionally with the QCFS levels L drawn per batch
  from a set (``levels_choices``), which trains a network that holds at every L in it
  (an SNN at T steps follows the network at L = T; see docs/RESULTS.md);
- :class:`SpikingFinetune`: hybrid fine-tuning of a converted SNN through T steps with
  surrogate gradients. Loss on the mean output (``"mean"``) or TET (``"tet"``, Deng et
  al., ICLR 2022: the mean of every step's cross-entropy, plus ``tet_weight`` × the mean
  squared distance of the step outputs to ``tet_target``); a fixed T or a T drawn per
  batch; BatchNorm frozen at the ANN's statistics or normalising time-folded batches;
  distillation from the ANN it was converted from (``distill`` > 0).

Every random draw is a function of (seed, step), so all DDP ranks draw alike and a run
resumed mid-epoch draws the same sequence as an uninterrupted one.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from ..tracing import batchnorms, qcfs_layers

__all__ = ["Classification", "SpikingFinetune", "distillation_loss", "tet_loss", "draw"]


def draw(choices: list[int], seed: int, step: int) -> int:
    """The element of ``choices`` for training step ``step``: the same on every rank and after a resume."""
    return random.Random(seed * 1_000_003 + step).choice(choices)


def tet_loss(outputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, *, weight: float = 0.0,
             target: float = 1.0) -> torch.Tensor:
    """TET (Deng et al., ICLR 2022) on per-step outputs ``[T, B, C]``.

    ``(1 − weight) · mean_t CE(O_t, y) + weight · mean_t MSE(O_t, target)``; with
    ``weight = 0`` it is the mean of the per-step cross-entropies.
    """
    steps = outputs.shape[0]
    ce = F.cross_entropy(outputs.flatten(0, 1).float(), labels.repeat(steps), label_smoothing=label_smoothing)
    if not weight:
        return ce
    return (1 - weight) * ce + weight * F.mse_loss(outputs.float(), torch.full_like(outputs, target, dtype=torch.float32))


def distillation_loss(outputs: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(teacher ‖ student) of temperature-softened outputs, scaled by temperature² (Hinton et al., 2015).

    ``outputs`` is ``[B, C]`` (mean over steps) or ``[T, B, C]`` (every step is taught).
    """
    if outputs.dim() == 3:
        teacher_logits = teacher_logits.expand(outputs.shape[0], *teacher_logits.shape)
    student = F.log_softmax(outputs.flatten(0, -2).float() / temperature, dim=-1)
    teacher = F.softmax(teacher_logits.flatten(0, -2).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean") * temperature**2


class Classification:
    """Cross-entropy on a classifier's logits; ``levels_choices`` draws every QCFS's L per batch."""

    def __init__(self, label_smoothing: float = 0.0, *, levels_choices: list[int] | None = None, seed: int = 0):
        self.label_smoothing = label_smoothing
        self.levels_choices, self.seed = list(levels_choices or []), seed

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict:
        layers, trained = [], []
        if self.levels_choices:
            # L is read by each QCFS's autograd node at forward time: set it for this batch, then put it back.
            layers = qcfs_layers(model)
            trained = [act.levels for act in layers]
            levels = draw(self.levels_choices, self.seed, step)
            for act in layers:
                act.levels = levels
        try:
            logits = model(images)
        finally:
            for act, levels in zip(layers, trained):
                act.levels = levels
        return {"loss": F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing), "output": logits}


class SpikingFinetune:
    """Hybrid fine-tuning of a :class:`~qcfs_snntorch.SpikingModel` (see the module docstring).

    Args:
        timesteps: T of every training forward, unless ``timesteps_choices`` is given.
        loss: ``"mean"`` (cross-entropy of the mean output) or ``"tet"``.
        bn: ``"frozen"`` keeps BatchNorm in eval mode (the ANN's statistics keep describing
            what the rates approximate); ``"train"`` normalises time-folded batches.
        teacher: the ANN, run on every batch without gradients when ``distill`` > 0. Held
            here, not in the SNN's module tree: not trained, not saved, not wrapped by DDP.
    """

    def __init__(
        self,
        timesteps: int,
        *,
        loss: str = "mean",
        label_smoothing: float = 0.0,
        tet_weight: float = 0.0,
        tet_target: float = 1.0,
        bn: str = "frozen",
        timesteps_choices: list[int] | None = None,
        seed: int = 0,
        distill: float = 0.0,
        temperature: float = 2.0,
        teacher: nn.Module | None = None,
    ):
        if bn not in ("frozen", "train"):
            raise ValueError(f"bn must be 'frozen' or 'train', got {bn!r}")
        if loss not in ("mean", "tet"):
            raise ValueError(f"loss must be 'mean' or 'tet', got {loss!r}")
        if distill and teacher is None:
            raise ValueError("distill > 0 needs the teacher network (the ANN the SNN was converted from)")
        self.timesteps, self.loss, self.bn = int(timesteps), loss, bn
        self.label_smoothing, self.tet_weight, self.tet_target = label_smoothing, tet_weight, tet_target
        self.timesteps_choices, self.seed = list(timesteps_choices or []), seed
        self.distill, self.temperature, self.teacher = distill, temperature, teacher
        if teacher is not None:
            teacher.eval()  # its BN statistics and dropout as at inference

    def steps_for(self, step: int) -> int:
        return draw(self.timesteps_choices, self.seed, step) if self.timesteps_choices else self.timesteps

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if self.bn == "frozen":
            for bn in batchnorms(model):
                bn.eval()

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict:
        outputs = model(images, timesteps=self.steps_for(step)).float()  # [T, B, C]
        if self.loss == "tet":
            ce = tet_loss(outputs, labels, self.label_smoothing, weight=self.tet_weight, target=self.tet_target)
        else:
            ce = F.cross_entropy(outputs.mean(0), labels, label_smoothing=self.label_smoothing)
        parts = {"output": outputs.mean(0), "ce": ce.detach()}
        if not self.distill:
            return {"loss": ce, **parts}
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        taught = outputs if self.loss == "tet" else outputs.mean(0)
        kd = distillation_loss(taught, teacher_logits, self.temperature)
        return {"loss": (1 - self.distill) * ce + self.distill * kd, **parts, "distill": kd.detach()}
