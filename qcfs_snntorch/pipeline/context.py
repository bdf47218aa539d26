"""RunContext: what the stages of one run share (config, accelerator, data, the ANN and SNN, outputs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..check import CheckReport
from ..config import RunConfig
from ..data import DataSplits, sample_batch, train_loader
from ..spiking import SpikingModel
from ..training import CheckpointDir
from .dependencies import checkpoint_fingerprint
from .fingerprints import CONTINUABLE, changed, describe
from .run_dir import RunDir, RunLog

__all__ = ["RunContext"]


@dataclass
class RunContext:
    """Built by :func:`~qcfs_snntorch.pipeline.setup.setup`; each stage reads it and sets ``ann`` / ``snn``.

    ``val`` and ``test`` are prepared evaluation loaders: every choice a run makes (the
    per-epoch accuracy, calibration) looks at ``val``; ``test`` is evaluated once at the
    end of each stage and reported next to it.
    """

    cfg: RunConfig
    accelerator: Accelerator
    data: DataSplits
    val: DataLoader | None
    test: DataLoader
    ann: nn.Module
    run_dir: RunDir
    log: RunLog
    verdict: CheckReport | None = None
    snn: SpikingModel | None = None
    ann_accuracy: dict | None = None  # {"val_top1", "top1"} once measured (by training, or before converting)
    thresholds_lacking: bool = False  # λ is to be set from data before the ANN is trained or converted
    digests: dict[str, str] = field(default_factory=dict)  # each wanted stage's fingerprint digest (set by the runner)
    _samples: dict = field(default_factory=dict)

    @property
    def selection(self) -> DataLoader:
        """The loader choices are made on: validation, or the test split when there is none (data.val_split=0)."""
        return self.val if self.val is not None else self.test

    def train_loader(self) -> DataLoader:
        """A fresh training loader (with ``data.in_memory``, its batches are augmented on the accelerator's device)."""
        return train_loader(self.data, self.cfg.data, self.accelerator.device)

    def accuracy(self, evaluate: Callable[[DataLoader], float | list[float]]) -> dict:
        """``{"val_top1": …, "top1": …}``: ``evaluate(loader)`` on validation (when there is one) and test."""
        return {"val_top1": evaluate(self.val) if self.val is not None else None, "top1": evaluate(self.test)}

    def calibration_batch(self) -> torch.Tensor:
        """A seeded, class-balanced sample of the training images with the evaluation transform."""
        if "calibration" not in self._samples:
            images, _ = sample_batch(self.data.calibration, self.cfg.snn.calibrate_samples, self.cfg.seed)
            self._samples["calibration"] = images.to(self.accelerator.device)
        return self._samples["calibration"]

    def statistics_batch(self) -> torch.Tensor:
        """A seeded uniform sample of the test split, for spike statistics and per-layer error."""
        if "statistics" not in self._samples:
            images, _ = sample_batch(self.data.test, self.cfg.snn.stats_samples, self.cfg.seed, balanced=False)
            self._samples["statistics"] = images.to(self.accelerator.device)
        return self._samples["statistics"]

    def checkpoint_fingerprint(self, stage: str) -> dict:
        """What ``stage``'s training checkpoints depend on (:func:`.dependencies.checkpoint_fingerprint`)."""
        return checkpoint_fingerprint(stage, self.cfg, self.digests)

    def checkpoints(self, name: str, fingerprint: dict) -> CheckpointDir:
        """The training checkpoints of a stage, kept only if they were written under compatible settings.

        With ``resume=true``, checkpoints written under other settings (beyond more epochs or
        another learning rate) belong to another experiment: they are removed and the stage
        starts over, with a line in the log naming what changed.
        """
        directory = CheckpointDir(self.run_dir.path / "checkpoints" / name, self.accelerator)
        before = directory.fingerprint()
        if before is not None and self.cfg.resume:
            differences = [key for key in changed(before, fingerprint) if key not in CONTINUABLE]
            if differences:
                self.log(f"[{name}] its checkpoints were written with other settings ({describe(before, fingerprint, differences)}): "
                         "starting this stage over")
                directory.discard()
        directory.claim(fingerprint)
        return directory
