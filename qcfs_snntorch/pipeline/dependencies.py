"""Which settings each stage's result depends on: the one table resume trusts.

``resume=true`` reuses a stage only when its fingerprint is the one recorded in report.json,
and a stage's fingerprint is built from :data:`NEEDS` and nothing else: the config keys of
its entry (dotted; a section name such as ``"finetune"`` takes every key under it), the
derived facts it names (:data:`DERIVED`), and the digests of the upstream stages it reads
(``after``), so a change reruns the stage that depends on it and every stage after it.

Every key of the schema is either in some stage's entry or in :data:`IRRELEVANT` with the
reason it cannot change a result (a key there is left out of a section a stage names); tests/test_dependencies.py walks the schema and fails on
a key nobody classified, so a new setting cannot silently be left out of resume.

An entry's ``keys`` change the stage's weights or choices; its ``report`` keys change only
what the stage measures and reports afterwards (which T are evaluated, the early-exit menu).
Both rerun the stage, but a training stage's checkpoints stay valid across a ``report``
change (see :func:`checkpoint_fingerprint`): the rerun measures again without retraining.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .fingerprints import digest, pick

__all__ = ["DERIVED", "IRRELEVANT", "NEEDS", "Needs", "checkpoint_fingerprint", "fingerprints", "result_fingerprint", "reusable"]


@dataclass(frozen=True)
class Needs:
    keys: tuple[str, ...]  # settings its weights or choices depend on
    report: tuple[str, ...] = ()  # settings that change only what it measures and reports
    after: tuple[str, ...] = ()  # the stages whose results it reads
    derived: tuple[str, ...] = ()  # names in DERIVED


# Which images each split holds and how they look (decoded, resized, normalised).
IMAGES = ("data.name", "data.root", "data.image_size", "data.in_memory", "data.val_split", "data.split_seed")
# Which training images, in which batches, augmented how: what training (and λ from data, BN statistics) sees.
TRAINING_DATA = (*IMAGES, "data.train_subset", "data.batch_size", "data.autoaugment", "data.cutout")
# The ANN before training: the network, its starting weights, λ (fixed, or from a seeded sample of the training images).
ANN_SOURCE = ("model", "seed", *TRAINING_DATA)
# The early-exit menu and its chosen τ (evaluated with every SNN accuracy table).
EARLY_EXIT = ("snn.early_exit", "snn.early_exit_rule", "snn.early_exit_reference", "snn.early_exit_tolerance")

NEEDS: dict[str, Needs] = {
    # The conversion verdict is a function of the network's layers (classes and channels from the data).
    "check": Needs(keys=("model.name", "model.levels", "model.activations", "model.cifar_stem", "model.kwargs", "snn.strict",
                         "data.name", "data.root")),
    "train": Needs(keys=(*ANN_SOURCE, "train", "mixed_precision"), report=("data.eval_subset",)),
    # Without a train stage the ANN is the model.* one (checkpoint, pretrained weights, λ from data): ANN_SOURCE.
    # finetune.surrogate / learn_threshold / detach_reset shape only gradients (same forward, same state dict): finetune's.
    "convert": Needs(keys=(*ANN_SOURCE, "snn.fold_bn", "snn.max_spikes", "snn.neuron", "snn.strict", "mixed_precision"),
                     report=("data.eval_subset",), after=("train",)),
    # Measurements only (no training, no choice that a later stage reads).
    "eval": Needs(keys=(*IMAGES, "data.eval_subset", "seed", "mixed_precision", "snn.timesteps", "snn.stats_timesteps",
                        "snn.stats_samples", *EARLY_EXIT), after=("convert",)),
    # v(0) is fitted on a seeded sample of the training images; the start of fine-tuning is chosen on validation.
    "calibrate": Needs(keys=(*IMAGES, "data.train_subset", "data.eval_subset", "seed", "mixed_precision", "snn.calibrate",
                             "snn.calibrate_timesteps", "snn.calibrate_samples"),
                       after=("convert",), derived=("finetune_start",)),
    # The kept epoch is chosen on the (data.eval_subset of the) validation split.
    "finetune": Needs(keys=("finetune", "seed", "mixed_precision", *TRAINING_DATA, "data.eval_subset"),
                      report=("snn.timesteps", *EARLY_EXIT), after=("convert", "calibrate")),
    # The graph's nodes; the sample input only gives shapes (data.image_size, through convert).
    "export": Needs(keys=("snn.nir_portable",), after=("convert", "calibrate", "finetune")),
}

# Facts computed from several keys, where a whole key would be too coarse (``stages`` would rerun
# calibration, and so fine-tuning, whenever export is added).
DERIVED: dict[str, Callable] = {
    # Calibration also fits v(0) for fine-tuning's T, chooses the SNN fine-tuning starts from and saves it.
    "finetune_start": lambda cfg: cfg.finetune.timesteps if "finetune" in cfg.stages else None,
}

# Keys that cannot change any stage's result, and why.
IRRELEVANT: dict[str, str] = {
    "recipe": "the recipe's name: what it sets is in the other keys",
    "stages": "which stages run: a stage reads the others through `after` (the digests of those that ran) "
              "and DERIVED facts",
    "output_dir": "where a new run directory is made",
    "run_dir": "where the run directory is",
    "resume": "whether to continue: the question this table answers",
    "log_with": "trackers that receive the metrics",
    "progress_interval": "how often a long stage prints its progress",
    "data.eval_batch_size": "evaluation batch size: evaluation is per image (BN in eval mode)",
    "data.num_workers": "processes that read the data: speed (with per-image random augmentation, which image gets "
                        "which random crop, not the distribution trained on)",
    "data.download": "whether torchvision may fetch CIFAR; the images are the same",
    "snn.chunk_size": "steps per folded forward at evaluation: memory, not the function",
    "train.checkpoint_every_steps": "when checkpoints are written",
    "finetune.checkpoint_every_steps": "when checkpoints are written",
}


def _fingerprint(stage: str, cfg, upstream: dict[str, str], keys: tuple[str, ...]) -> dict:
    needs = NEEDS[stage]
    settings = {key: value for key, value in pick(cfg, keys).items() if key not in IRRELEVANT}  # a section's irrelevant keys
    return {**settings, **{name: DERIVED[name](cfg) for name in needs.derived},
            "after": {name: upstream[name] for name in needs.after if name in upstream}}


def result_fingerprint(stage: str, cfg, upstream: dict[str, str]) -> dict:
    """What ``stage``'s result depends on: its keys, report keys and derived facts, and the digests of
    the stages it reads from (``upstream``: the digests of the stages this run has, so far)."""
    return _fingerprint(stage, cfg, upstream, (*NEEDS[stage].keys, *NEEDS[stage].report))


def checkpoint_fingerprint(stage: str, cfg, upstream: dict[str, str]) -> dict:
    """What a training stage's checkpoints depend on: its result fingerprint less the ``report`` keys."""
    return _fingerprint(stage, cfg, upstream, NEEDS[stage].keys)


def fingerprints(cfg, wanted: list[str]) -> dict[str, dict]:
    """The result fingerprint of every wanted stage (in run order): a function of the config alone."""
    digests: dict[str, str] = {}
    out = {}
    for name in wanted:
        out[name] = result_fingerprint(name, cfg, digests)
        digests[name] = digest(out[name])
    return out


def reusable(now: dict[str, dict], saved: dict[str, dict | None]) -> dict[str, bool]:
    """``{stage: reusable}``: a stage is reused when its recorded fingerprint (``saved``, None: it never
    completed) is today's and no stage it reads from reruns."""
    rerun: set[str] = set()
    out = {}
    for name, fingerprint in now.items():
        out[name] = saved.get(name) == fingerprint and not rerun & set(NEEDS[name].after)
        if not out[name]:
            rerun.add(name)
    return out
