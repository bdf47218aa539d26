"""Recipes and overrides are validated against the typed schema before any work.

The table test at the bottom gives every key of the schema one invalid value and checks
that it is refused with a ConfigError that names the key; keys that name things outside
the config (a timm model, files) are refused where they are used, before any work
(tests/test_cli.py runs those through the command line).
"""

from pathlib import Path

import pytest

from qcfs_snntorch.config import (
    CALIBRATION_METHODS,
    CHECKED_WHEN_USED,
    EARLY_EXIT_RULES,
    RULES,
    SCHEDULER_NAMES,
    SURROGATE_NAMES,
    ConfigError,
    RunConfig,
    list_recipes,
    load_config,
    schema_keys,
)


def test_default_recipe_is_quickstart_on_digits():
    cfg = load_config([])
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe == "quickstart" and cfg.data.name == "digits"
    assert cfg.stages == ["train", "convert", "eval", "finetune", "export"]


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_loads(recipe):
    cfg = load_config([f"recipe={recipe}"])
    assert cfg.recipe == recipe


def test_overrides_are_typed():
    cfg = load_config(["model.name=resnet34", "model.levels=8", "snn.timesteps=[1,2]", "stages=[convert,eval]",
                       "model.checkpoint=x.safetensors", "train.lr=0.02", "model.kwargs={drop_rate: 0.1}"])
    assert cfg.model.levels == 8 and cfg.snn.timesteps == [1, 2] and cfg.train.lr == 0.02
    assert cfg.model.kwargs == {"drop_rate": 0.1}


def test_mixed_precision_no_survives_yaml_reading_it_as_false():
    assert load_config(["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(["recipe=resnet18_cifar10", "mixed_precision=no"]).mixed_precision == "no"


def test_a_recipe_file_path_is_a_recipe(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model:\n  levels: 6\n")
    cfg = load_config([f"recipe={recipe}"])
    assert cfg.model.levels == 6 and cfg.recipe == str(recipe)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.nmae=x"], r"unknown config key 'model.nmae'.*Did you mean: model.name"),
        (["trian.epochs=3"], r"unknown config key 'trian"),
        (["recipe=nope"], r"unknown recipe 'nope'.*valid recipes: .*quickstart"),
        (["model.levels=four"], r"bad value for 'model.levels'"),
        (["snn.timesteps=[1,0]"], r"snn.timesteps\[\]=0 is not valid: an integer ≥ 1"),
        (["stages=[train,deploy]"], r"stages\[\]='deploy' is not valid; choose one of: check, train"),
        (["finetune.surrogate=tanh"], r"finetune.surrogate='tanh' is not valid; choose one of: triangle"),
        (["snn.neuron=lif"], r"snn.neuron=.lif. is not valid; choose one of: if, signed"),
        (["stages=[eval]"], r"need a trained ANN: add 'train' to stages or give model.checkpoint"),
        (["data.name=imagefolder"], r"needs data.root"),
        (["epochs"], r"key.sub=value"),
        (["resume=true"], r"resume=true needs run_dir"),
        (["train.optimizer=sgdd"], r"closest timm optimizers: sgd"),
        (["train.momentum=0"], r"timm cannot build train.optimizer='sgd' with train.momentum=0.0"),
        (["train.warmup_epochs=40"], r"train.warmup_epochs=40 is more than train.epochs=30"),
        (["data.autoaugment=true"], r"digits .* has none"),
        (["data.name=imagefolder", "data.root=x", "data.cutout=40"], r"data.cutout=40 is larger than the 32-pixel images"),
        (["stages=[train,calibrate]", "snn.calibrate=[]"], r"stages has calibrate but snn.calibrate is empty"),
        (["snn.timesteps=[]"], r"snn.timesteps is empty"),
        (["train.epochs=5", "train.relu_epochs=5"], r"train.relu_epochs=5 leaves no QCFS epoch of train.epochs=5"),
    ],
)
def test_bad_input_is_named_with_valid_choices(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides)


# One invalid value for every key a rule checks (the rule's own key may be inside a list: key[]).
INVALID = {
    "stages": "[]", "seed": "-1", "resume": None, "mixed_precision": "fp8", "log_with": "[nope]", "progress_interval": "0",
    "model.levels": "0", "model.threshold": "0", "model.threshold_init": "random", "model.threshold_percentile": "0",
    "model.cifar_stem": None, "model.pretrained": None,
    "data.name": "mnist", "data.image_size": "4", "data.batch_size": "0", "data.eval_batch_size": "0",
    "data.num_workers": "-1", "data.download": None, "data.autoaugment": None, "data.cutout": "-1",
    "data.val_split": "1.0", "data.split_seed": "-1", "data.train_subset": "0", "data.eval_subset": "0", "data.in_memory": None,
    "train.levels_choices": "[0]", "train.relu_epochs": "-1", "train.threshold_gradient": "adam",
    "snn.timesteps": "[0]", "snn.chunk_size": "0", "snn.fold_bn": None, "snn.strict": None, "snn.calibrate": "[pixel]",
    "snn.calibrate_timesteps": "[0]", "snn.calibrate_samples": "0", "snn.stats_timesteps": "0", "snn.stats_samples": "0",
    "snn.nir_portable": None,
    "snn.max_spikes": "0", "snn.neuron": "bipolar", "snn.early_exit": "[1.5]", "snn.early_exit_rule": "entropy", "snn.early_exit_reference": "0",
    "snn.early_exit_tolerance": "-0.1",
    "finetune.timesteps": "0", "finetune.surrogate": "tanh", "finetune.surrogate_width": "0",
    "finetune.learn_threshold": None, "finetune.detach_reset": None, "finetune.bn": "batch", "finetune.loss": "hinge", "finetune.timesteps_choices": "[0]",
    "finetune.progressive": "[-4]", "finetune.distill": "1.5", "finetune.keep": "first", "finetune.distill_temperature": "0",
    "finetune.tet_weight": "1.0", "finetune.tet_target": "1e9",
}
OPTIM_INVALID = {
    "epochs": "-1", "optimizer": "sgdd", "lr": "-0.1", "momentum": "1.0", "weight_decay": "-1",
    "decay_bias_and_norm": None, "scheduler": "plateau", "warmup_epochs": "-1", "label_smoothing": "5",
    "grad_accum_steps": "0", "max_grad_norm": "0", "max_steps_per_epoch": "0", "checkpoint_every_steps": "0",
}
for _section in ("train", "finetune"):
    INVALID.update({f"{_section}.{key}": value for key, value in OPTIM_INVALID.items()})
TYPED_ONLY = {key for key, value in INVALID.items() if value is None}  # booleans: the schema's type is the rule


def test_every_schema_key_has_a_rule_and_an_invalid_value():
    keys = set(schema_keys())
    assert keys == set(RULES) | CHECKED_WHEN_USED, "a key without a rule (or a rule without a key)"
    assert set(RULES) == set(INVALID), "every rule needs an invalid value in this table"


@pytest.mark.parametrize("key", sorted(k for k in INVALID if k not in TYPED_ONLY))
def test_each_key_refuses_an_invalid_value(key):
    with pytest.raises(ConfigError) as err:
        load_config([f"{key}={INVALID[key]}"])
    assert key.split(".")[-1] in str(err.value), str(err.value)


@pytest.mark.parametrize("key", sorted(TYPED_ONLY))
def test_booleans_refuse_other_types(key):
    with pytest.raises(ConfigError, match=key):
        load_config([f"{key}=maybe"])


def test_choice_tables_match_the_package():
    """config.py imports nothing of the package, so its tables of names are checked here."""
    from qcfs_snntorch.calibration import METHODS
    from qcfs_snntorch.early_exit import RULES
    from qcfs_snntorch.neurons import SURROGATES
    from qcfs_snntorch.training import SCHEDULERS

    assert EARLY_EXIT_RULES == RULES
    assert set(SURROGATE_NAMES) == set(SURROGATES)
    assert set(CALIBRATION_METHODS) == set(METHODS)
    assert SCHEDULER_NAMES == SCHEDULERS


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_builds_a_convertible_model(recipe):
    import qcfs_snntorch as qs

    cfg = load_config([f"recipe={recipe}"])
    classes = {"cifar100": 100, "imagenet": 1000}.get(cfg.data.name, 10)
    model = qs.create_model(cfg.model.name, num_classes=classes, levels=cfg.model.levels,
                            cifar_stem=cfg.model.cifar_stem, **({"in_chans": 1} if cfg.data.name == "digits" else {}))
    report = qs.check(model)
    assert report.convertible, report.summary()


def test_the_package_has_one_version():
    """pyproject.toml and ``qcfs_snntorch.__version__`` must agree (the build reads the attribute)."""
    from setuptools.config.pyprojecttoml import read_configuration

    import qcfs_snntorch

    root = Path(__file__).resolve().parent.parent
    built = read_configuration(root / "pyproject.toml", expand=True)["project"]["version"]
    assert built == qcfs_snntorch.__version__


def test_every_path_valued_key_is_checked_for_existence_and_kind():
    """The keys checked where they are used that hold paths are all in pipeline/paths.py's table."""
    from qcfs_snntorch.pipeline.paths import PATH_RULES

    not_paths = {"recipe", "model.name", "model.activations", "model.kwargs"}  # recipe files: load_config checks them
    assert set(PATH_RULES) == CHECKED_WHEN_USED - not_paths
