"""Every path-valued setting checked for existence and kind before any work starts.

A file given where a folder is needed (or the reverse) used to reach the code that opens
it and end in a traceback there, sometimes after minutes of work. :func:`check_paths`
refuses it first, with one :class:`~qcfs_snntorch.config.ConfigError` naming the key, the
path, what is there and what the key accepts.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, RunConfig

__all__ = ["PATH_RULES", "PathRule", "check_paths"]


@dataclass(frozen=True)
class PathRule:
    """What one path-valued key accepts."""

    valid: str  # for the message: what the key accepts
    folder: bool = False  # an existing folder
    file: bool = False  # an existing file
    archive: bool = False  # an existing tar archive (.tar, .tar.gz, .tgz)
    absent: bool = False  # nothing there yet (it will be created); every existing ancestor must be a folder


_WRITABLE_FOLDER = PathRule("a folder, or a path where one can be created", folder=True, absent=True)
_WEIGHTS = PathRule("a .safetensors file", file=True)

# The keys of RunConfig whose values are paths. data.root depends on data.name: torchvision's CIFAR
# reads (or downloads into) a folder; an ImageFolder tree may also be a tar archive of one.
PATH_RULES: dict[str, PathRule] = {
    "data.root": PathRule("a dataset folder (ImageFolder: train/ and val/ or test/), or a .tar.gz of one",
                          folder=True, archive=True),
    "model.checkpoint": _WEIGHTS,
    "model.pretrained_file": PathRule("a .safetensors or .pth file of timm's weights", file=True),
    "output_dir": _WRITABLE_FOLDER,
    "run_dir": _WRITABLE_FOLDER,
}
_CIFAR_ROOT = PathRule("torchvision's CIFAR folder (the one holding cifar-10-batches-py/)", folder=True)
_CIFAR_DOWNLOAD_ROOT = PathRule("a folder for torchvision's CIFAR download, or a path where one can be created",
                                folder=True, absent=True)


def _rule(cfg: RunConfig, key: str) -> PathRule | None:
    """The rule for ``key`` in this run, or None where the run does not read it."""
    if key == "data.root":
        if cfg.data.name == "digits":
            return None  # bundled with scikit-learn: data.root is not read
        if cfg.data.name in ("cifar10", "cifar100"):
            return _CIFAR_DOWNLOAD_ROOT if cfg.data.download else _CIFAR_ROOT
    if key == "output_dir" and cfg.run_dir:
        return None  # only where run_dir is not given
    return PATH_RULES[key]


def _found(path: Path) -> str:
    if path.is_dir():
        return "it is a folder"
    if path.is_file():
        return "it is a tar archive" if tarfile.is_tarfile(path) else "it is a file"
    if path.exists():
        return "it is neither a file nor a folder"
    blocker = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    return f"it does not exist and {str(blocker)!r} above it is a file" if blocker is not None else "it does not exist"


def _fits(path: Path, rule: PathRule) -> bool:
    if path.is_dir():
        return rule.folder
    if path.is_file():
        return rule.file or (rule.archive and tarfile.is_tarfile(path))
    if path.exists():
        return False
    return rule.absent and all(parent.is_dir() for parent in path.parents if parent.exists())


def check_paths(cfg: RunConfig) -> None:
    """Refuse, before any work, a path-valued key whose path is missing or the wrong kind of thing."""
    for key in PATH_RULES:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        rule = _rule(cfg, key)
        if value is None or rule is None:
            continue
        path = Path(value).expanduser()
        if not _fits(path, rule):
            raise ConfigError(f"{key}={value!r}: {_found(path)}; {key} must be {rule.valid}")
