"""Typed run configuration: dataclass schema, recipe loading, validated overrides.

A run is a recipe (``recipes/<name>.yaml``) merged onto the schema defaults, then the
command line's ``key.sub=value`` overrides merged on top. OmegaConf checks keys and types
against the dataclasses; :func:`validate` checks the values (choices, ranges).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "ConfigError",
    "RunConfig",
    "STAGES",
    "load_config",
    "list_recipes",
    "validate",
]

STAGES = ("check", "train", "convert", "eval", "finetune", "export")
DATASETS = ("digits", "imagefolder", "cifar10", "cifar100", "imagenet")

class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message says what is valid."""

@dataclass
class ModelConfig:
    name: str = "test_resnet"  # any timm model name
    levels: int = 4  # QCFS quantization levels L
    threshold: float = 8.0  # initial λ of every QCFS (with threshold_init=fixed)
    threshold_init: str = "fixed"  # fixed | data: λ = a percentile of each layer's inputs, where the weights bring no λ
    threshold_percentile: float = 99.9
    activations: list[str] = field(default_factory=lambda: ["relu"])  # groups replaced by QCFS
    cifar_stem: bool = False  # 3×3 stride-1 stem, no stem pooling (ResNet family)
    pretrained: bool = False  # timm weights (needs the hub, or HF_HUB_OFFLINE with a cache)
    checkpoint: str | None = None  # ANN weights (.safetensors) to start from / convert
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs

@dataclass
class DataConfig:
    name: str = "digits"  # digits | imagefolder | cifar10 | cifar100 | imagenet
    root: str | None = None  # folder, or a .tar.gz of an ImageFolder tree
    image_size: int | None = None  # default: 8 digits, 32 CIFAR/imagefolder, 224 imagenet
    batch_size: int = 64  # per process
    eval_batch_size: int = 256  # per process
    num_workers: int = 0
    download: bool = False  # torchvision CIFAR only, needs the internet
    autoaugment: bool = False  # CIFAR policy
    cutout: int = 0  # side of the Cutout square in pixels, 0 = off
    train_subset: int | None = None  # a fixed random subset, for quick runs
    eval_subset: int | None = None

@dataclass
class OptimConfig:
    epochs: int = 10
    optimizer: str = "sgd"  # any timm optimizer name (sgd, adamw, ...)
    lr: float = 0.1  # for the global batch the recipe was written for; not rescaled
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_bias_and_norm: bool = True  # the reference applies weight decay to λ and BN too
    scheduler: str = "cosine"  # any timm scheduler name (cosine, step, ...) or "none"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    max_steps_per_epoch: int | None = None  # cap, for smoke tests
    checkpoint_every_steps: int | None = None  # also checkpoint every N optimizer updates (mid-epoch resume)

@dataclass
class TrainConfig(OptimConfig):
    pass

@dataclass
class SNNConfig:
    timesteps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    chunk_size: int | None = 16  # steps per folded forward at evaluation (memory)
    fold_bn: bool = False
    calibrate: list[str] = field(default_factory=list)  # v(0) calibration: [channel] and/or [layer]
    calibrate_timesteps: list[int] = field(default_factory=lambda: [1, 2, 4])  # one calibrated SNN per T
    calibrate_samples: int = 256  # training images used to calibrate
    stats_timesteps: int = 8  # T of the spike/energy statistics
    stats_samples: int = 64  # eval images used for statistics and per-layer conversion error

@dataclass
class FinetuneConfig(OptimConfig):
    timesteps: int = 2
    epochs: int = 1
    lr: float = 0.01
    weight_decay: float = 0.0
    surrogate: str = "triangle"  # triangle | rectangle | atan | sigmoid
    surrogate_width: float = 1.0  # in units of θ
    learn_threshold: bool = False
    bn: str = "frozen"  # frozen: running stats fixed | train: stats over time-folded batches
    loss: str = "mean"  # mean: CE of the mean output | tet: mean of per-step CEs (Deng et al., 2022)
    timesteps_choices: list[int] = field(default_factory=list)  # draw T per batch from these (one model, several T)
    progressive: list[int] = field(default_factory=list)  # fine-tune at these T first, in order (e.g. [4]), then at timesteps
    distill: float = 0.0  # weight of distillation from the ANN: loss = (1 − distill)·CE + distill·KD
    distill_temperature: float = 2.0

@dataclass
class RunConfig:
    recipe: str = "quickstart"
    stages: list[str] = field(default_factory=lambda: ["train", "convert", "eval", "finetune"])
    seed: int = 0
    output_dir: str = "runs"
    run_dir: str | None = None  # default: <output_dir>/<recipe>-<timestamp>
    resume: bool = False  # continue the run in run_dir from its last checkpoint
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 is a no-op on CPU)
    log_with: list[str] = field(default_factory=list)  # Accelerate trackers, e.g. [tensorboard]
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    snn: SNNConfig = field(default_factory=SNNConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

def _recipe_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"

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
    path = recipe_dir / f"{recipe}.yaml"
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

def _choice(value, valid, key):
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")

def _positive(value, key, allow_zero=False):
    if value is None:
        return
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(f"{key} must be {'≥ 0' if allow_zero else '> 0'}, got {value!r}")

def validate(cfg: RunConfig) -> None:
    """Check values the type system cannot: choices, ranges, stage dependencies."""
    from .neurons import SURROGATES

    if not cfg.stages:
        raise ConfigError(f"stages is empty; choose from: {', '.join(STAGES)}")
    for stage in cfg.stages:
        _choice(stage, STAGES, "stages[]")
    _choice(cfg.data.name, DATASETS, "data.name")
    if cfg.mixed_precision in ("False", "false"):  # YAML reads a bare `no` as the boolean false
        cfg.mixed_precision = "no"
    _choice(cfg.mixed_precision, ("no", "bf16", "fp16"), "mixed_precision")
    _choice(cfg.finetune.surrogate, tuple(SURROGATES), "finetune.surrogate")
    _choice(cfg.finetune.bn, ("frozen", "train"), "finetune.bn")
    _choice(cfg.finetune.loss, ("mean", "tet"), "finetune.loss")
    if not 0 <= cfg.finetune.distill <= 1:
        raise ConfigError(f"finetune.distill must be in [0, 1] (the weight of the distillation term), got {cfg.finetune.distill!r}")
    _positive(cfg.finetune.distill_temperature, "finetune.distill_temperature")
    for t in cfg.finetune.timesteps_choices:
        _positive(t, "finetune.timesteps_choices[]")
    for t in cfg.finetune.progressive:
        _positive(t, "finetune.progressive[]")
    _positive(cfg.model.levels, "model.levels")
    _positive(cfg.model.threshold, "model.threshold")
    _choice(cfg.model.threshold_init, ("fixed", "data"), "model.threshold_init")
    if not 0 < cfg.model.threshold_percentile <= 100:
        raise ConfigError(f"model.threshold_percentile must be in (0, 100], got {cfg.model.threshold_percentile!r}")
    if not cfg.snn.timesteps:
        raise ConfigError("snn.timesteps is empty; give a list of positive step counts, e.g. [1,2,4,8]")
    for t in cfg.snn.timesteps:
        _positive(t, "snn.timesteps[]")
    _positive(cfg.snn.chunk_size, "snn.chunk_size")
    _positive(cfg.snn.stats_timesteps, "snn.stats_timesteps")
    _positive(cfg.snn.calibrate_samples, "snn.calibrate_samples")
    from .calibrate_snn import METHODS

    for method in cfg.snn.calibrate:
        _choice(method, METHODS, "snn.calibrate[]")
    for t in cfg.snn.calibrate_timesteps:
        _positive(t, "snn.calibrate_timesteps[]")
    _positive(cfg.snn.stats_samples, "snn.stats_samples")
    for tracker in cfg.log_with:
        _choice(tracker, ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"), "log_with[]")
    _positive(cfg.finetune.timesteps, "finetune.timesteps")
    _positive(cfg.finetune.surrogate_width, "finetune.surrogate_width")
    for name, opt in (("train", cfg.train), ("finetune", cfg.finetune)):
        _positive(opt.epochs, f"{name}.epochs", allow_zero=True)
        _positive(opt.lr, f"{name}.lr", allow_zero=True)
        _positive(opt.grad_accum_steps, f"{name}.grad_accum_steps")
        _positive(opt.max_steps_per_epoch, f"{name}.max_steps_per_epoch")
        _positive(opt.checkpoint_every_steps, f"{name}.checkpoint_every_steps")
        _positive(opt.weight_decay, f"{name}.weight_decay", allow_zero=True)
    for key in ("batch_size", "eval_batch_size", "train_subset", "eval_subset"):
        _positive(getattr(cfg.data, key), f"data.{key}")
    _positive(cfg.data.num_workers, "data.num_workers", allow_zero=True)
    if cfg.data.name != "digits" and not cfg.data.root:
        raise ConfigError(f"data.name={cfg.data.name} needs data.root (a dataset folder or a .tar.gz of one)")
    needs_ann = {"convert", "eval", "finetune", "export"} & set(cfg.stages)
    if needs_ann and "train" not in cfg.stages and not cfg.model.checkpoint and not cfg.model.pretrained:
        raise ConfigError(
            f"stages {cfg.stages} need a trained ANN: add 'train' to stages or give model.checkpoint=PATH "
            "(e.g. runs/<run>/ann.safetensors)"
        )
    if cfg.resume and not cfg.run_dir:
        raise ConfigError("resume=true needs run_dir=PATH, the run directory to continue")

def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

def from_yaml_file(path: str | Path) -> RunConfig:
    """Load a resolved config written by a run, validated against the schema."""
    schema = OmegaConf.structured(RunConfig)
    cfg = _merge(schema, OmegaConf.load(path), str(path), schema)
    run = OmegaConf.to_object(cfg)
    validate(run)
    return run
