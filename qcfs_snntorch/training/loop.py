"""One Accelerate training loop, for the QCFS ANN and for SNN fine-tuning alike.

The loop knows nothing about spikes: a task (:mod:`.tasks`) turns a batch into a loss and
logits. Checkpoints (Accelerate state: model, optimizer, grad scaler, RNG) go to a
:class:`~.checkpoints.CheckpointDir` after every epoch and, with
``checkpoint_every_steps=N``, after every N-th optimizer update. ``resume=True``
continues from the latest one, mid-epoch included: the data order comes from Accelerate's
seedable sampler (seed + epoch) and the batches already seen are skipped with
``skip_first_batches``, so on a deterministic setup the resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from torch import nn

from ..config import SCHEDULER_NAMES
from ..progress import Progress
from .checkpoints import CheckpointDir
from .distributed import average_batchnorm_stats, broadcast_state, prepare_quietly
from .tasks import Classification

__all__ = ["SCHEDULERS", "TrainingDiverged", "TrainingOutOfMemory", "TrainingSetupError", "fit", "non_finite"]

# timm schedulers that can be stepped per optimizer update (plateau is per-epoch only), or none.
SCHEDULERS = SCHEDULER_NAMES


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite; no checkpoint was written for the bad step."""


class TrainingOutOfMemory(RuntimeError):
    """The accelerator ran out of memory; the message suggests a smaller batch with gradient accumulation."""


class TrainingSetupError(ValueError):
    """An optimizer or schedule timm cannot build from the settings; the message says what is valid."""


def non_finite(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf, or None."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def _scalars(summary: dict, label: str) -> dict:
    """Flatten an epoch summary for trackers: lists become one scalar per index."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{label}/{key}/{i}": v for i, v in enumerate(value)})
        elif key != "epoch":
            out[f"{label}/{key}"] = value
    return out


def _close_optimizers(wrong: str) -> str:
    close = difflib.get_close_matches(str(wrong), list_optimizers(), n=3, cutoff=0.6)
    return f"closest timm optimizers: {', '.join(close)}" if close else "see timm.optim.list_optimizers()"


def _out_of_memory_message(label: str, name: str, where: str, batch: int, accum: int, accelerator, last_good: str) -> str:
    smaller = (
        f"e.g. data.batch_size={batch // 2} {name}.grad_accum_steps={2 * accum} keeps the global batch of "
        f"{batch * accum * accelerator.num_processes} images"
        if batch > 1
        else "even one image per process does not fit: use a smaller model.name or data.image_size"
    )
    return (
        f"[{label}] out of memory on {accelerator.device} at {where}, with data.batch_size={batch} images per process "
        f"and {name}.grad_accum_steps={accum}. Use a smaller batch and accumulate gradients instead: {smaller}; "
        f"mixed_precision=bf16 also cuts activation memory. {last_good.capitalize()}; add resume=true to continue from it"
    )


@dataclass
class _Totals:
    """Running sums of one epoch on this rank (the loss and each loss part, correct, seen)."""

    device: torch.device
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor | float, weight: int) -> None:
        value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
        self.sums[name] = self.sums.get(name, torch.zeros((), device=self.device)) + value * weight

    def reduced(self, accelerator: Accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        values = accelerator.reduce(torch.stack([self.sums[n] for n in names]), reduction="sum")
        return dict(zip(names, values.tolist()))


class _Trainer:
    """The state of one :func:`fit` call, split where the logic splits: setup, resume, epoch, summary."""

    def __init__(self, model, loader, cfg, accelerator: Accelerator, checkpoints: CheckpointDir, task, *, name, label, log):
        self.cfg, self.accelerator, self.checkpoints, self.task = cfg, accelerator, checkpoints, task
        self.name, self.label, self.log = name, label, log
        self.accum = max(1, int(cfg.grad_accum_steps))
        self.every = int(cfg.checkpoint_every_steps or 0)
        # One Accelerator serves several fits (ANN, then SNN); save_state must see only this one's objects.
        accelerator.free_memory()
        broadcast_state(model, accelerator)  # buffers too: DDP's own wrap-time sync skips them (distributed.py)
        optimizer = self._optimizer(model)
        self.model, self.optimizer, self.loader = prepare_quietly(accelerator, model, optimizer, loader)
        self.steps_per_epoch = len(self.loader)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch * self.accum)
        self.updates_per_epoch = max(1, math.ceil(self.steps_per_epoch / self.accum))
        self.scheduler = self._scheduler()
        self.history: list[dict] = []
        self.last_good: Path | None = None

    # -- setup --------------------------------------------------------------------------
    def _optimizer(self, model):
        cfg = self.cfg
        try:
            return create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       momentum=cfg.momentum, filter_bias_and_bn=not cfg.decay_bias_and_norm)
        except (ValueError, AssertionError, KeyError) as exc:
            raise TrainingSetupError(f"cannot use {self.name}.optimizer={cfg.optimizer!r} (momentum={cfg.momentum}): "
                                     f"{exc or type(exc).__name__}; {_close_optimizers(cfg.optimizer)}") from None

    def _scheduler(self):
        cfg = self.cfg
        if cfg.scheduler == "none" or cfg.epochs == 0:
            return None
        try:
            scheduler, _ = create_scheduler_v2(self.optimizer, sched=cfg.scheduler, num_epochs=cfg.epochs,
                                               warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
                                               updates_per_epoch=self.updates_per_epoch)
        except (ValueError, AssertionError, KeyError) as exc:
            raise TrainingSetupError(f"cannot use {self.name}.scheduler={cfg.scheduler!r}: {exc or type(exc).__name__}; "
                                     f"schedules are updated every optimizer step: one of {', '.join(SCHEDULERS)}") from None
        return scheduler

    # -- resume -------------------------------------------------------------------------
    def resume(self) -> tuple[int, int, dict | None]:
        """Load the latest checkpoint; returns (first epoch, batches to skip in it, that epoch's totals so far)."""
        found = self.checkpoints.latest()
        if not found:
            return 0, 0, None
        self.last_good, progress = found
        self.checkpoints.load(self.last_good)
        self.history = progress.get("history", [])
        if progress.get("step") is None:
            epoch = progress["epoch"] + 1
            self.log(f"[{self.label}] resumed from {self.last_good} (epoch {epoch} of {self.cfg.epochs} done)")
            return epoch, 0, None
        epoch, skip = progress["epoch"], progress["step"]
        self.log(f"[{self.label}] resumed from {self.last_good} (epoch {epoch + 1} of {self.cfg.epochs}, "
                 f"step {skip} of {self.steps_per_epoch} done)")
        return epoch, skip, progress.get("totals")

    def last_good_text(self) -> str:
        if self.last_good is None:
            return f"there is no checkpoint yet in {str(self.checkpoints.path)!r} (it failed before the first one)"
        return f"the last good checkpoint is {str(self.last_good)!r}"

    # -- one epoch ----------------------------------------------------------------------
    def _batches(self, epoch: int, first: int):
        """The epoch's batches after the first ``first`` (a resumed epoch), with the RNG as checkpointed."""
        # The sampler's order is a function of (seed, epoch) only: set the epoch explicitly, since a loader
        # left early (max_steps_per_epoch) or created anew on resume does not count epochs.
        self.loader.set_epoch(epoch)
        if not first:
            yield from self.loader
            return
        loader = self.accelerator.skip_first_batches(self.loader, first)
        loader.set_epoch(epoch)
        # Starting an iterator draws a base seed from the global RNG; the checkpoint's RNG state was
        # taken after that draw, so restore it once the first batch is in hand.
        rng = torch.get_rng_state()
        for i, batch in enumerate(loader):
            if i == 0:
                torch.set_rng_state(rng)
            yield batch

    def epoch(self, epoch: int, first: int, carried: dict | None) -> _Totals:
        cfg, accelerator = self.cfg, self.accelerator
        self.task.start_epoch(accelerator.unwrap_model(self.model), epoch, first)
        self.task.train_mode(self.model)
        totals = _Totals(accelerator.device)
        if first and carried and accelerator.is_main_process:  # the resumed epoch's totals so far (all ranks)
            for key, value in carried.items():
                totals.add(key, value, 1)
        progress = Progress(f"{self.label} epoch {epoch + 1}/{cfg.epochs}", self.steps_per_epoch, completed=first,
                            enabled=accelerator.is_main_process, unit="batches", fields={"loss": float("nan")})
        with progress:
            for i, (images, labels) in enumerate(self._batches(epoch, first)):
                step = first + i
                if step >= self.steps_per_epoch:
                    break
                result = self.step(epoch, step, images, labels)
                totals.add("loss", result["loss"], labels.numel())
                for key, value in result.items():
                    if key not in ("loss", "output"):
                        totals.add(key, value, labels.numel())
                totals.add("correct", (result["output"].detach().argmax(-1) == labels).sum(), 1)
                totals.add("seen", labels.numel(), 1)
                progress.advance(loss=(totals.sums["loss"] / totals.sums["seen"]).item())
                self._maybe_checkpoint_mid_epoch(epoch, step, totals)
        return totals

    def step(self, epoch: int, step: int, images, labels) -> dict:
        """One forward/backward (and an optimizer update at the end of each accumulation group)."""
        group_start = step - step % self.accum
        group = min(self.accum, self.steps_per_epoch - group_start)
        update = step + 1 == group_start + group
        where = f"epoch {epoch + 1}/{self.cfg.epochs}, step {step + 1}/{self.steps_per_epoch}"
        global_step = epoch * self.steps_per_epoch + step
        try:
            with contextlib.nullcontext() if update else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    result = self.task(self.model, images, labels, global_step)
                self._stop_if_diverged(result["loss"], where)
                self.accelerator.backward(result["loss"] / group)
            if update:
                if self.cfg.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.task.after_update(self.accelerator.unwrap_model(self.model))
        except torch.OutOfMemoryError as exc:
            raise TrainingOutOfMemory(_out_of_memory_message(self.label, self.name, where, len(labels), self.accum,
                                                             self.accelerator, self.last_good_text())) from exc
        if update and self.scheduler is not None:
            self.scheduler.step_update(self.update_count(epoch, step))
        return {**result, "loss": result["loss"].detach()}

    def update_count(self, epoch: int, step: int) -> int:
        """Optimizer updates done after batch ``step`` of ``epoch`` (0-based) has been applied."""
        return epoch * self.updates_per_epoch + (step + 1 + self.accum - 1) // self.accum

    def _stop_if_diverged(self, loss: torch.Tensor, where: str) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.accelerator.num_processes > 1:  # every rank stops together, none waits forever
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bad.item():
            return
        value = loss.item()
        value = value if not math.isfinite(value) else "non-finite on another process"
        raise TrainingDiverged(
            f"[{self.label}] the loss is {value} at {where}: training stopped and no checkpoint was written for this "
            f"step; {self.last_good_text()}. Lower {self.name}.lr (now {self.cfg.lr:g}), set {self.name}.max_grad_norm "
            f"(e.g. 1.0) or use mixed_precision=no, then rerun with resume=true to continue from that checkpoint"
        )

    # -- checkpoints --------------------------------------------------------------------
    def _maybe_checkpoint_mid_epoch(self, epoch: int, step: int, totals: _Totals) -> None:
        at_update = (step + 1) % self.accum == 0 or step + 1 == self.steps_per_epoch
        updates = self.update_count(epoch, step)
        if not (self.every and at_update and updates % self.every == 0 and step + 1 < self.steps_per_epoch):
            return
        where = f"epoch {epoch + 1}/{self.cfg.epochs}, step {step + 1}/{self.steps_per_epoch}"
        self.checkpoint(f"step_{updates:08d}", {"epoch": epoch, "step": step + 1, "update": updates,
                                           "totals": totals.reduced(self.accelerator), "history": self.history}, where)

    def checkpoint(self, name: str, progress: dict, where: str) -> None:
        """Sync what ranks must agree on, refuse to keep NaN, write the checkpoint."""
        model = self.accelerator.unwrap_model(self.model)
        average_batchnorm_stats(model, self.accelerator)
        bad = non_finite(model)
        if bad is not None:
            raise TrainingDiverged(
                f"[{self.label}] {bad} holds NaN or infinite values at {where}: training stopped and no checkpoint was "
                f"written; {self.last_good_text()}. Lower {self.name}.lr, set {self.name}.max_grad_norm (e.g. 1.0) or use "
                "mixed_precision=no, then rerun with resume=true to continue from that checkpoint"
            )
        self.last_good = self.checkpoints.save(name, progress)

    # -- end of epoch -------------------------------------------------------------------
    def summarise(self, epoch: int, totals: _Totals, seconds: float, evaluate, metrics) -> dict:
        reduced = totals.reduced(self.accelerator)
        seen = max(reduced.pop("seen", 0.0), 1.0)
        correct = reduced.pop("correct", 0.0)
        summary = {"epoch": epoch + 1, "loss": reduced.pop("loss", 0.0) / seen, "train_top1": correct / seen}
        summary.update({key: value / seen for key, value in sorted(reduced.items())})
        summary.update({"lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2)})
        model = self.accelerator.unwrap_model(self.model)
        if evaluate is not None:
            try:
                summary["eval_top1"] = evaluate(model)
            except torch.OutOfMemoryError as exc:
                raise TrainingOutOfMemory(
                    f"[{self.label}] out of memory on {self.accelerator.device} while evaluating after epoch {epoch + 1}: "
                    f"lower data.eval_batch_size (and snn.chunk_size for the SNN). {self.last_good_text().capitalize()}; "
                    "add resume=true to continue from it"
                ) from exc
        if metrics is not None:
            summary.update(metrics(model))
        return summary


def _epoch_line(label: str, epochs: int, summary: dict) -> str:
    parts = [f"loss {summary['loss']:.4f}", f"train top-1 {summary['train_top1']:.4f}"]
    if "eval_top1" in summary:
        parts.append(f"eval top-1 {summary['eval_top1']:.4f}")
    parts += [f"lr {summary['lr']:.3g}", f"{summary['seconds']:.1f}s"]
    return f"[{label}] epoch {summary['epoch']}/{epochs}: " + ", ".join(parts)


def fit(
    model: nn.Module,
    train_loader,
    *,
    cfg,
    accelerator: Accelerator,
    checkpoints: CheckpointDir | str | Path,
    task=None,
    evaluate: Callable[[nn.Module], float] | None = None,
    metrics: Callable[[nn.Module], dict] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    label: str = "train",
    name: str = "train",
) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` (an :class:`~qcfs_snntorch.config.OptimConfig`).

    ``task`` computes each step's loss (default: cross-entropy, :class:`.tasks.Classification`) and
    is told when each epoch starts and when training ends (:class:`.tasks.Task`);
    ``evaluate(model)`` gives the per-epoch ``eval_top1`` (on the validation split); ``name``
    is the config section the messages point at (``train`` or ``finetune``). ``cfg.grad_accum_steps``
    batches make one optimizer update. Checkpoints go to ``checkpoints`` after every epoch
    and every ``cfg.checkpoint_every_steps`` updates; ``resume=True`` continues from the
    latest complete one, mid-epoch included. Returns one summary dict per epoch.

    Raises :class:`TrainingDiverged` on a non-finite loss or weight (nothing is saved for
    that step), :class:`TrainingOutOfMemory` when a batch does not fit,
    :class:`TrainingSetupError` for an optimizer or schedule timm cannot build, and
    :class:`~.checkpoints.CheckpointError` when the checkpoint to resume from cannot be loaded.
    """
    if not isinstance(checkpoints, CheckpointDir):
        checkpoints = CheckpointDir(checkpoints, accelerator)
    task = task or Classification(cfg.label_smoothing)
    trainer = _Trainer(model, train_loader, cfg, accelerator, checkpoints, task, name=name, label=label, log=log)
    checkpoints.clean_partials()
    start_epoch, skip, carried = trainer.resume() if resume else (0, 0, None)
    if trainer.scheduler is not None:  # the schedule is a function of the update count: no state to restore
        trainer.scheduler.step_update(start_epoch * trainer.updates_per_epoch + skip // trainer.accum)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            first = skip if epoch == start_epoch else 0
            totals = trainer.epoch(epoch, first, carried if first else None)
            average_batchnorm_stats(accelerator.unwrap_model(trainer.model), accelerator)
            summary = trainer.summarise(epoch, totals, time.perf_counter() - started, evaluate, metrics)
            trainer.history.append(summary)
            accelerator.log(_scalars(summary, label), step=epoch + 1)
            log(_epoch_line(label, cfg.epochs, summary))
            trainer.checkpoint(f"epoch_{epoch:04d}", {"epoch": epoch, "history": trainer.history},
                               f"the end of epoch {epoch + 1}/{cfg.epochs}")
    finally:
        task.close(accelerator.unwrap_model(trainer.model))
    accelerator.free_memory()
    return trainer.history
