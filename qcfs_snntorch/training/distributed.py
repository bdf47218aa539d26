"""What every rank of a distributed run must agree on, made explicit.

DDP runs with ``broadcast_buffers=False``: a neuron's membrane is per-rank state that must
never be copied from rank 0 (a streaming SNN would otherwise continue from another rank's
input). In torch 2.14 that flag also skips the buffer sync when the model is wrapped
(``forward_sync_buffers``, its replacement, still syncs then, but Accelerate does not pass
it through), so nothing else keeps buffers equal either. The rule here:

- parameters (weights, λ, learnable θ) agree because they start equal and DDP averages
  their gradients; :func:`broadcast_state` makes them start equal;
- buffers that describe the network (BN statistics, a neuron's calibrated v(0) offset)
  are broadcast from rank 0 whenever they were computed from per-rank data
  (calibration) and when training starts, and BN running statistics, which each rank
  updates from its own batches, are averaged before every checkpoint and at each epoch's
  end (:func:`average_batchnorm_stats`);
- membranes (``mem``) are never touched.
"""

from __future__ import annotations

import warnings

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import broadcast
from torch import nn

from ..neurons import MultiStepNeuron
from ..tracing import batchnorms

__all__ = ["average_batchnorm_stats", "broadcast_state", "make_accelerator", "shared_state", "prepare_quietly"]


def make_accelerator(mixed_precision: str = "no", log_with: list[str] | None = None, project_dir=None) -> Accelerator:
    """The Accelerator for a run: DDP without buffer broadcasts, seedable data order."""
    return Accelerator(
        mixed_precision=mixed_precision,
        log_with=log_with or None,
        project_dir=project_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def prepare_quietly(accelerator: Accelerator, *objects):
    """``accelerator.prepare`` without torch's deprecation warning for ``broadcast_buffers``
    (its suggested replacement syncs buffers at wrap time, which :func:`broadcast_state` does explicitly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return accelerator.prepare(*objects)


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer all ranks must agree on: everything but neuron membranes."""
    membranes = {f"{name}.mem" if name else "mem" for name, m in model.named_modules() if isinstance(m, MultiStepNeuron)}
    state = {name: p for name, p in model.named_parameters()}
    state.update({name: b for name, b in model.named_buffers() if name not in membranes})
    return state


@torch.no_grad()
def broadcast_state(model: nn.Module, accelerator: Accelerator) -> None:
    """Copy rank 0's parameters and buffers (not membranes) to every rank, in place."""
    if accelerator.num_processes == 1:
        return
    for tensor in shared_state(model).values():
        if tensor.numel():
            tensor.copy_(broadcast(tensor.detach().clone()))


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module, accelerator: Accelerator) -> None:
    """Average BN running statistics over ranks (each rank updated them from its own batches).

    The running averages are linear in their state, so averaging before a checkpoint and
    again at the epoch's end gives what one average at the end would.
    """
    if accelerator.num_processes == 1:
        return
    for bn in batchnorms(model):
        if bn.track_running_stats:
            for buf in (bn.running_mean, bn.running_var):
                buf.copy_(accelerator.reduce(buf.detach().clone(), reduction="mean"))
