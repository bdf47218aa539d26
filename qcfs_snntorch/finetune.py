"""Hybrid fine-tuning: train the converted SNN through T steps with surrogate gradients.

The training loop (:func:`qcfs_snntorch.train.fit`) sees a classifier; the wrappers here
make an SNN one. Options, all from the recipe's ``finetune.*``:

- loss on the mean output over T (``loss="mean"``) or on every step's output (``"tet"``,
  temporal efficient training, Deng et al., ICLR 2022), which keeps early steps useful;
- a fixed T, or a T drawn per batch from a set (``timesteps_choices``) so one model serves
  several latencies;
- BatchNorm frozen at the ANN's statistics, or normalising time-folded batches;
- distillation from the ANN it was converted from (``distill`` > 0): the SNN is taught the
  ANN's output distribution, not only the labels, which is what "close the gap to the ANN" asks.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from .spiking import SpikingModel

__all__ = ["TimeAveraged", "distillation_loss", "finetune_loss", "tet_loss"]


def tet_loss(outputs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over steps of the cross-entropy of each step's output ``[T, B, C]``."""
    steps = outputs.shape[0]
    return F.cross_entropy(outputs.flatten(0, 1).float(), labels.repeat(steps), label_smoothing=label_smoothing)


def distillation_loss(outputs: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(teacher ‖ student) of temperature-softened outputs, scaled by temperature² (Hinton et al., 2015).

    ``outputs`` is ``[B, C]`` (mean over steps) or ``[T, B, C]`` (every step is taught).
    """
    if outputs.dim() == 3:
        teacher_logits = teacher_logits.expand(outputs.shape[0], *teacher_logits.shape)
    student = F.log_softmax(outputs.flatten(0, -2).float() / temperature, dim=-1)
    teacher = F.softmax(teacher_logits.flatten(0, -2).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean") * temperature**2


def finetune_loss(model: TimeAveraged, *, loss: str = "mean", label_smoothing: float = 0.0, distill: float = 0.0,
                  temperature: float = 2.0):
    """The fine-tuning loss for :func:`qcfs_snntorch.train.fit`: (1 − distill)·CE + distill·KD.

    CE is on the mean output (``"mean"``) or every step (``"tet"``); KD uses the teacher
    logits ``model`` computed for the same batch.
    """
    def compute(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if loss == "tet":
            ce = tet_loss(outputs, labels, label_smoothing)
        else:
            ce = F.cross_entropy(outputs, labels, label_smoothing=label_smoothing)
        if not distill:
            return ce
        return (1 - distill) * ce + distill * distillation_loss(outputs, model.teacher_logits, temperature)

    return compute


class TimeAveraged(nn.Module):
    """An SNN as a classifier: ``forward(x)`` runs T steps and returns the mean output.

    Args:
        snn: the converted network (trained in place).
        timesteps: T of every forward pass, unless ``timesteps_choices`` is given.
        bn: ``"frozen"`` keeps BatchNorm in eval mode (the ANN's statistics keep describing
            what the rates approximate); ``"train"`` normalises with statistics over the
            time-folded batch.
        per_step: in training mode return the per-step outputs ``[T, B, C]`` (for
            :func:`tet_loss`); evaluation always returns the mean.
        timesteps_choices: draw T uniformly from these for every training batch.
        seed: seeds the draw, so that every rank of a DDP run draws the same T.
        teacher: a network (the ANN) run on every training batch without gradients; its
            logits are left in ``teacher_logits`` for :func:`finetune_loss`. Kept out of the
            module tree: not trained, not saved, not wrapped by DDP.
    """

    def __init__(
        self,
        snn: SpikingModel,
        timesteps: int,
        bn: str = "frozen",
        *,
        per_step: bool = False,
        timesteps_choices: list[int] | None = None,
        seed: int = 0,
        teacher: nn.Module | None = None,
    ):
        super().__init__()
        if bn not in ("frozen", "train"):
            raise ValueError(f"bn must be 'frozen' or 'train', got {bn!r}")
        self.snn, self.timesteps, self.bn, self.per_step = snn, timesteps, bn, per_step
        self.timesteps_choices = list(timesteps_choices or [])
        self._draw = random.Random(seed)
        self.__dict__["teacher"] = teacher  # a plain attribute, not a submodule
        self.teacher_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.timesteps
        if self.training and self.timesteps_choices:
            steps = self._draw.choice(self.timesteps_choices)
        if self.training and self.teacher is not None:
            with torch.no_grad():
                self.teacher_logits = self.teacher(x).detach()
        outputs = self.snn(x, timesteps=steps)
        return outputs if (self.training and self.per_step) else outputs.mean(0)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.bn == "frozen":
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
