"""Weights and training checkpoints on disk.

- weights: safetensors files written atomically (a temporary file and a rename), read
  with every mismatch named (:func:`save_weights`, :func:`load_weights`);
- :class:`CheckpointDir`: one folder of Accelerate training states (model, optimizer,
  grad scaler, RNG), each written to a hidden ``.NAME.partial`` folder and renamed into
  place once complete with a ``progress.json`` saying where in training it was taken; a
  folder without it is never read. It also keeps the fingerprint of the settings its
  checkpoints were written under, so a resumed run can tell whether they still apply.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["KEEP_CHECKPOINTS", "CheckpointDir", "CheckpointError", "atomic_write_text", "load_weights", "read_metadata", "save_weights"]

KEEP_CHECKPOINTS = 2  # complete checkpoints kept per directory (epoch and step ones together)


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
    resizable = {f"{name}.{buffer}" if name else buffer for name, module in model.named_modules()
                 for buffer in getattr(module, "resizable_buffers", ())}
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and k not in resizable and state[k].shape != own[k].shape]
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




def read_metadata(path: str | Path) -> dict:
    """The metadata a safetensors file was written with (values JSON-decoded where they were JSON)."""
    try:
        with safe_open(Path(path), "pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    decoded = {}
    for key, value in meta.items():
        try:
            decoded[key] = json.loads(value)
        except ValueError:
            decoded[key] = value
    return decoded


def _position(progress: dict) -> tuple[int, int]:
    """(epochs complete, batches done in the next epoch) of a checkpoint's progress.json."""
    if progress.get("step") is None:  # end of epoch ``epoch`` (0-based)
        return int(progress["epoch"]) + 1, 0
    return int(progress["epoch"]), int(progress["step"])


class CheckpointDir:
    """The training checkpoints of one stage: list, save (atomically, keeping the newest
    ``keep``), load (with a clear error), and the fingerprint they were written under."""

    FINGERPRINT = "fingerprint.json"

    def __init__(self, path: str | Path, accelerator: Accelerator | None = None, keep: int = KEEP_CHECKPOINTS):
        """``accelerator`` is needed to save and load; listing and reading fingerprints work without."""
        self.path, self.accelerator, self.keep = Path(path), accelerator, keep

    def list(self) -> list[tuple[Path, dict]]:
        """Complete checkpoints, oldest first, with their progress.json."""
        found = []
        if not self.path.is_dir():
            return found
        for path in self.path.iterdir():
            marker = path / "progress.json"
            if path.name.startswith(".") or not marker.is_file():  # .partial folders are never complete
                continue
            try:
                progress = json.loads(marker.read_text())
                found.append((_position(progress), path, progress))
            except (ValueError, KeyError, TypeError):
                continue  # not one of ours
        return [(path, progress) for _, path, progress in sorted(found, key=lambda f: (f[0], f[1].name))]

    def latest(self) -> tuple[Path, dict] | None:
        """The most advanced complete checkpoint, or None."""
        found = self.list()
        return found[-1] if found else None

    def epochs_done(self) -> int:
        """Epochs complete in the most advanced checkpoint (0: none); a mid-epoch one counts the epochs before it."""
        found = self.latest()
        return _position(found[1])[0] if found else 0

    def fingerprint(self) -> dict | None:
        """The settings the checkpoints here were written under (None: unknown or none written)."""
        try:
            return json.loads((self.path / self.FINGERPRINT).read_text())
        except (OSError, ValueError):
            return None

    def claim(self, fingerprint: dict) -> None:
        """Record the settings the checkpoints written from now on belong to."""
        if self.accelerator.is_main_process:
            atomic_write_text(self.path / self.FINGERPRINT, json.dumps(fingerprint, sort_keys=True))

    def discard(self) -> None:
        """Remove every checkpoint (they belong to other settings); the folder stays."""
        if self.accelerator.is_main_process and self.path.is_dir():
            for child in self.path.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def clean_partials(self) -> None:
        if self.accelerator.is_main_process and self.path.is_dir():
            for stale in self.path.glob(".*.partial"):  # left by a kill during a save
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, name: str, progress: dict) -> Path:
        """``save_state`` into ``.name.partial``, add progress.json, rename: a kill leaves no half checkpoint."""
        accelerator = self.accelerator
        final, partial = self.path / name, self.path / f".{name}.partial"
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()  # every rank writes its own RNG file into partial; rename only after all did
        if accelerator.is_main_process:
            (partial / "progress.json").write_text(json.dumps(progress))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            others = [path for path, _ in self.list() if path != final]
            for old in others[: max(0, len(others) - (self.keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        """``load_state`` from ``path``; an unusable checkpoint is a :class:`CheckpointError` naming the fallback."""
        try:
            self.accelerator.load_state(str(path))
        except Exception as exc:  # noqa: BLE001 - whatever failed, the checkpoint is unusable
            older = [p for p, _ in self.list() if p != path]
            fallback = f"delete it to resume from {older[-1]}" if older else "delete it to start this stage over"
            detail = (str(exc).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(
                f"the training checkpoint {str(path)!r} could not be loaded ({type(exc).__name__}: {detail}). It was "
                f"written for another model or optimizer (model.*, *.optimizer, finetune.learn_threshold changed since) "
                f"or it is damaged; {fallback}, or start a new run_dir"
            ) from exc
