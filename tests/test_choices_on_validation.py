"""Every choice a run makes looks at the validation split, never at the test split.

The same tiny quickstart run twice: once as is, once with the test split's images replaced
by noise and its labels shuffled. Every choice (the early-exit τ and the split it was chosen
on, calibrated or plain start of fine-tuning, the fine-tuning epoch kept, and any key added
later under one of the names in CHOICES) must come out identical, as must every validation
number the choices were made on; the test accuracies must not (the swap took effect).
"""

import pytest
import torch
from torch.utils.data import Dataset

import qcfs_snntorch.pipeline.setup as pipeline_setup
from qcfs_snntorch.config import load_config
from qcfs_snntorch.pipeline import run

pytestmark = pytest.mark.slow  # two whole (tiny) runs

# Report keys that record a choice; a new choice should use one of these names (or be added here).
CHOICES = frozenset({"chosen", "chosen_on", "kept", "kept_epoch", "finetune_start"})

ARGS = [
    "recipe=quickstart", "stages=[train,convert,eval,finetune]", "seed=0",
    "train.epochs=3", "train.max_steps_per_epoch=10", "finetune.epochs=2", "finetune.max_steps_per_epoch=4",
    "snn.timesteps=[1,2,4]", "snn.calibrate_timesteps=[2]", "snn.early_exit_reference=4", "snn.stats_samples=8",
]


class ScrambledTest(Dataset):
    """The test split with noise for images and shuffled labels: nothing in it says anything about the model."""

    def __init__(self, base: Dataset, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        images = torch.stack([base[i][0] for i in range(len(base))])
        labels = torch.tensor([int(base[i][1]) for i in range(len(base))])
        self.images = torch.randn(images.shape, generator=generator)
        self.labels = labels[torch.randperm(len(labels), generator=generator)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def choices(report, where: str = "") -> dict:
    """``{path: value}`` of every choice in the report and every validation number (what choices look at)."""
    found = {}
    if isinstance(report, dict):
        for key, value in report.items():
            path = f"{where}.{key}" if where else key
            if key in CHOICES:
                found[path] = {k: v for k, v in value.items() if k != "test"} if isinstance(value, dict) else value
            elif key.startswith("val"):
                found[path] = value
            else:
                found.update(choices(value, path))
    elif isinstance(report, list):
        for i, value in enumerate(report):
            found.update(choices(value, f"{where}[{i}]"))
    return found


def test_no_choice_looks_at_the_test_split(tmp_path, monkeypatch):
    plain = run(load_config([*ARGS, f"run_dir={tmp_path / 'plain'}"]))

    build = pipeline_setup.build_datasets

    def scrambled(cfg, seed=0):
        splits = build(cfg, seed=seed)
        splits.test = ScrambledTest(splits.test)
        return splits

    monkeypatch.setattr(pipeline_setup, "build_datasets", scrambled)
    blind = run(load_config([*ARGS, f"run_dir={tmp_path / 'blind'}"]))

    assert plain["snn"]["top1"] != blind["snn"]["top1"]  # the test split really changed
    made = choices(plain)
    # the run made each kind of choice, on the validation split
    assert {"snn.early_exit.chosen", "calibration.finetune_start", "finetune.kept_epoch"} <= set(made), sorted(made)
    assert made["snn.early_exit.chosen"] is not None and made["snn.early_exit.chosen"]["chosen_on"] == "val"
    assert choices(blind) == made
