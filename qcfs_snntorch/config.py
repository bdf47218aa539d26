"""Typed run configuration: dataclass schema, recipe loading, validated overrides.

A run is a recipe (``recipes/<name>.yaml``) merged onto the schema defaults, then the
command line's ``key.sub=value`` overrides merged on top. OmegaConf checks keys and types
against the dataclasses; :func:`validate` checks the values (choices, ranges).
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "CALIBRATION_METHODS",
    "ConfigError",
    "RULES",
    "RunConfig",
    "SCHEDULER_NAMES",
    "STAGES",
    "SURROGATE_NAMES",
    "from_yaml_file",
    "key_help",
    "list_recipes",
    "load_config",
    "schema_keys",
    "setting",
    "to_yaml",
    "validate",
]

STAGES = ("check", "train", "convert", "eval", "calibrate", "finetune", "export")
DATASETS = ("digits", "imagefolder", "cifar10", "cifar100", "imagenet")

class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message says what is valid."""


def setting(default, help: str):
    """A schema field and its one-line meaning, which ``launch.py --help`` prints (:func:`key_help`):
    the help lives next to the default, so it cannot go stale. A list or dict default is copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = setting("test_resnet", "any timm model name")
    levels: int = setting(4, "QCFS quantization levels L")
    threshold: float = setting(8.0, "initial λ of every QCFS (with threshold_init=fixed)")
    threshold_init: str = setting("fixed", "fixed | data: λ = a percentile of each layer's inputs, where the weights bring no λ")
    threshold_percentile: float = setting(99.9, "with threshold_init=data: the percentile of each layer's inputs taken as its λ")
    activations: list[str] = setting(["relu"], "groups replaced by QCFS")
    cifar_stem: bool = setting(False, "3×3 stride-1 stem, no stem pooling (ResNet family)")
    pretrained: bool = setting(False, "start from timm's weights (from the Hugging Face hub, or its cache with HF_HUB_OFFLINE=1)")
    pretrained_file: str | None = setting(None, "a local copy of timm's weights (.safetensors or .pth), for machines without the hub")
    checkpoint: str | None = setting(None, "ANN weights (.safetensors) to start from / convert")
    kwargs: dict[str, Any] = setting({}, "extra timm.create_model kwargs")

@dataclass
class DataConfig:
    name: str = setting("digits", "dataset: digits | imagefolder | cifar10 | cifar100 | imagenet")
    root: str | None = setting(None, "dataset folder, or a .tar.gz of an ImageFolder tree")
    image_size: int | None = setting(None, "default: 8 digits, 32 CIFAR/imagefolder, 224 imagenet")
    batch_size: int = setting(64, "training batch per process")
    eval_batch_size: int = setting(256, "evaluation batch per process")
    num_workers: int = setting(0, "data-loader worker processes (0: load in the main process)")
    download: bool = setting(False, "torchvision CIFAR only, needs the internet")
    autoaugment: bool = setting(False, "AutoAugment (CIFAR policy) on training images")
    cutout: int = setting(0, "side of the Cutout square in pixels, 0 = off")
    val_split: float = setting(0.1, "fraction of each class of the training split held out for every choice a run makes")
    split_seed: int = setting(0, "draws the validation split: the same held-out images whatever the run's seed")
    train_subset: int | None = setting(None, "a fixed random subset, for quick runs")
    eval_subset: int | None = setting(None, "a fixed random subset of the validation and test splits, for quick runs")
    in_memory: bool = setting(False, "small images (≤ 64 px): decode once into a uint8 tensor, augment whole batches on the device")

@dataclass
class OptimConfig:
    epochs: int = setting(10, "passes over the training data")
    optimizer: str = setting("sgd", "any timm optimizer name (sgd, adamw, ...)")
    lr: float = setting(0.1, "for the global batch the recipe was written for; not rescaled")
    momentum: float = setting(0.9, "SGD momentum (β1 for Adam-family optimizers)")
    weight_decay: float = setting(5e-4, "L2 weight decay")
    decay_bias_and_norm: bool = setting(True, "the reference applies weight decay to λ and BN too")
    scheduler: str = setting("cosine", "any timm scheduler name (cosine, step, ...) or \"none\"")
    warmup_epochs: int = setting(0, "epochs of linear learning-rate warm-up")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy, in [0, 1)")
    grad_accum_steps: int = setting(1, "batches accumulated per optimizer update")
    max_grad_norm: float | None = setting(None, "clip the gradient norm to this (null: no clipping)")
    max_steps_per_epoch: int | None = setting(None, "cap, for smoke tests")
    checkpoint_every_steps: int | None = setting(None, "also checkpoint every N optimizer updates (mid-epoch resume)")

@dataclass
class TrainConfig(OptimConfig):
    levels_choices: list[int] = setting([], "draw every QCFS's L per batch from these (holds at every L)")
    relu_epochs: int = setting(0, "first N epochs as a ReLU network, then QCFS with λ measured from it (< epochs)")
    threshold_gradient: str = setting("plain", "plain: λ's exact gradient | lsq: scaled by 1/√(elements per sample × L) (grouped/depthwise convs, with model.threshold_percentile=99)")

@dataclass
class SNNConfig:
    timesteps: list[int] = setting([1, 2, 4, 8, 16, 32, 64], "T at which the SNN is evaluated")
    chunk_size: int | None = setting(16, "steps per folded forward at evaluation (memory)")
    fold_bn: bool = setting(False, "fold BatchNorm into the preceding convolution when converting")
    calibrate: list[str] = setting([], "v(0) calibration: [channel] and/or [layer]")
    calibrate_timesteps: list[int] = setting([1, 2, 4], "T to calibrate v(0) for, one calibrated SNN each")
    calibrate_samples: int = setting(256, "training images used to calibrate")
    stats_timesteps: int = setting(8, "T of the spike/energy statistics")
    stats_samples: int = setting(64, "test images (a seeded random sample) for statistics and per-layer conversion error")
    nir_portable: bool | None = setting(None, "snn.nir: only node types every NIR consumer maps (null: when that is exact)")
    max_spikes: int = setting(1, "spikes a neuron may send per step: 1 = binary IF; B > 1 = graded (QCFS at L = B·T)")
    strict: bool = setting(False, "true: IF neurons only, refuse LayerNorm/gates/attention/… instead of compensating them")
    neuron: str = setting("if", "if: spikes of +θ only | signed: also −θ spikes that take back earlier ones (no NIR export)")
    early_exit: list[float] = setting([0.5, 0.7, 0.8, 0.9, 0.95, 0.99], "early-exit thresholds τ to report (empty: none)")
    early_exit_rule: str = setting("confidence", "confidence: max softmax of the mean output | margin: top-1 − top-2")
    early_exit_reference: int = setting(4, "the τ chosen on validation takes the fewest mean steps within early_exit_tolerance of this fixed T")
    early_exit_tolerance: float = setting(0.005, "accuracy the chosen τ may lose against early_exit_reference (a fraction: 0.005 = 0.5 points)")

@dataclass
class FinetuneConfig(OptimConfig):
    timesteps: int = setting(2, "T the SNN is fine-tuned (and calibrated) at")
    epochs: int = setting(1, "passes over the training data")
    lr: float = setting(0.01, "for the global batch the recipe was written for; not rescaled")
    weight_decay: float = setting(0.0, "L2 weight decay")
    surrogate: str = setting("triangle", "surrogate gradient: triangle | rectangle | atan | sigmoid")
    surrogate_width: float = setting(1.0, "width of the surrogate gradient, in units of θ")
    learn_threshold: bool = setting(False, "train each neuron's θ during fine-tuning")
    detach_reset: bool = setting(False, "true: no gradient through the reset (snnTorch's rule); its surrogate gradient "
                                        "then grows with T and explodes in deep networks at T ≥ 4 (docs/RESULTS.md)")
    bn: str = setting("frozen", "frozen: running stats fixed | train: stats over time-folded batches")
    loss: str = setting("mean", "mean: CE of the mean output | tet: TET (Deng et al., ICLR 2022): per-step CEs + an MSE term")
    tet_weight: float = setting(0.001, "TET's λ: weight of the mean squared distance of every step's output to tet_target")
    tet_target: float = setting(1.0, "TET's φ: the target of its MSE term")
    timesteps_choices: list[int] = setting([], "draw T per batch from these (one model, several T)")
    progressive: list[int] = setting([], "fine-tune at these T first, in order (e.g. [4]), then at timesteps")
    distill: float = setting(0.0, "weight of distillation from the ANN: loss = (1 − distill)·CE + distill·KD")
    distill_temperature: float = setting(2.0, "softmax temperature of the distillation term")
    keep: str = setting("best", "best: the epoch (0 = before fine-tuning) with the best validation top-1 at T | last")

@dataclass
class RunConfig:
    recipe: str = setting("quickstart", "a recipe name (recipes/<name>.yaml) or a .yaml file path")
    stages: list[str] = setting(["train", "convert", "eval", "finetune"], "what to run, of: check, train, convert, eval, calibrate, finetune, export")
    seed: int = setting(0, "initialisation, data order and samples")
    output_dir: str = setting("runs", "folder that holds new run directories")
    run_dir: str | None = setting(None, "the run's folder (default: <output_dir>/<recipe>-<timestamp>)")
    resume: bool = setting(False, "continue the run in run_dir from its last checkpoint")
    mixed_precision: str = setting("no", "no | bf16 | fp16 (fp16 needs a CUDA GPU)")
    log_with: list[str] = setting([], "Accelerate trackers, e.g. [tensorboard]")
    progress_interval: float = setting(30.0, "seconds between progress lines (done/total, time left) when the console is not a terminal, and in log.txt")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    snn: SNNConfig = field(default_factory=SNNConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

def _recipe_dir() -> Path:
    """``$QCFS_SNNTORCH_RECIPES``, else the checkout's ``recipes/`` (beside the package), else ``./recipes``."""
    import os

    if os.environ.get("QCFS_SNNTORCH_RECIPES"):
        return Path(os.environ["QCFS_SNNTORCH_RECIPES"])
    beside = Path(__file__).resolve().parent.parent / "recipes"
    return beside if beside.is_dir() else Path.cwd() / "recipes"

def list_recipes(recipe_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (recipe_dir or _recipe_dir()).glob("*.yaml"))

def _valid_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        value = node[key] if not OmegaConf.is_missing(node, key) else None
        full = f"{prefix}{key}"
        if isinstance(value, DictConfig) and key != "kwargs":
            keys += _valid_keys(value, full + ".")
        else:
            keys.append(full)
    return keys

def _explain(exc: OmegaConfBaseException, where: str, schema) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc):
        valid = _valid_keys(schema)
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return ConfigError(f"unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(valid)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"bad value for {key!r} in {where}: {msg}")
    return ConfigError(f"invalid config in {where}: {str(exc).splitlines()[0]}")

def _merge(base: DictConfig, other, where: str, schema) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _explain(exc, where, schema) from None

def load_config(overrides: list[str] | None = None, recipe_dir: Path | None = None) -> RunConfig:
    """Schema defaults ← ``recipes/<recipe>.yaml`` ← ``overrides`` (``key.sub=value`` strings)."""
    overrides = list(overrides or [])
    recipe_dir = recipe_dir or _recipe_dir()
    schema = OmegaConf.structured(RunConfig)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}; e.g. model.name=resnet18 train.epochs=5")
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"could not parse overrides {overrides}: {str(exc).splitlines()[0]}") from None
    recipe = cli.pop("recipe", None) or schema.recipe
    if not isinstance(recipe, str):
        raise ConfigError(f"recipe must be a name, got {recipe!r}")
    path = Path(recipe) if recipe.endswith((".yaml", ".yml")) else recipe_dir / f"{recipe}.yaml"  # a name or a file
    if not path.is_file():
        raise ConfigError(f"unknown recipe {recipe!r} (looked for {path}); valid recipes: {', '.join(list_recipes(recipe_dir))}")
    try:
        from_file = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"could not read recipe {path}: {exc}") from None
    cfg = _merge(schema, from_file, f"recipe {path.name}", schema)
    cfg = _merge(cfg, cli, "the command-line overrides", schema)
    cfg.recipe = recipe
    run = OmegaConf.to_object(cfg)
    validate(run)
    return run

# The valid choices of keys whose values name things elsewhere in the package. config.py imports
# nothing of the package (it is the ground floor); tests check these against the tables they name
# (neurons.SURROGATES, neurons.NEURON_KINDS, calibration.METHODS, training.SCHEDULERS).
SURROGATE_NAMES = ("triangle", "rectangle", "atan", "sigmoid")
NEURON_NAMES = ("if", "signed")
CALIBRATION_METHODS = ("layer", "channel")
SCHEDULER_NAMES = ("cosine", "tanh", "step", "multistep", "poly", "none")
EARLY_EXIT_RULES = ("confidence", "margin")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
# Keys whose values are checked where they are used, before any work: a model name, its kwargs and
# activation groups by create_model (ModelError); paths (existence and kind) by pipeline/paths.py.
CHECKED_WHEN_USED = frozenset({"recipe", "model.name", "model.activations", "model.kwargs", "model.checkpoint",
                               "model.pretrained_file", "data.root", "output_dir", "run_dir"})


def _fail(key: str, value, valid: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not valid: {valid}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(low: int | None = None, high: int | None = None):
    def check(key, value):
        if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            bounds = f"≥ {low}" if high is None else f"in [{low}, {high}]"
            raise _fail(key, value, f"an integer {bounds}")
    return check


def _number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    def check(key, value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (high is None or (value < high if high_open else value <= high))
        if not ok:
            left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
            raise _fail(key, value, f"a number in {left}{low}, {'∞' if high is None else high}{right}")
    return check


def _choice(valid):
    def check(key, value):
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")
    return check


def _optional(rule):
    def check(key, value):
        if value is not None:
            rule(key, value)
    return check


def _each(rule, *, nonempty: bool = False, example: str = ""):
    def check(key, values):
        if nonempty and not values:
            raise ConfigError(f"{key} is empty; give at least one value{example}")
        for value in values:
            rule(f"{key}[]", value)
    return check


def _anything(key, value):
    pass


def _optimizer(key, value):
    from timm.optim import list_optimizers

    if value not in list_optimizers():
        import difflib

        close = difflib.get_close_matches(str(value), list_optimizers(), n=3, cutoff=0.6)
        hint = f"closest timm optimizers: {', '.join(close)}" if close else "see timm.optim.list_optimizers()"
        raise ConfigError(f"{key}={value!r} is not a timm optimizer; {hint}")


_POSITIVE, _COUNT = _integer(1), _integer(0)
_OPTIM = {
    "epochs": _COUNT, "optimizer": _optimizer, "lr": _number(0), "momentum": _number(0, 1, high_open=True),
    "weight_decay": _number(0), "decay_bias_and_norm": _anything, "scheduler": _choice(SCHEDULER_NAMES),
    "warmup_epochs": _COUNT, "label_smoothing": _number(0, 1, high_open=True), "grad_accum_steps": _POSITIVE,
    "max_grad_norm": _optional(_number(0, low_open=True)), "max_steps_per_epoch": _optional(_POSITIVE),
    "checkpoint_every_steps": _optional(_POSITIVE),
}
RULES: dict[str, callable] = {
    "stages": _each(_choice(STAGES), nonempty=True, example=f" of {', '.join(STAGES)}"),
    "seed": _integer(0, 2**32 - 1), "resume": _anything, "mixed_precision": _choice(("no", "bf16", "fp16")),
    "log_with": _each(_choice(TRACKERS)), "progress_interval": _number(0, low_open=True),
    "model.levels": _POSITIVE, "model.threshold": _number(0, low_open=True),
    "model.threshold_init": _choice(("fixed", "data")),
    "model.threshold_percentile": _number(0, 100, low_open=True), "model.cifar_stem": _anything,
    "model.pretrained": _anything,
    "data.name": _choice(DATASETS), "data.image_size": _optional(_integer(8, 4096)), "data.batch_size": _POSITIVE,
    "data.eval_batch_size": _POSITIVE, "data.num_workers": _COUNT, "data.download": _anything,
    "data.autoaugment": _anything, "data.cutout": _COUNT, "data.val_split": _number(0, 0.9), "data.split_seed": _integer(0, 2**32 - 1),
    "data.train_subset": _optional(_POSITIVE), "data.eval_subset": _optional(_POSITIVE), "data.in_memory": _anything,
    **{f"train.{k}": rule for k, rule in _OPTIM.items()},
    "train.levels_choices": _each(_POSITIVE),
    "train.relu_epochs": _COUNT,
    "train.threshold_gradient": _choice(("plain", "lsq")),
    "snn.timesteps": _each(_POSITIVE, nonempty=True, example=", e.g. [1,2,4,8]"),
    "snn.chunk_size": _optional(_POSITIVE), "snn.fold_bn": _anything, "snn.strict": _anything,
    "snn.calibrate": _each(_choice(CALIBRATION_METHODS)), "snn.calibrate_timesteps": _each(_POSITIVE),
    "snn.calibrate_samples": _POSITIVE, "snn.stats_timesteps": _POSITIVE, "snn.stats_samples": _POSITIVE,
    "snn.nir_portable": _anything,
    "snn.max_spikes": _integer(1, 64), "snn.neuron": _choice(NEURON_NAMES), "snn.early_exit": _each(_number(0, 1)),
    "snn.early_exit_rule": _choice(EARLY_EXIT_RULES), "snn.early_exit_reference": _POSITIVE,
    "snn.early_exit_tolerance": _number(0, 1),
    **{f"finetune.{k}": rule for k, rule in _OPTIM.items()},
    "finetune.timesteps": _POSITIVE, "finetune.surrogate": _choice(SURROGATE_NAMES),
    "finetune.surrogate_width": _number(0, low_open=True), "finetune.learn_threshold": _anything,
    "finetune.detach_reset": _anything,
    "finetune.bn": _choice(("frozen", "train")), "finetune.loss": _choice(("mean", "tet")),
    "finetune.timesteps_choices": _each(_POSITIVE), "finetune.progressive": _each(_POSITIVE),
    "finetune.distill": _number(0, 1), "finetune.keep": _choice(("best", "last")), "finetune.distill_temperature": _number(0, low_open=True),
    "finetune.tet_weight": _number(0, 1, high_open=True), "finetune.tet_target": _number(-1e6, 1e6),
}


def _value(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _optimizer_and_schedule(section: str, opt) -> None:
    """Build the optimizer and schedule on a dummy parameter: whatever timm refuses is refused here, before any work."""
    import torch
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    dummy = torch.nn.Linear(1, 1)
    try:
        optimizer = create_optimizer_v2(dummy, opt=opt.optimizer, lr=opt.lr, weight_decay=opt.weight_decay,
                                        momentum=opt.momentum, filter_bias_and_bn=not opt.decay_bias_and_norm)
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise ConfigError(f"timm cannot build {section}.optimizer={opt.optimizer!r} with {section}.momentum={opt.momentum}, "
                          f"{section}.lr={opt.lr}: {exc or type(exc).__name__} (momentum must be > 0 for sgd/nesterov; "
                          f"use optimizer=momentum or adamw otherwise)") from None
    if opt.scheduler == "none":
        return
    try:
        create_scheduler_v2(optimizer, sched=opt.scheduler, num_epochs=max(opt.epochs, 1), warmup_epochs=opt.warmup_epochs,
                            step_on_epochs=False, updates_per_epoch=10)
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise ConfigError(f"timm cannot build {section}.scheduler={opt.scheduler!r}: {exc or type(exc).__name__}") from None


def _cross_checks(cfg: RunConfig) -> None:
    """Rules between keys."""
    if cfg.data.name != "digits" and not cfg.data.root:
        raise ConfigError(f"data.name={cfg.data.name} needs data.root (a dataset folder or a .tar.gz of one)")
    if cfg.data.name == "digits" and (cfg.data.autoaugment or cfg.data.cutout):
        raise ConfigError("data.autoaugment and data.cutout are image augmentations for CIFAR/ImageNet-style data; "
                          "digits (8×8 tensors, data.image_size may enlarge them) has none: leave them off")
    size = cfg.data.image_size or (8 if cfg.data.name == "digits" else 224 if cfg.data.name == "imagenet" else 32)
    if cfg.data.cutout > size:
        raise ConfigError(f"data.cutout={cfg.data.cutout} is larger than the {size}-pixel images; use 0 (off) to {size}")
    if cfg.data.in_memory and (cfg.data.name == "digits" or size > 64 or cfg.data.autoaugment):
        why = ("digits are tensors in memory already" if cfg.data.name == "digits" else
               "it has no per-image AutoAugment: give data.autoaugment=false" if cfg.data.autoaugment else
               f"it is for small images (≤ 64 px), not {size}-pixel ones, which stream from disk with data.num_workers")
        raise ConfigError(f"data.in_memory=true does not fit these settings: {why}")
    if cfg.train.relu_epochs and cfg.train.epochs and cfg.train.relu_epochs >= cfg.train.epochs:
        raise ConfigError(f"train.relu_epochs={cfg.train.relu_epochs} leaves no QCFS epoch of train.epochs={cfg.train.epochs}: "
                          "the ReLU epochs come first, then QCFS with λ from data; use fewer (e.g. "
                          f"train.relu_epochs={max(1, cfg.train.epochs // 2)}) or 0 (QCFS from the start)")
    for section in ("train", "finetune"):
        opt = getattr(cfg, section)
        if opt.epochs and opt.warmup_epochs > opt.epochs:
            raise ConfigError(f"{section}.warmup_epochs={opt.warmup_epochs} is more than {section}.epochs={opt.epochs}")
        _optimizer_and_schedule(section, opt)
    if cfg.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("mixed_precision=fp16 needs a CUDA GPU (on a CPU it does nothing); use no, or bf16 on a GPU")
    if "calibrate" in cfg.stages and not cfg.snn.calibrate:
        raise ConfigError(f"stages has calibrate but snn.calibrate is empty; give snn.calibrate=[channel] (or "
                          f"{', '.join(CALIBRATION_METHODS)})")
    if cfg.snn.neuron == "signed" and "export" in cfg.stages:
        kept = [s for s in cfg.stages if s != "export"]
        raise ConfigError(f"snn.neuron=signed cannot be exported to NIR (its IF neuron has no negative spikes); drop the "
                          f"export stage (stages=[{','.join(kept)}]) or use snn.neuron=if")
    needs_ann = {"convert", "eval", "calibrate", "finetune", "export"} & set(cfg.stages)
    if needs_ann and "train" not in cfg.stages and not (cfg.model.checkpoint or cfg.model.pretrained or cfg.model.pretrained_file):
        raise ConfigError(
            f"stages {cfg.stages} need a trained ANN: add 'train' to stages or give model.checkpoint=PATH "
            "(e.g. runs/<run>/ann.safetensors)"
        )
    if cfg.resume and not cfg.run_dir:
        raise ConfigError("resume=true needs run_dir=PATH, the run directory to continue")


def validate(cfg: RunConfig) -> None:
    """Check every value the type system cannot (ranges, choices), key by key, then the rules between keys.

    Every schema key has a rule in :data:`RULES` or is in :data:`CHECKED_WHEN_USED`
    (tests/test_config.py checks both directions).
    """
    if cfg.mixed_precision in ("False", "false"):  # YAML reads a bare `no` as the boolean false
        cfg.mixed_precision = "no"
    for key, rule in RULES.items():
        rule(key, _value(cfg, key))
    _cross_checks(cfg)


def schema_keys() -> list[str]:
    """Every leaf key of the schema (``model.kwargs`` counts as one)."""
    return _valid_keys(OmegaConf.structured(RunConfig))

def key_help(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, one-line meaning)`` for every leaf key of the schema, in schema order."""
    import dataclasses

    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += key_help(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", str(f.type), default, f.metadata.get("help", "")))
    return rows

def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

def from_yaml_file(path: str | Path) -> RunConfig:
    """Load a resolved config written by a run, validated against the schema."""
    schema = OmegaConf.structured(RunConfig)
    cfg = _merge(schema, OmegaConf.load(path), str(path), schema)
    run = OmegaConf.to_object(cfg)
    validate(run)
    return run
