"""Weights in and out: safetensors, written atomically, read with clear errors.

Also what a resumed run needs from its run directory: :func:`check_resume` (the run's
``config.yaml``, validated against the schema, must describe the same model) and
:func:`previous_report` (the stages already complete).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CheckpointError", "atomic_write_text", "check_resume", "load_weights", "previous_report", "save_weights"]

# Settings a checkpoint depends on: resuming a run with other values cannot load its checkpoints
# (or would silently mix two experiments). Everything else (lr, epochs, batch size, data.root, ...)
# may change between a run and its resumption.
RESUME_KEYS = (
    "model.name",
    "model.levels",
    "model.activations",
    "model.cifar_stem",
    "model.kwargs",
    "model.checkpoint",
    "data.name",
    "train.optimizer",
    "finetune.optimizer",
    "finetune.timesteps",
    "finetune.learn_threshold",
)


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


def load_weights(model: nn.Module, path: str | Path, *, may_lack: Callable[[str], bool] | None = None) -> list[str]:
    """Load a safetensors file into ``model``; every mismatch is reported, not half-applied.

    ``may_lack(key)`` names model entries the file may lack (they keep their values), e.g.
    the QCFS thresholds when starting from a ReLU network's weights. Returns those lacking.
    """
    path = Path(path)
    if path.is_dir():
        inner = path / "model.safetensors"
        hint = f"; to start from a training checkpoint give its weights, {str(inner)!r}" if inner.is_file() else ""
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder, not a .safetensors file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = load_file(path)
        with safe_open(path, "pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file ({exc}): it is damaged, truncated, or in "
            "another format (a torch.save .pt/.pth file must be converted first: safetensors.torch.save_file(state_dict, path))"
        ) from None
    own = model.state_dict()
    lacking = sorted(k for k in set(own) - set(state) if may_lack is not None and may_lack(k))
    missing = sorted(set(own) - set(state) - set(lacking))
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
        written = ", ".join(f"{k}={v}" for k, v in sorted(meta.items()))
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {', '.join(parts)}. "
            + (f"The file was written for {written}. " if written else "")
            + "Was it written for another model.name, levels, number of classes or cifar_stem?"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=not lacking)
    return lacking


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_resume(run_dir: str | Path, cfg) -> None:
    """Before resuming ``run_dir``: its config.yaml must pass the schema and agree with ``cfg`` on RESUME_KEYS.

    Raises :class:`~qcfs_snntorch.config.ConfigError` naming every setting that differs.
    A run directory without config.yaml (nothing was written yet) passes.
    """
    from .config import ConfigError, from_yaml_file

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    try:
        before = from_yaml_file(path)
    except ConfigError as exc:
        raise ConfigError(f"cannot resume {str(run_dir)!r}: its {path.name} does not pass the schema ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - unreadable YAML
        raise ConfigError(f"cannot resume {str(run_dir)!r}: its {path.name} is unreadable ({exc})") from None
    changed = [f"{key}={_get(cfg, key)!r} (the run used {_get(before, key)!r})" for key in RESUME_KEYS if _get(cfg, key) != _get(before, key)]
    if changed:
        raise ConfigError(
            f"cannot resume {str(run_dir)!r} with other settings: {'; '.join(changed)}. Its checkpoints only fit the "
            f"settings in {path}; resume with those, or start a new run_dir"
        )


def previous_report(run_dir: str | Path) -> dict:
    """The report.json a run directory holds (its complete stages), or {} if there is none."""
    path = Path(run_dir) / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}
