"""setup: everything a run needs before its first stage, with every bad input refused first.

Order matters: the data, the model, its weights and its convertibility are checked
before the run directory exists, so a typo leaves nothing behind. Only then is the run
directory chosen and the Accelerator made. λ from data is measured by the first stage that
needs the ANN as built (:func:`initial_thresholds`), so a resumed run that retrains measures it too.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

from .. import __version__
from ..calibration import calibrate_from_data, silent_layers
from ..check import ConversionError, check
from ..config import ConfigError, RunConfig, from_yaml_file, to_yaml
from ..convert import convert
from ..data import DataSplits, build_datasets, quiet_worker, sample_batch
from ..export import export_nir
from ..models import create_model
from ..tracing import qcfs_layers
from ..training import atomic_write_text, broadcast_state, load_weights, make_accelerator
from .context import RunContext
from .fingerprints import architecture, changed, describe
from .paths import check_paths
from .run_dir import RunDir, RunLog, choose_run_dir, read_report

__all__ = ["SPIKING_STAGES", "build_ann", "initial_thresholds", "setup", "thresholds_from_data"]

SPIKING_STAGES = frozenset({"convert", "eval", "calibrate", "finetune", "export"})


def build_ann(cfg: RunConfig, data: DataSplits):
    """The QCFS ANN the config describes, with ``model.checkpoint`` loaded; returns (ann, λ lacking).

    λ is lacking for a fresh model, timm's pretrained weights, or ReLU weights (a checkpoint
    without λ, allowed with ``threshold_init=data``); a checkpoint that holds λ keeps it.
    """
    m = cfg.model
    ann = create_model(m.name, num_classes=data.info.num_classes, levels=m.levels, threshold=m.threshold,
                       activations=m.activations, cifar_stem=m.cifar_stem, pretrained=m.pretrained,
                       pretrained_file=m.pretrained_file, **{"in_chans": data.info.in_chans, **m.kwargs})
    if not m.checkpoint:
        return ann, True
    thresholds = {f"{name}.threshold" for name, module in ann.named_modules() if module in set(qcfs_layers(ann))}
    may_lack = thresholds.__contains__ if m.threshold_init == "data" else None
    return ann, bool(load_weights(ann, m.checkpoint, may_lack=may_lack))


def preflight(cfg: RunConfig, ann, data: DataSplits):
    """Check convertibility once (for the check stage and every spiking one) and that export will work."""
    stages = set(cfg.stages)
    if not (stages & SPIKING_STAGES or "check" in stages):
        return None
    # one sample of the data: a forward pass finds ops that lose the batch dimension, before any training
    verdict = check(ann, strict=cfg.snn.strict, example=data.test[0][0])
    if stages & SPIKING_STAGES and not verdict.convertible:
        raise ConversionError(verdict)
    if "export" in stages and not verdict.compensated:  # exportability depends on the architecture only: find out now
        with tempfile.TemporaryDirectory() as scratch:
            probe = convert(ann, max_spikes=cfg.snn.max_spikes, neuron=cfg.snn.neuron, strict=cfg.snn.strict, verify=False)
            export_nir(probe, Path(scratch) / "probe.nir", data.test[0][0].unsqueeze(0), portable=cfg.snn.nir_portable)
    return verdict


def refuse_another_model(path: Path, cfg: RunConfig) -> None:
    """A resumed run directory must hold the same network (its config.yaml must pass the schema too)."""
    saved = path / "config.yaml"
    if not saved.is_file():
        return
    try:
        before = from_yaml_file(saved)
    except ConfigError as exc:
        raise ConfigError(f"cannot resume {str(path)!r}: its {saved.name} does not pass the schema ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - unreadable YAML
        raise ConfigError(f"cannot resume {str(path)!r}: its {saved.name} is unreadable ({exc})") from None
    old, new = architecture(before), architecture(cfg)
    differences = changed(old, new)
    if differences:
        raise ConfigError(
            f"cannot resume {str(path)!r} with another network: {describe(old, new, differences, was='the run used')}. The run directory "
            "holds a run of the other one; resume with its settings, or start a new run_dir"
        )


def new_report(cfg: RunConfig, path: Path, data: DataSplits, accelerator) -> dict:
    return {
        "recipe": cfg.recipe,
        "model": cfg.model.name,
        "dataset": data.info.name,
        "levels": cfg.model.levels,
        "run_dir": str(path),
        "status": "running",
        "splits": {"train": len(data.train), "val": len(data.val) if data.val is not None else 0, "test": len(data.test)},
        "stages": {},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "qcfs_snntorch": __version__,
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "mixed_precision": cfg.mixed_precision,
        },
    }


def initial_thresholds(ctx: RunContext) -> None:
    """λ from data (a high percentile of each layer's inputs) where the weights bring none.

    Called by every stage that starts from the ANN as built (training, or converting without a
    train stage), whether or not the run is resumed: a stage that reruns measures λ again,
    and a training checkpoint it continues from brings its own λ back afterwards.
    """
    if not ctx.thresholds_lacking:
        return
    ctx.thresholds_lacking = False
    cfg = ctx.cfg
    trusted_bn = bool(cfg.model.checkpoint or cfg.model.pretrained or cfg.model.pretrained_file)
    thresholds_from_data(ctx, ctx.ann, trusted_bn=trusted_bn, what="initialised from data")


def thresholds_from_data(ctx: RunContext, model, *, trusted_bn: bool = True, what: str = "measured on the ReLU network") -> None:
    """Every λ of ``model`` from a seeded sample of training images (the same on every rank, then broadcast).

    ``trusted_bn``: the BN running statistics are right (a trained or pretrained network) and λ is
    measured in eval mode; otherwise they are re-estimated from the sample first.
    """
    cfg = ctx.cfg
    images, _ = sample_batch(ctx.data.calibration, 8 * cfg.data.batch_size, cfg.seed)
    calibrate_from_data(model, images.to(ctx.accelerator.device).split(cfg.data.batch_size),
                        percentile=cfg.model.threshold_percentile, update_bn=not trusted_bn)
    broadcast_state(model, ctx.accelerator)
    values = [round(act.threshold.item(), 3) for act in qcfs_layers(model)]
    ctx.log(f"λ {what}: {values}")
    silent = silent_layers(values)
    if silent:
        ctx.log(f"λ: {len(silent)} layer(s) never active on the calibration images (indices {silent}) took the median λ")


def setup(cfg: RunConfig) -> RunContext:
    """Data, ANN, checks, run directory, Accelerator, evaluation loaders and initial λ, in that order."""
    check_paths(cfg)  # a wrong kind of path is refused before any data is read
    state = PartialState()
    set_seed(cfg.seed)
    with state.main_process_first():
        data = build_datasets(cfg.data, seed=cfg.seed)
    ann, lacking = build_ann(cfg, data)
    verdict = preflight(cfg, ann, data)
    path = choose_run_dir(cfg, state, accept=(lambda p: refuse_another_model(p, cfg)) if cfg.resume else None)
    accelerator = make_accelerator(cfg.mixed_precision, log_with=cfg.log_with, project_dir=path)
    log = RunLog(path, enabled=accelerator.is_main_process)
    run_dir = RunDir(path, new_report(cfg, path, data, accelerator), previous=read_report(path) if cfg.resume else {},
                     writer=accelerator.is_main_process)
    if accelerator.is_main_process:
        atomic_write_text(path / "config.yaml", to_yaml(cfg))
    if cfg.log_with:
        accelerator.init_trackers("tracking", config={"recipe": cfg.recipe, "model": cfg.model.name, "levels": cfg.model.levels})

    def loader(dataset):  # in memory (data.in_memory), a batch is one gather: worker processes would only copy it
        workers = 0 if cfg.data.in_memory else cfg.data.num_workers
        return accelerator.prepare(torch.utils.data.DataLoader(
            dataset, batch_size=cfg.data.eval_batch_size, num_workers=workers,
            worker_init_fn=quiet_worker if workers else None, pin_memory=accelerator.device.type == "cuda"))

    ctx = RunContext(cfg=cfg, accelerator=accelerator, data=data, val=loader(data.val) if data.val is not None else None,
                     test=loader(data.test), ann=ann.to(accelerator.device), run_dir=run_dir, log=log, verdict=verdict,
                     thresholds_lacking=cfg.model.threshold_init == "data" and lacking)
    log(f"run directory: {path}  ({accelerator.num_processes} process(es), {accelerator.device}, "
        f"mixed_precision={cfg.mixed_precision})")
    log(f"model {cfg.model.name}: replaced {ann.qcfs_surgery}")
    val = f"{len(data.val)} validation / " if data.val is not None else "no validation split (choices look at the test split) / "
    log(f"dataset {data.info.name}: {len(data.train)} train / {val}{len(data.test)} test images")
    return ctx
