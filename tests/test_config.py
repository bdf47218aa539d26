"""Recipes and overrides are validated against the typed schema before any work."""

import pytest

from qcfs_snntorch.config import ConfigError, RunConfig, list_recipes, load_config


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


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.nmae=x"], r"unknown config key 'model.nmae'.*Did you mean: model.name"),
        (["trian.epochs=3"], r"unknown config key 'trian"),
        (["recipe=nope"], r"unknown recipe 'nope'.*valid recipes: .*quickstart"),
        (["model.levels=four"], r"bad value for 'model.levels'"),
        (["model.levels=0"], r"model.levels must be > 0"),
        (["snn.timesteps=[1,0]"], r"snn.timesteps\[\] must be > 0"),
        (["finetune.timesteps=-2"], r"finetune.timesteps must be > 0"),
        (["stages=[train,deploy]"], r"stages\[\]='deploy' is not valid; choose one of: check, train"),
        (["data.name=mnist"], r"data.name='mnist' is not valid"),
        (["finetune.surrogate=tanh"], r"finetune.surrogate='tanh' is not valid; choose one of: triangle"),
        (["stages=[eval]"], r"need a trained ANN: add 'train' to stages or give model.checkpoint"),
        (["data.name=imagefolder"], r"needs data.root"),
        (["epochs"], r"key.sub=value"),
        (["resume=true"], r"resume=true needs run_dir"),
        (["finetune.distill=1.5"], r"finetune.distill must be in \[0, 1\]"),
        (["finetune.distill_temperature=0"], r"finetune.distill_temperature must be > 0"),
    ],
)
def test_bad_input_is_named_with_valid_choices(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides)


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_builds_a_convertible_model(recipe):
    import qcfs_snntorch as qs

    cfg = load_config([f"recipe={recipe}"])
    classes = {"cifar100": 100, "imagenet": 1000}.get(cfg.data.name, 10)
    model = qs.create_model(cfg.model.name, num_classes=classes, levels=cfg.model.levels,
                            cifar_stem=cfg.model.cifar_stem, **({"in_chans": 1} if cfg.data.name == "digits" else {}))
    report = qs.check(model)
    assert report.convertible, report.summary()
