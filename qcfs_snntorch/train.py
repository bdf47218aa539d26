"""One Accelerate training loop, used for the QCFS ANN and for SNN fine-tuning.

The loop knows nothing about spikes: a model maps a batch of images to logits and a loss
is taken on them. Fine-tuning passes a :class:`~qcfs_snntorch.finetune.TimeAveraged`
SNN, whose forward runs T steps and returns the mean output.

Checkpoints (Accelerate state: model, optimizer, grad scaler, RNG) go to
``checkpoint_dir/epoch_NNNN`` after every epoch and, with ``checkpoint_every_steps=N``,
to ``checkpoint_dir/step_NNNNNNNN`` after every N-th optimizer update. Each is written to
a hidden ``.NAME.partial`` folder and renamed into place once complete, with a
``progress.json`` saying where in training it was taken; a folder without it is never
read. ``resume=True`` continues from the latest one, mid-epoch included: the data order
comes from Accelerate's seedable sampler (seed + epoch) and the batches already seen are
skipped with ``skip_first_batches``, so on a deterministic setup the resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
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

from .checkpoint import CheckpointError

__all__ = [
    "TrainingDiverged",
    "TrainingOutOfMemory",
    "fit",
    "latest_checkpoint",
    "list_checkpoints",
    "make_accelerator",
    "sync_batchnorm_stats",
]

KEEP_CHECKPOINTS = 2  # complete checkpoints kept per checkpoint_dir (epoch and step ones together)


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite; no checkpoint was written for the bad step."""


class TrainingOutOfMemory(RuntimeError):
    """The accelerator ran out of memory; the message suggests a smaller batch with gradient accumulation."""


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


# --- checkpoints ---------------------------------------------------------------------------------


def _position(state: dict) -> tuple[int, int]:
    """(epochs complete, batches done in the next epoch) of a checkpoint's progress.json."""
    if state.get("step") is None:  # end of epoch ``epoch`` (0-based)
        return int(state["epoch"]) + 1, 0
    return int(state["epoch"]), int(state["step"])


def list_checkpoints(directory: str | Path) -> list[tuple[Path, dict]]:
    """Complete checkpoints in ``directory``, oldest first, with their progress.json."""
    directory = Path(directory)
    found = []
    if not directory.is_dir():
        return found
    for path in directory.iterdir():
        marker = path / "progress.json"
        if path.name.startswith(".") or not marker.is_file():  # .partial folders are never complete
            continue
        try:
            state = json.loads(marker.read_text())
            found.append((_position(state), path, state))
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours
    return [(path, state) for _, path, state in sorted(found, key=lambda f: (f[0], f[1].name))]


def latest_checkpoint(directory: str | Path) -> tuple[Path, dict] | None:
    """The most advanced complete checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _save_checkpoint(accelerator: Accelerator, directory: Path, name: str, state: dict, keep: int = KEEP_CHECKPOINTS) -> Path:
    """``save_state`` into ``.name.partial``, add progress.json, rename: a kill leaves no half checkpoint."""
    final = directory / name
    partial = directory / f".{name}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / "progress.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        others = [path for path, _ in list_checkpoints(directory) if path != final]
        for old in others[: max(0, len(others) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(accelerator: Accelerator, path: Path, directory: Path) -> None:
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # noqa: BLE001 - whatever failed, the checkpoint is unusable
        older = [p for p, _ in list_checkpoints(directory) if p != path]
        fallback = f"delete it to resume from {older[-1]}" if older else "delete it to start this stage over"
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"the training checkpoint {str(path)!r} could not be loaded ({type(exc).__name__}: {detail}). It was "
            f"written for another model or optimizer (model.*, *.optimizer, finetune.learn_threshold changed since) "
            f"or it is damaged; {fallback}, or start a new run_dir"
        ) from exc


def _clean_partials(accelerator: Accelerator, directory: Path) -> None:
    if accelerator.is_main_process and directory.is_dir():
        for stale in directory.glob(".*.partial"):  # left by a kill during a save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


# --- failures ------------------------------------------------------------------------------------


def _config_name(cfg) -> str:
    from .config import FinetuneConfig

    return "finetune" if isinstance(cfg, FinetuneConfig) else "train"


def _last_good(path: Path | None, directory: Path) -> str:
    if path is None:
        return f"there is no checkpoint yet in {str(directory)!r} (it failed before the first one)"
    return f"the last good checkpoint is {str(path)!r}"


def _close_optimizers(wrong: str) -> str:
    import difflib

    from timm.optim import list_optimizers

    close = difflib.get_close_matches(str(wrong), list_optimizers(), n=3, cutoff=0.6)
    return f"closest timm optimizers: {', '.join(close)}" if close else "see timm.optim.list_optimizers()"


def _bad_setting(setting: str, exc: Exception, hint: str):
    from .config import ConfigError

    return ConfigError(f"cannot use {setting}: {exc or type(exc).__name__}; {hint}")


def _non_finite_weights(model: nn.Module) -> str | None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


# --- the loop ------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    train_loader,
    *,
    cfg,
    accelerator: Accelerator,
    checkpoint_dir: str | Path,
    evaluate: Callable[[nn.Module], float] | None = None,
    metrics: Callable[[nn.Module], dict] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    label: str = "train",
) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs`` (an :class:`~qcfs_snntorch.config.OptimConfig`).

    ``cfg.grad_accum_steps`` batches make one optimizer update (the last group of an epoch
    may be shorter). Checkpoints go to ``checkpoint_dir`` after every epoch and every
    ``cfg.checkpoint_every_steps`` updates (if set); ``resume=True`` continues from the
    latest complete one, mid-epoch included. Returns one summary dict per epoch.

    Raises :class:`TrainingDiverged` on a non-finite loss or weight (nothing is saved for
    that step), :class:`TrainingOutOfMemory` when a batch does not fit, and
    :class:`~qcfs_snntorch.checkpoint.CheckpointError` when the checkpoint to resume from
    cannot be loaded.
    """
    checkpoint_dir = Path(checkpoint_dir)
    name = _config_name(cfg)
    accum = max(1, int(cfg.grad_accum_steps))
    every = int(getattr(cfg, "checkpoint_every_steps", None) or 0)
    # One Accelerator serves several fits (ANN, then SNN); save_state must see only this one's objects.
    accelerator.free_memory()
    try:
        optimizer = create_optimizer_v2(
            model,
            opt=cfg.optimizer,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            filter_bias_and_bn=not cfg.decay_bias_and_norm,
        )
    except (ValueError, AssertionError, KeyError) as exc:
        raise _bad_setting(f"{name}.optimizer={cfg.optimizer!r} (momentum={cfg.momentum})", exc, _close_optimizers(cfg.optimizer)) from None
    with warnings.catch_warnings():
        # Accelerate suggests forward_sync_buffers, which still syncs at init; we want no buffer sync at all.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch * accum)
    updates_per_epoch = max(1, math.ceil(steps_per_epoch / accum))
    scheduler = None
    if cfg.scheduler != "none" and cfg.epochs > 0:
        try:
            scheduler, _ = create_scheduler_v2(
                optimizer,
                sched=cfg.scheduler,
                num_epochs=cfg.epochs,
                warmup_epochs=cfg.warmup_epochs,
                step_on_epochs=False,
                updates_per_epoch=updates_per_epoch,
            )
        except (ValueError, AssertionError, KeyError) as exc:
            raise _bad_setting(f"{name}.scheduler={cfg.scheduler!r}", exc, "schedules are updated every optimizer step, so "
                               "per-epoch-only ones (plateau) do not apply; e.g. cosine, step, multistep, poly, tanh, or none") from None
    # A model may return per-step outputs [T, B, C] for a per-step loss (TET); the
    # prediction is then their mean over steps.
    loss_fn = loss_fn or nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    _clean_partials(accelerator, checkpoint_dir)
    start_epoch, skip, history, carried, last_good = 0, 0, [], None, None
    found = latest_checkpoint(checkpoint_dir) if resume else None
    if found:
        last_good, state = found
        _load_checkpoint(accelerator, last_good, checkpoint_dir)
        history = state.get("history", [])
        if state.get("step") is None:
            start_epoch = state["epoch"] + 1
            log(f"[{label}] resumed from {last_good} (epoch {start_epoch} of {cfg.epochs} done)")
        else:
            start_epoch, skip, carried = state["epoch"], state["step"], state.get("totals")
            log(f"[{label}] resumed from {last_good} (epoch {start_epoch + 1} of {cfg.epochs}, step {skip} of {steps_per_epoch} done)")
    if scheduler is not None:  # the schedule is a function of the update count: no state to restore
        scheduler.step_update(start_epoch * updates_per_epoch + skip // accum)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        start = time.perf_counter()
        first = skip if epoch == start_epoch else 0
        loss_sum = torch.zeros((), device=accelerator.device)
        correct = torch.zeros((), device=accelerator.device)
        seen = torch.zeros((), device=accelerator.device)
        if first and carried and accelerator.is_main_process:  # the resumed epoch's totals so far (all ranks)
            loss_sum += carried[0]
            correct += carried[1]
            seen += carried[2]
        # The sampler's order is a function of (seed, epoch) only: set the epoch explicitly, since
        # a loader left early (max_steps_per_epoch) or created anew on resume does not count epochs.
        train_loader.set_epoch(epoch)
        loader = train_loader
        rng_at_checkpoint = None
        if first:
            loader = accelerator.skip_first_batches(train_loader, first)
            loader.set_epoch(epoch)
            # Starting an iterator draws a base seed from the global RNG; the checkpoint's RNG state
            # was taken after that draw, so restore it once the first batch is in hand.
            rng_at_checkpoint = torch.get_rng_state()
        update_in_epoch = first // accum
        progress = Progress(
            TextColumn(f"[{label}] epoch {epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
            transient=True, disable=not accelerator.is_main_process,
        )
        task = progress.add_task("", total=steps_per_epoch, completed=first, loss=float("nan"))
        with progress:
            for i, (images, labels) in enumerate(loader):
                step = first + i
                if rng_at_checkpoint is not None:
                    torch.set_rng_state(rng_at_checkpoint)
                    rng_at_checkpoint = None
                if step >= steps_per_epoch:
                    break
                group_start = step - step % accum
                group = min(accum, steps_per_epoch - group_start)
                update = step + 1 == group_start + group
                where = f"epoch {epoch + 1}/{cfg.epochs}, step {step + 1}/{steps_per_epoch}"
                try:
                    with contextlib.nullcontext() if update else accelerator.no_sync(model):
                        with accelerator.autocast():
                            logits = model(images)
                            loss = loss_fn(logits.float(), labels)
                        bad = (~torch.isfinite(loss.detach())).float()
                        if accelerator.num_processes > 1:  # every rank stops together, none waits forever
                            bad = accelerator.reduce(bad, reduction="sum")
                        if bad.item():
                            value = loss.item()
                            value = value if not math.isfinite(value) else "non-finite on another process"
                            raise TrainingDiverged(
                                f"[{label}] the loss is {value} at {where}: training stopped and no checkpoint was "
                                f"written for this step; {_last_good(last_good, checkpoint_dir)}. Lower {name}.lr (now "
                                f"{cfg.lr:g}), set {name}.max_grad_norm (e.g. 1.0) or use mixed_precision=no, then rerun "
                                f"with resume=true to continue from that checkpoint"
                            )
                        accelerator.backward(loss / group)
                    if update:
                        if cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                except torch.OutOfMemoryError as exc:
                    batch = len(labels)
                    smaller = (
                        f"e.g. data.batch_size={batch // 2} {name}.grad_accum_steps={2 * accum} keeps the global batch of "
                        f"{batch * accum * accelerator.num_processes} images"
                        if batch > 1
                        else "even one image per process does not fit: use a smaller model.name or data.image_size"
                    )
                    raise TrainingOutOfMemory(
                        f"[{label}] out of memory on {accelerator.device} at {where}, with data.batch_size={batch} images "
                        f"per process and {name}.grad_accum_steps={accum}. Use a smaller batch and accumulate gradients "
                        f"instead: {smaller}; mixed_precision=bf16 also cuts activation memory. "
                        f"{_last_good(last_good, checkpoint_dir).capitalize()}; add resume=true to continue from it"
                    ) from exc
                if update:
                    update_in_epoch += 1
                    if scheduler is not None:
                        scheduler.step_update(epoch * updates_per_epoch + update_in_epoch)
                loss_sum += loss.detach() * labels.numel()
                predicted = logits.detach().mean(0) if logits.dim() == 3 else logits.detach()
                correct += (predicted.argmax(-1) == labels).sum()
                seen += labels.numel()
                progress.update(task, advance=1, loss=(loss_sum / seen).item())
                global_update = epoch * updates_per_epoch + update_in_epoch
                if update and every and global_update % every == 0 and step + 1 < steps_per_epoch:
                    totals = accelerator.reduce(torch.stack([loss_sum, correct, seen]), reduction="sum")
                    _check_weights(model, label, where, last_good, checkpoint_dir, name)
                    last_good = _save_checkpoint(
                        accelerator, checkpoint_dir, f"step_{global_update:08d}",
                        {"epoch": epoch, "step": step + 1, "update": global_update, "totals": totals.tolist(), "history": history},
                    )
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
            try:
                summary["eval_top1"] = evaluate(accelerator.unwrap_model(model))
            except torch.OutOfMemoryError as exc:
                raise TrainingOutOfMemory(
                    f"[{label}] out of memory on {accelerator.device} while evaluating after epoch {epoch + 1}: lower "
                    f"data.eval_batch_size (and snn.chunk_size for the SNN). "
                    f"{_last_good(last_good, checkpoint_dir).capitalize()}; add resume=true to continue from it"
                ) from exc
        if metrics is not None:
            summary.update(metrics(accelerator.unwrap_model(model)))
        history.append(summary)
        accelerator.log(_scalars(summary, label), step=epoch + 1)
        log(
            f"[{label}] epoch {epoch + 1}/{cfg.epochs}: loss {summary['loss']:.4f}, train top-1 {summary['train_top1']:.4f}"
            + (f", eval top-1 {summary['eval_top1']:.4f}" if "eval_top1" in summary else "")
            + f", lr {summary['lr']:.3g}, {summary['seconds']:.1f}s"
        )
        _check_weights(model, label, f"the end of epoch {epoch + 1}/{cfg.epochs}", last_good, checkpoint_dir, name)
        last_good = _save_checkpoint(accelerator, checkpoint_dir, f"epoch_{epoch:04d}", {"epoch": epoch, "history": history})
    accelerator.free_memory()
    return history


def _check_weights(model: nn.Module, label: str, where: str, last_good: Path | None, directory: Path, name: str) -> None:
    """Never save a checkpoint holding NaN/inf: it would be the 'last good' one a resume starts from."""
    bad = _non_finite_weights(model)
    if bad is not None:
        raise TrainingDiverged(
            f"[{label}] {bad} holds NaN or infinite values at {where}: training stopped and no checkpoint was written; "
            f"{_last_good(last_good, directory)}. Lower {name}.lr, set {name}.max_grad_norm (e.g. 1.0) or use "
            "mixed_precision=no, then rerun with resume=true to continue from that checkpoint"
        )
