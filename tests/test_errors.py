"""Bad input and failures during training: a clear one-paragraph error, exit code 2, no traceback
(unless QCFS_SNNTORCH_TRACEBACK=1), and nothing half-written or wrongly kept."""

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qcfs_snntorch as qs
from qcfs_snntorch.config import ConfigError, DataConfig, FinetuneConfig, TrainConfig
from qcfs_snntorch.data import DataError, build_datasets
from qcfs_snntorch.training import (
    CheckpointDir,
    CheckpointError,
    TrainingDiverged,
    TrainingOutOfMemory,
    TrainingSetupError,
    fit,
    load_weights,
    make_accelerator,
    save_weights,
)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "launch.py", *args], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def list_checkpoints(path):
    return CheckpointDir(path).list()


def latest_checkpoint(path):
    return CheckpointDir(path).latest()


def loader(n=96, batch=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)


def tiny_model():
    torch.manual_seed(0)
    return qs.create_model("test_resnet", num_classes=10, in_chans=1, threshold=2.0)


def config(cls=TrainConfig, every=None, **kwargs):
    cfg = cls(**{"epochs": 1, "lr": 0.05, **kwargs})
    cfg.checkpoint_every_steps = every  # until config.py declares it, fit reads it with getattr
    return cfg


class FailAt(nn.Module):
    """Wraps a model; its forward pass number ``at`` (1-based) fails with ``make()`` or returns NaN."""

    def __init__(self, model, at, make=None):
        super().__init__()
        self.model, self.at, self.make, self.calls = model, at, make, 0

    def forward(self, x):
        self.calls += 1
        out = self.model(x)
        if self.calls == self.at:
            if self.make is not None:
                raise self.make()
            return out * float("nan")
        return out


# --- non-finite loss -----------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    model = FailAt(tiny_model(), at=4)
    with pytest.raises(TrainingDiverged) as err:
        fit(model, loader(), cfg=config(every=1, max_steps_per_epoch=6), accelerator=make_accelerator(),
            checkpoints=tmp_path, log=lambda m: None, label="ANN")
    message = str(err.value)
    assert "the loss is nan at epoch 1/1, step 4/6" in message
    assert str(tmp_path / "step_00000003") in message and "train.lr" in message and "resume=true" in message
    # nothing was saved for the bad step; the checkpoint before it is intact and finite
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "step_00000003" and state["step"] == 3
    assert not list(tmp_path.glob(".*.partial"))
    assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


def test_nan_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(TrainingDiverged, match="no checkpoint yet"):
        fit(FailAt(tiny_model(), at=1), loader(), cfg=config(FinetuneConfig), accelerator=make_accelerator(),
            checkpoints=tmp_path, log=lambda m: None)
    assert list_checkpoints(tmp_path) == []


def test_huge_learning_rate_through_launch(tmp_path):
    run = tmp_path / "run"
    result = launch("stages=[train]", "train.epochs=1", "train.max_steps_per_epoch=6", "train.lr=1e30", f"run_dir={run}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: [ANN] ") and "step" in error and "train.lr (now 1e+30)" in error
    assert not (run / "ann.safetensors").exists()
    for path, _ in list_checkpoints(run / "checkpoints" / "ann"):  # whatever was kept is finite
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


# --- out of memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, key", [(TrainConfig, "train"), (FinetuneConfig, "finetune")])
def test_out_of_memory_suggests_a_smaller_batch_with_accumulation(tmp_path, cls, key):
    oom = lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")  # noqa: E731
    with pytest.raises(TrainingOutOfMemory) as err:
        fit(FailAt(tiny_model(), at=2, make=oom), loader(batch=16), cfg=config(cls, grad_accum_steps=2),
            accelerator=make_accelerator(), checkpoints=tmp_path, log=lambda m: None, name=key)
    message = str(err.value)
    assert "out of memory" in message and "step 2/" in message
    assert f"data.batch_size=8 {key}.grad_accum_steps=4" in message and "global batch of 32" in message
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_out_of_memory_while_evaluating(tmp_path):
    def evaluate(model):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(TrainingOutOfMemory, match="data.eval_batch_size"):
        fit(tiny_model(), loader(), cfg=config(max_steps_per_epoch=1), accelerator=make_accelerator(),
            checkpoints=tmp_path, evaluate=evaluate, log=lambda m: None)


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    """The OOM advice must hold: batch 16 × 2 accumulated steps = one batch of 32 (no BN, plain SGD)."""

    def run(batch, accum):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        fit(model, loader(batch=batch), cfg=config(grad_accum_steps=accum, weight_decay=0.0, scheduler="none"),
            accelerator=make_accelerator(), checkpoints=tmp_path / f"{batch}", log=lambda m: None)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.allclose(run(32, 1), run(16, 2), atol=1e-6)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"optimizer": "sgdd"}, "closest timm optimizers: sgd"),
        ({"momentum": 0.0}, "train.optimizer='sgd' (momentum=0.0)"),
        ({"scheduler": "plateau"}, "train.scheduler='plateau'"),
    ],
)
def test_bad_optimizer_or_schedule_is_a_setup_error(tmp_path, setting, message):
    with pytest.raises(TrainingSetupError, match=re.escape(message)):
        fit(tiny_model(), loader(), cfg=config(**setting), accelerator=make_accelerator(), checkpoints=tmp_path, log=lambda m: None)


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not a readable safetensors file"), (b"PK\x03\x04 a torch.save zip", "not a readable safetensors file"), (None, "truncated")],
)
def test_corrupt_checkpoint_file(tmp_path, content, message):
    path = tmp_path / "ann.safetensors"
    if content is None:  # a real file cut short
        save_weights(tiny_model(), path)
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_weights(tiny_model(), path)


def test_checkpoint_from_another_model(tmp_path):
    path = tmp_path / "ann.safetensors"
    save_weights(qs.create_model("test_resnet", num_classes=5, in_chans=1), path, {"model": "test_resnet", "levels": 4})
    with pytest.raises(CheckpointError) as err:
        load_weights(tiny_model(), path)
    assert "does not fit" in str(err.value) and "with other shapes" in str(err.value)
    assert 'model="test_resnet"' in str(err.value)  # what the file says it holds
    with pytest.raises(CheckpointError, match="is a folder"):
        load_weights(tiny_model(), tmp_path)


def test_damaged_training_checkpoint_is_not_resumed_silently(tmp_path):
    fit(tiny_model(), loader(), cfg=config(every=2, max_steps_per_epoch=6), accelerator=make_accelerator(),
        checkpoints=tmp_path, log=lambda m: None)
    (older, _), (latest, _) = list_checkpoints(tmp_path)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CheckpointError) as err:
        fit(tiny_model(), loader(), cfg=config(every=2, max_steps_per_epoch=6), accelerator=make_accelerator(),
            checkpoints=tmp_path, resume=True, log=lambda m: None)
    assert str(latest) in str(err.value) and f"delete it to resume from {older}" in str(err.value)


def test_resuming_with_another_model_is_a_clear_error(tmp_path):
    fit(tiny_model(), loader(), cfg=config(max_steps_per_epoch=1), accelerator=make_accelerator(),
        checkpoints=tmp_path, log=lambda m: None)
    other = qs.create_model("test_resnet", num_classes=7, in_chans=1)
    with pytest.raises(CheckpointError, match="could not be loaded"):
        fit(other, loader(classes=7), cfg=config(max_steps_per_epoch=1), accelerator=make_accelerator(),
            checkpoints=tmp_path, resume=True, log=lambda m: None)


# --- data ----------------------------------------------------------------------------------------


def image_tree(root: Path, splits: dict[str, int]) -> Path:
    """An ImageFolder tree: {split/class: number of PNG images}."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for folder, count in splits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8)).save(root / folder / f"{i}.png")
    return root


LAYOUTS = {
    "empty folder": {},
    "classes but no train/": {"cat": 2, "dog": 2},
    "train/ without images": {"train/cat": 0, "val/cat": 2},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_wrongly_laid_out_data_root_through_launch(tmp_path, layout):
    root = image_tree(tmp_path / "data", LAYOUTS[layout])
    out = tmp_path / "runs"
    result = launch("data.name=imagefolder", f"data.root={root}", f"output_dir={out}", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and str(root) in error[0]
    assert not out.exists() or not any(out.iterdir()), "no run directory may be left behind"


@pytest.mark.parametrize(
    "layout",
    [
        "empty folder",
        "classes but no train/",
        "train/ without images",
    ],
)
def test_data_error_says_the_expected_layout(tmp_path, layout):
    root = image_tree(tmp_path / "data", LAYOUTS[layout])
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(name="imagefolder", root=str(root)))
    assert "train/<class>/<image>" in str(err.value)


def test_traceback_on_request(tmp_path):
    result = launch("data.name=imagefolder", f"data.root={tmp_path}", f"output_dir={tmp_path / 'runs'}",
                    env={"QCFS_SNNTORCH_TRACEBACK": "1"}, timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr and "DataError" in result.stderr


# --- every user error is reported, not thrown ----------------------------------------------------


def test_every_user_error_class_is_caught_by_launch():
    """Every exception class the package defines is a user error that launch.py reports in one paragraph."""
    from qcfs_snntorch.pipeline.cli import USER_ERRORS

    defined = set()
    for info in pkgutil.walk_packages(qs.__path__, prefix="qcfs_snntorch."):
        module = importlib.import_module(info.name)
        defined |= {
            obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == module.__name__
            and not obj.__name__.startswith("_")  # private ones are caught where they are raised
        }
    assert {ConfigError, DataError, CheckpointError, TrainingDiverged, TrainingOutOfMemory} <= defined
    missing = {cls.__qualname__ for cls in defined if not issubclass(cls, USER_ERRORS)}
    assert not missing, f"not in cli.USER_ERRORS (a user would see a traceback): {sorted(missing)}"


# -- path-valued settings: existence and kind, before any work -------------------------------------------------------

def _paths(tmp_path: Path) -> dict[str, Path]:
    """A plain file, a folder, a .tar.gz of an ImageFolder-like tree, and a path below a file."""
    import tarfile

    tmp_path.mkdir(parents=True, exist_ok=True)
    file, folder = tmp_path / "weights.safetensors", tmp_path / "folder"
    file.write_bytes(b"not really weights")
    (folder / "train" / "a").mkdir(parents=True)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="data")
    return {"file": file, "folder": folder, "archive": archive, "below_file": file / "sub"}


@pytest.mark.parametrize("key, kind, found, valid", [
    ("data.root", "file", "it is a file", "a dataset folder"),  # a file where a folder (or archive) is needed
    ("run_dir", "file", "it is a file", "a folder"),
    ("output_dir", "below_file", "above it is a file", "a folder"),
    ("model.checkpoint", "folder", "it is a folder", "a .safetensors file"),  # a folder where a file is needed
    ("model.pretrained_file", "folder", "it is a folder", ".pth file"),
    ("model.checkpoint", "missing", "does not exist", "a .safetensors file"),
])
def test_a_path_of_the_wrong_kind_is_refused_naming_key_path_and_what_is_valid(tmp_path, key, kind, found, valid):
    from qcfs_snntorch.config import load_config
    from qcfs_snntorch.pipeline.paths import check_paths

    path = _paths(tmp_path).get(kind, tmp_path / "missing")
    cfg = load_config(["data.name=imagefolder", f"data.root={_paths(tmp_path / 'ok')['archive']}", f"{key}={path}"])
    with pytest.raises(ConfigError) as caught:
        check_paths(cfg)
    message = str(caught.value)
    assert message.startswith(f"{key}=") and str(path) in message and found in message and valid in message


def test_paths_of_the_right_kind_pass(tmp_path):
    from qcfs_snntorch.config import load_config
    from qcfs_snntorch.pipeline.paths import check_paths

    paths = _paths(tmp_path)
    for root in (paths["archive"], paths["folder"]):  # data.root: an ImageFolder tree or a .tar.gz of one
        check_paths(load_config(["data.name=imagefolder", f"data.root={root}", f"model.checkpoint={paths['file']}",
                                 f"run_dir={tmp_path / 'new' / 'run'}"]))
    with pytest.raises(ConfigError, match="torchvision's CIFAR folder"):  # torchvision's CIFAR reads a folder only
        check_paths(load_config(["data.name=cifar10", f"data.root={paths['archive']}"]))


@pytest.mark.parametrize("kind, key, found", [("file", "run_dir", "it is a file"),
                                              ("below_file", "output_dir", "above it is a file"),
                                              ("folder", "model.pretrained_file", "it is a folder")])
def test_a_wrong_kind_of_path_through_launch_is_one_clear_error(tmp_path, kind, key, found):
    path = _paths(tmp_path)[kind]
    before = sorted(tmp_path.rglob("*"))
    result = launch(f"{key}={path}", "train.epochs=1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: {key}=" in result.stderr and found in result.stderr
    assert sorted(tmp_path.rglob("*")) == before, "nothing is created before the refusal"


def test_a_network_that_moves_the_batch_dimension_is_refused_before_training(tmp_path):
    root = image_tree(tmp_path / "data", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2})  # RGB: csatv2's stem wants 3 channels
    out = tmp_path / "runs"
    result = launch("model.name=csatv2", "model.activations=[relu,gelu,silu]", "data.name=imagefolder", f"data.root={root}",
                    "data.image_size=64", f"output_dir={out}", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "csatv2" in result.stderr.lower() and "batch in dim 0" in result.stderr and ".attn.attn: matmul" in result.stderr
    assert not out.exists() or not any(out.iterdir()), "no run directory may be left behind"
