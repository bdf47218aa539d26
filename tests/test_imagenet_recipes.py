"""The ImageNet recipes on CPU: pretrained start, every stage, on a tiny ImageNet-layout tree made here.

The recipes run as written except for what a 2-core CPU in CI needs: one step per epoch and
one epoch per training stage, small images (data.image_size=72 keeps the ImageNet transforms:
random resized crop for training, resize + centre crop for evaluation), small batches, few
and small T (fine-tuning at T = 2), no worker processes, no mixed precision (bf16 on a CPU
gives NaN gradients in torch 2.14.1, docs/TROUBLESHOOTING.md). timm's pretrained weights come
from a file this test writes (model.pretrained_file), since CI has no Hugging Face hub.
"""

import json
import shutil

import pytest
import safetensors.torch
import timm
import torch

from qcfs_snntorch import ModelError, create_model
from qcfs_snntorch.config import ConfigError, load_config
from qcfs_snntorch.data import build_datasets, train_loader
from qcfs_snntorch.pipeline import run

CLASSES = ("n01440764", "n01443537", "n01484850")
RECIPES = {"resnet34_imagenet": "resnet34", "vgg16_imagenet": "vgg16_bn"}
CI = [  # what a CPU in CI needs; everything else comes from the recipe
    "mixed_precision=no", "data.image_size=72", "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0",
    "data.eval_subset=2", "train.epochs=1", "train.max_steps_per_epoch=1", "finetune.epochs=1",
    "finetune.max_steps_per_epoch=1", "finetune.timesteps=2", "snn.timesteps=[1,2]", "snn.calibrate_timesteps=[2]",
    "snn.calibrate_samples=2", "snn.stats_samples=1", "snn.stats_timesteps=2",
]


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    """train/ and val/ with one folder per class (ImageNet's synset names), small JPEGs of varied sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = 40 + 4 * i, 48 - 2 * i
                pixels = (torch.rand(h, w, 3, generator=gen) * 80 + 60 * c).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{name}_{i}.JPEG", quality=90)
    return root


def timm_weights(path, name: str, fmt: str = "safetensors"):
    """A timm model's own ImageNet-shaped state dict (1000 classes) in a file, as a hub download would be."""
    torch.manual_seed(1)
    state = timm.create_model(name, num_classes=1000).state_dict()
    if fmt == "safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    return state


def test_imagenet_recipes_start_from_pretrained_weights_by_default():
    for recipe in RECIPES:
        cfg = load_config([f"recipe={recipe}"])
        assert cfg.model.pretrained and cfg.model.threshold_init == "data", recipe
        assert cfg.stages == ["train", "convert", "eval", "calibrate", "finetune"]
        assert cfg.train.epochs <= 12 and cfg.data.val_split <= 0.01
        scratch = load_config([f"recipe={recipe}", "model.pretrained=false", "train.epochs=120", "train.lr=0.1",
                               "model.threshold_init=fixed"])  # the from-scratch override the recipe documents
        assert not scratch.model.pretrained and scratch.train.epochs == 120


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 8 workers on a 2-core machine: built, never started
def test_imagenet_recipes_feed_gpus_with_persistent_pinned_workers(imagenet_tree):
    """The loader settings the recipes document for 8 GPUs: worker processes kept between epochs, pinned memory."""
    for recipe in RECIPES:
        cfg = load_config([f"recipe={recipe}", f"data.root={imagenet_tree}"])
        assert cfg.data.num_workers >= 8, recipe
        loader = train_loader(build_datasets(cfg.data, cfg.seed), cfg.data, torch.device("cuda"))  # no CUDA needed to build it
        assert loader.num_workers == cfg.data.num_workers and loader.persistent_workers and loader.pin_memory
        assert loader.drop_last and loader.batch_size == cfg.data.batch_size


def test_the_run_starts_from_exactly_the_weights_in_the_file(imagenet_tree, tmp_path):
    """resnet34_imagenet with train.epochs=0: ann.safetensors holds the file's weights, bit for bit (the classifier,
    of another size, is new; λ comes from data), whether the file is .safetensors or timm's .pth."""
    for fmt in ("safetensors", "pth"):
        weights = tmp_path / f"resnet34.{fmt}"
        state = timm_weights(weights, "resnet34", fmt)
        out = tmp_path / f"run_{fmt}"
        cfg = load_config(["recipe=resnet34_imagenet", f"data.root={imagenet_tree}", f"model.pretrained_file={weights}",
                           f"run_dir={out}", "stages=[train]", *CI, "train.epochs=0"])
        run(cfg)
        saved = safetensors.torch.load_file(out / "ann.safetensors")
        body = [key for key in state if not key.startswith("fc.")]
        assert body and all(torch.equal(saved[key], state[key]) for key in body)
        assert saved["fc.weight"].shape == (len(CLASSES), 512)
        thresholds = [value for key, value in saved.items() if key.endswith(".threshold")]
        assert thresholds and all(0 < t.item() != 8.0 for t in thresholds)  # from data, not the fixed 8.0


def test_a_missing_hub_or_file_says_which_to_use(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(ModelError, match=r"does not exist.*model.pretrained=true"):
        create_model("test_resnet", num_classes=3, pretrained_file=str(tmp_path / "missing.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without the hub
    with pytest.raises(ModelError, match=r"model.pretrained_file=PATH"):
        create_model("test_resnet", num_classes=3, pretrained=True)
    with pytest.raises(ConfigError, match=r"need a trained ANN"):
        load_config(["recipe=resnet34_imagenet", "model.pretrained=false", "stages=[convert]"])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_stage_of_the_imagenet_recipe_runs_on_cpu(recipe, imagenet_tree, tmp_path):
    weights = tmp_path / "weights.safetensors"
    timm_weights(weights, RECIPES[recipe])
    out = tmp_path / "run"
    report = run(load_config([f"recipe={recipe}", f"data.root={imagenet_tree}", f"model.pretrained_file={weights}",
                              f"run_dir={out}", *CI]))
    assert report["status"] == "complete"
    assert set(report["stages"]) == {"train", "convert", "eval", "calibrate", "finetune"}
    assert report["dataset"] == "imagenet" and report["model"] == RECIPES[recipe]
    assert report["splits"]["train"] == 4 * len(CLASSES)  # 1% of 4 images per class rounds to none held out
    assert report["calibration"]["timesteps"] == [2] and report["finetune"]["timesteps"] == 2
    for name in ("ann.safetensors", "calibrated.safetensors", "snn.safetensors", "log.txt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["status"] == "complete"
    shutil.rmtree(out / "checkpoints")  # VGG-16's weights and checkpoints are 3.5 GB: not left for pytest to keep
    for path in (weights, *out.glob("*.safetensors")):
        path.unlink()
