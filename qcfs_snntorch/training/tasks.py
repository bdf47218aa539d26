"""What one training step computes: the loss and its parts, returned, never stashed on a module.

:func:`~qcfs_snntorch.training.fit` knows nothing about spikes; it calls a task
``task(model, images, labels, step)`` inside autocast and gets back
``{"loss": tensor, "output": [B, C] logits for the accuracy, <part>: float, ...}``.

- :class:`Classification`: the ANN; optionally with the QCFS levels L drawn per batch
  from a set (``levels_choices``), which trains a network that holds at every L in it
  (an SNN at T steps follows the network at L = T; see docs/RESULTS.md), and optionally
  with its first ``relu_epochs`` epochs as a plain ReLU network, λ measured from data at
  the switch to QCFS (a QCFS network trained from scratch ends below its ReLU twin);
- :class:`SpikingFinetune`: hybrid fine-tuning of a converted SNN through T steps with
  surrogate gradients. Loss on the mean output (``"mean"``) or TET (``"tet"``, Deng et
  al., ICLR 2022: the mean of every step's cross-entropy, plus ``tet_weight`` × the mean
  squared distance of the step outputs to ``tet_target``); a fixed T or a T drawn per
  batch; BatchNorm frozen at the ANN's statistics or normalising time-folded batches;
  distillation from the ANN it was converted from (``distill`` > 0).

Every random draw is a function of (seed, step), so all DDP ranks draw alike and a run
resumed mid-epoch draws the same sequence as an uninterrupted one.

The loop calls ``task.start_epoch(model, epoch, first_step)`` before each epoch (a task that
changes with the epoch does it there, from the epoch number alone, so a resumed run is in the
same state as an uninterrupted one), ``task.after_update(model)`` after every optimizer update
(by default :func:`project_thresholds`) and ``task.close(model)`` when training ends, however it ends.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..qcfs import MIN_THRESHOLD
from ..tracing import batchnorms, qcfs_layers, spiking_neurons

__all__ = ["Classification", "SpikingFinetune", "Task", "distillation_loss", "draw", "project_thresholds", "tet_loss"]


def project_thresholds(model: nn.Module) -> int:
    """Set every learnable λ (QCFS) and θ (neuron) below :data:`~qcfs_snntorch.qcfs.MIN_THRESHOLD` to it; returns how many.

    The forward passes use a threshold clamped at the minimum already, with a straight-through
    gradient; but one large step can carry the parameter itself far below zero (λ = −960 after one
    SGD step was seen, ``benchmarks/qcfs_lambda_diagnosis.py``), and the layer then stays silent for
    as many steps as it takes the gradient to bring it back. Projected after each update, it is at
    most one step away from being useful again.
    """
    projected = 0
    with torch.no_grad():
        for layer in [*qcfs_layers(model), *spiking_neurons(model)]:
            threshold = layer.threshold
            if isinstance(threshold, nn.Parameter) and threshold.requires_grad:
                low = threshold < MIN_THRESHOLD
                if bool(low.any()):
                    projected += int(low.sum())
                    threshold.clamp_(min=MIN_THRESHOLD)
    return projected


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


class Task:
    """What :func:`~qcfs_snntorch.training.fit` calls besides ``task(model, images, labels, step)``."""

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def start_epoch(self, model: nn.Module, epoch: int, first_step: int) -> None:
        """Before epoch ``epoch`` (0-based); ``first_step`` > 0 when a resumed run continues it mid-way."""

    def after_update(self, model: nn.Module) -> None:
        """After every optimizer update: keep each learnable threshold usable (:func:`project_thresholds`)."""
        project_thresholds(model)

    def close(self, model: nn.Module) -> None:
        """Training ended (or failed): leave ``model`` as it is used afterwards."""


def _relu_with_unused_threshold(module: nn.Module, args, output):
    """Forward hook: the QCFS layer outputs ReLU of its input. λ enters with weight 0 so that it still
    gets a (zero) gradient: DDP waits for a gradient of every parameter at every step."""
    return torch.relu(args[0]) + module.threshold.sum() * 0


class Classification(Task):
    """Cross-entropy on a classifier's logits.

    Args:
        levels_choices: draw every QCFS's L per batch from these.
        relu_epochs: the first ``relu_epochs`` epochs train the network with every QCFS acting as a
            plain ReLU (evaluation in those epochs too); before epoch ``relu_epochs`` the ReLU
            network's statistics set λ (``measure_thresholds(model)``), and QCFS training goes on
            from there. ReLU networks train better from scratch than QCFS ones, which pass no
            gradient above λ (docs/RESULTS.md). A run resumed mid-way through the switch epoch
            has λ in its checkpoint and does not measure it again.
        measure_thresholds: sets every λ of the (unwrapped) model from data; needed with ``relu_epochs``.
    """

    def __init__(self, label_smoothing: float = 0.0, *, levels_choices: list[int] | None = None, seed: int = 0,
                 relu_epochs: int = 0, measure_thresholds: Callable[[nn.Module], None] | None = None):
        if relu_epochs and measure_thresholds is None:
            raise ValueError("relu_epochs > 0 needs measure_thresholds, which sets λ from data at the switch to QCFS")
        self.label_smoothing = label_smoothing
        self.levels_choices, self.seed = list(levels_choices or []), seed
        self.relu_epochs, self.measure_thresholds = int(relu_epochs), measure_thresholds
        self._relu_hooks: list = []

    def start_epoch(self, model: nn.Module, epoch: int, first_step: int) -> None:
        if epoch < self.relu_epochs:
            if not self._relu_hooks:
                self._relu_hooks = [act.register_forward_hook(_relu_with_unused_threshold) for act in qcfs_layers(model)]
            return
        self.close(model)
        if self.relu_epochs and epoch == self.relu_epochs and first_step == 0 and qcfs_layers(model):
            self.measure_thresholds(model)

    def close(self, model: nn.Module) -> None:
        for handle in self._relu_hooks:
            handle.remove()
        self._relu_hooks = []

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


class SpikingFinetune(Task):
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
