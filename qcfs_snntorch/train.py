"""One Accelerate training loop, used for the QCFS ANN and for SNN fine-tuning.

The loop knows nothing about spikes: a model maps a batch of images to logits and a loss
is taken on them. Fine-tuning passes a :class:`~qcfs_snntorch.finetune.TimeAveraged`
SNN, whose forward runs T steps and returns the mean output.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

__all__ = ["TrainingDiverged", "fit", "make_accelerator", "sync_batchnorm_stats"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no checkpoint was written for the bad step."""


def make_accelerator(mixed_precision: str = "no", log_with: list[str] | None = None, project_dir=None) -> Accelerator:
    """The Accelerator for a run: DDP without buffer broadcasts, seedable data order."""
    return Accelerator(
        mixed_precision=mixed_precision,
        log_with=log_with or None,
        project_dir=project_dir,
        # Neuron membranes are per-rank state, never to be copied from rank 0; BN statistics
        # are averaged at each epoch's end instead (sync_batchnorm_stats).
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def sync_batchnorm_stats(model: nn.Module, accelerator: Accelerator) -> None:
    """Average BN running statistics over ranks.

    DDP runs with ``broadcast_buffers=False`` so that neuron membranes stay per rank;
    BN statistics are then per rank too, and are averaged at each epoch's end instead.
    """
    if accelerator.num_processes == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var):
                buf.copy_(accelerator.reduce(buf.detach().clone(), reduction="mean"))


def _scalars(summary: dict, label: str) -> dict:
    """Flatten an epoch summary for trackers: lists become one scalar per index."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{label}/{key}/{i}": v for i, v in enumerate(value)})
        elif key != "epoch":
            out[f"{label}/{key}"] = value
    return out


def _latest_checkpoint(directory: Path) -> tuple[Path, dict] | None:
    done = []
    for path in directory.glob("epoch_*"):
        marker = path / "progress.json"
        if marker.is_file():  # written last: its presence means the checkpoint is complete
            done.append((json.loads(marker.read_text())["epoch"], path))
    if not done:
        return None
    epoch, path = max(done)
    return path, json.loads((path / "progress.json").read_text())


def _save_checkpoint(accelerator: Accelerator, directory: Path, epoch: int, state: dict, keep: int = 2) -> None:
    final = directory / f"epoch_{epoch:04d}"
    partial = directory / f".epoch_{epoch:04d}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / "progress.json").write_text(json.dumps({"epoch": epoch, **state}))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in sorted(directory.glob("epoch_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def fit(
    model: nn.Module,
    train_loader,
    *,
    cfg,
    accelerator: Accelerator,
    checkpoint_dir: str | Path,
    evaluate: Callable[[nn.Module], float] | None = None,
    metrics: Callable[[nn.Module], dict] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    label: str = "train",
) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` (an :class:`~qcfs_snntorch.config.OptimConfig`).

    Checkpoints (Accelerate state: model, optimizer, scheduler, RNG) go to
    ``checkpoint_dir/epoch_NNNN`` after every epoch; ``resume=True`` continues from the
    last complete one. Returns one summary dict per epoch run.
    """
    checkpoint_dir = Path(checkpoint_dir)
    # One Accelerator serves several fits (ANN, then SNN); save_state must see only this one's objects.
    accelerator.free_memory()
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=not cfg.decay_bias_and_norm,
    )
    with warnings.catch_warnings():
        # Accelerate suggests forward_sync_buffers, which still syncs at init; we want no buffer sync at all.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch * cfg.grad_accum_steps)
    updates_per_epoch = max(1, math.ceil(steps_per_epoch / cfg.grad_accum_steps))
    scheduler = None
    if cfg.scheduler != "none" and cfg.epochs > 0:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=cfg.scheduler,
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch, history = 0, []
    found = _latest_checkpoint(checkpoint_dir) if resume else None
    if found:
        path, state = found
        accelerator.load_state(str(path))
        start_epoch, history = state["epoch"] + 1, state.get("history", [])
        log(f"[{label}] resumed from {path} (epoch {state['epoch'] + 1} of {cfg.epochs} done)")
    if scheduler is not None:  # the schedule is a function of the update count: no state to restore
        scheduler.step_update(start_epoch * updates_per_epoch)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=accelerator.device)
        correct = torch.zeros((), device=accelerator.device)
        seen = torch.zeros((), device=accelerator.device)
        progress = Progress(
            TextColumn(f"[{label}] epoch {epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
            transient=True, disable=not accelerator.is_main_process,
        )
        task = progress.add_task("", total=steps_per_epoch, loss=float("nan"))
        with progress:
            for step, (images, labels) in enumerate(train_loader):
                if step >= steps_per_epoch:
                    break
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        logits = model(images)
                        loss = loss_fn(logits.float(), labels)
                    if not torch.isfinite(loss.detach()):
                        raise TrainingDiverged(
                            f"[{label}] loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; the last good "
                            f"checkpoint is in {checkpoint_dir} (lower the learning rate or try mixed_precision=no)"
                        )
                    accelerator.backward(loss)
                    if cfg.max_grad_norm and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients and scheduler is not None:
                    scheduler.step_update(epoch * updates_per_epoch + (step + 1) // cfg.grad_accum_steps)
                loss_sum += loss.detach() * labels.numel()
                correct += (logits.detach().argmax(-1) == labels).sum()
                seen += labels.numel()
                progress.update(task, advance=1, loss=(loss_sum / seen).item())
        sync_batchnorm_stats(accelerator.unwrap_model(model), accelerator)
        totals = accelerator.reduce(torch.stack([loss_sum, correct, seen]), reduction="sum")
        summary = {
            "epoch": epoch + 1,
            "loss": (totals[0] / totals[2]).item(),
            "train_top1": (totals[1] / totals[2]).item(),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - start, 2),
        }
        if evaluate is not None:
            summary["eval_top1"] = evaluate(accelerator.unwrap_model(model))
        if metrics is not None:
            summary.update(metrics(accelerator.unwrap_model(model)))
        history.append(summary)
        accelerator.log(_scalars(summary, label), step=epoch + 1)
        log(
            f"[{label}] epoch {epoch + 1}/{cfg.epochs}: loss {summary['loss']:.4f}, train top-1 {summary['train_top1']:.4f}"
            + (f", eval top-1 {summary['eval_top1']:.4f}" if "eval_top1" in summary else "")
            + f", lr {summary['lr']:.3g}, {summary['seconds']:.1f}s"
        )
        _save_checkpoint(accelerator, checkpoint_dir, epoch, {"history": history})
    accelerator.free_memory()
    return history
