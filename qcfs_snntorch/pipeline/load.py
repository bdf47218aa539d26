"""load_run: a finished run's ANN and SNN back in one call, from its directory or one weights file.

Every weights file a run writes (``ann.safetensors``, ``calibrated.safetensors``,
``snn.safetensors``) carries in its metadata what rebuilding the network takes (see
:func:`weights_metadata`): the timm model and its QCFS settings, the number of classes and
input channels, and the conversion settings. The weights hold the rest: λ, θ, calibrated
v(0) and fine-tuned parameters. config.yaml is read when it is there, never needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..config import ConfigError, RunConfig, from_yaml_file
from ..convert import convert
from ..models import create_model
from ..spiking import SpikingModel
from ..training import CheckpointError, load_weights, read_metadata

__all__ = ["FORMAT", "LoadedRun", "load_run", "weights_metadata"]

FORMAT = "qcfs_snntorch.weights.v1"
SNN_FILES = ("snn.safetensors", "calibrated.safetensors")  # the most finished SNN first
NEEDED = ("model", "num_classes", "in_chans", "levels", "activations", "cifar_stem", "kwargs", "convert")


def weights_metadata(ctx, kind: str) -> dict:
    """What a weights file of this run says about itself. ``kind``: ann | calibrated | snn.

    ``ctx`` is the run's :class:`~.context.RunContext`. Values are JSON (safetensors keeps
    strings; :func:`~qcfs_snntorch.training.read_metadata` decodes them).
    """
    cfg, info = ctx.cfg, ctx.data.info
    meta = {
        "format": FORMAT, "qcfs_snntorch": __version__, "kind": kind, "recipe": cfg.recipe,
        "model": cfg.model.name, "num_classes": info.num_classes, "in_chans": info.in_chans, "levels": cfg.model.levels,
        "activations": list(cfg.model.activations), "cifar_stem": cfg.model.cifar_stem, "kwargs": dict(cfg.model.kwargs),
        "dataset": info.name, "image_size": info.image_size, "mean": list(info.mean), "std": list(info.std),
        "convert": {"fold_bn": cfg.snn.fold_bn, "learn_threshold": cfg.finetune.learn_threshold,
                    "surrogate": cfg.finetune.surrogate, "surrogate_width": cfg.finetune.surrogate_width,
                    "detach_reset": cfg.finetune.detach_reset,
                    "chunk_size": cfg.snn.chunk_size, "max_spikes": cfg.snn.max_spikes, "neuron": cfg.snn.neuron,
                    "strict": cfg.snn.strict},  # what Convert passes to convert()
    }
    if kind != "ann":
        meta.update(timesteps=cfg.finetune.timesteps, calibrate=list(cfg.snn.calibrate))
    return meta


@dataclass
class LoadedRun:
    """What :func:`load_run` returns.

    - ``ann``: the QCFS ANN with the run's weights (None when no ANN weights were found);
    - ``snn``: the SNN: fine-tuned (``snn.safetensors``), else calibrated, else converted
      from the ANN; in eval mode, ready for ``snn(x, timesteps=T)``;
    - ``metadata``: what its weights file says (model, classes, image size, mean/std, …);
    - ``cfg``: the run's config.yaml, when there is one;
    - ``snn_file`` / ``ann_file``: where the weights came from (None: not from a file).
    """

    ann: nn.Module | None
    snn: SpikingModel
    metadata: dict
    cfg: RunConfig | None
    snn_file: Path | None
    ann_file: Path | None


def _missing_metadata(path: Path, lacking: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{str(path)!r} lacks the metadata that rebuilding its network takes ({', '.join(lacking)}): it was written by "
        "another program or an older qcfs_snntorch. Rebuild the network yourself (qcfs_snntorch.create_model with the "
        "run's settings, then convert) and load it with qcfs_snntorch.training.load_weights"
    )


def _files(path: Path) -> tuple[Path | None, Path | None]:
    """(ANN weights, SNN weights) of a run directory or of one weights file."""
    if path.is_dir():
        snn = next((path / name for name in SNN_FILES if (path / name).is_file()), None)
        ann = path / "ann.safetensors"
        if snn is None and not ann.is_file():
            raise CheckpointError(f"{str(path)!r} holds no weights ({', '.join(('ann.safetensors', *SNN_FILES))}): "
                                  "is it a run directory whose train, calibrate or finetune stage completed?")
        return (ann if ann.is_file() else None), snn
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist; give a run directory or one of its .safetensors files")
    kind = read_metadata(path).get("kind")
    if kind == "ann":
        return path, None
    sibling = path.parent / "ann.safetensors"
    return (sibling if sibling.is_file() else None), path


def _config(run_dir: Path) -> RunConfig | None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    try:
        return from_yaml_file(saved)
    except ConfigError:
        return None  # another version's schema: the weights' metadata is enough


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedRun:
    """The ANN and the SNN of a finished run, from its directory or from one of its weights files.

    ``path``: a run directory (its most finished SNN: ``snn.safetensors``, else
    ``calibrated.safetensors``, else the ANN converted), or a weights file (an SNN file, with
    the ANN from ``ann.safetensors`` beside it; or ``ann.safetensors``, converted). Both
    networks come back in eval mode on ``device``. The input they expect is an image
    normalised with ``metadata["mean"]`` / ``metadata["std"]`` at ``metadata["image_size"]``.
    """
    path = Path(path).expanduser()
    ann_file, snn_file = _files(path)
    cfg = _config(path if path.is_dir() else path.parent)
    if ann_file is None and cfg is not None and cfg.model.checkpoint and Path(cfg.model.checkpoint).is_file():
        ann_file = Path(cfg.model.checkpoint)  # the run converted an ANN it did not train
    described = snn_file or ann_file
    meta = read_metadata(described)
    lacking = [key for key in NEEDED if key not in meta]
    if lacking:
        raise _missing_metadata(described, lacking)
    ann = create_model(meta["model"], num_classes=meta["num_classes"], levels=meta["levels"],
                       activations=meta["activations"], cifar_stem=meta["cifar_stem"],
                       **{"in_chans": meta["in_chans"], **meta["kwargs"]})
    if ann_file is not None:
        try:
            load_weights(ann, ann_file)
        except CheckpointError:
            if snn_file is None:
                raise
            ann_file = None  # model.checkpoint held ReLU weights (λ set from data, never saved): the SNN file is whole
    snn = convert(ann.eval(), verify=False, **meta["convert"])
    if snn_file is not None:
        load_weights(snn, snn_file)
    return LoadedRun(ann=ann.to(device).eval() if ann_file is not None else None, snn=snn.to(device).eval(),
                     metadata=meta, cfg=cfg, snn_file=snn_file, ann_file=ann_file)
