"""Weights in and out: safetensors, written atomically, read with clear errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CheckpointError", "atomic_write_text", "save_weights", "load_weights"]


class CheckpointError(ValueError):
    """A weights file that is missing, corrupt, or from another model."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename: never half-written."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Save ``model.state_dict()`` as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file into ``model``; every mismatch is reported, not half-applied."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file ({exc})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {', '.join(parts)}. "
            "Was it written for another model.name, levels, number of classes or cifar_stem?"
        )
    with torch.no_grad():
        model.load_state_dict(state)
