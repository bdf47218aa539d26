"""data.in_memory: small images decoded once into a uint8 tensor, whole batches augmented on the device."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from qcfs_snntorch.config import ConfigError, DataConfig, load_config
from qcfs_snntorch.data import CIFAR_MEAN, CIFAR_STD, BatchAugment, build_datasets, labels_of, train_loader
from qcfs_snntorch.pipeline import run
from qcfs_snntorch.training import make_accelerator


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An ImageFolder tree of 32×32 images: JPEGs, and PNGs in one class (decoded one at a time)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("small")
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 20), ("test", 6)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(32, 32, 3, generator=gen) * 120 + 60 * c).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / (f"{i}.png" if c == 2 else f"{i}.jpg"), quality=90)
    return root


def _data(root, **overrides) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), batch_size=8, val_split=0.2, **overrides)


def test_evaluation_items_are_those_of_the_per_image_transforms(tree):
    on_disk, in_memory = build_datasets(_data(tree), seed=3), build_datasets(_data(tree, in_memory=True), seed=3)
    assert on_disk.augment is None and in_memory.augment is not None
    for split in ("calibration", "val", "test"):
        a, b = getattr(on_disk, split), getattr(in_memory, split)
        assert len(a) == len(b) and labels_of(a) == labels_of(b)
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]), (split, i)
    assert labels_of(on_disk.train) == labels_of(in_memory.train)
    image, _ = in_memory.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)


def _candidates(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image and its mirror: what a random crop + flip may return."""
    padded = F.pad(image, (padding,) * 4)
    size = image.shape[-1]
    crops = [padded[:, y : y + size, x : x + size] for y, x in itertools.product(range(2 * padding + 1), repeat=2)]
    return crops + [c.flip(-1) for c in crops]


def test_batch_augmentation_is_a_random_crop_and_flip_of_each_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 6, 6), dtype=torch.uint8, generator=gen)
    augment = BatchAugment(CIFAR_MEAN, CIFAR_STD, padding=1)
    torch.manual_seed(0)
    out = augment(images)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    seen = set()
    for image, result in zip(images, out):
        matches = [k for k, c in enumerate(_candidates(image, 1)) if torch.allclose((c.float() / 255 - mean) / std, result)]
        assert matches, "not a crop or a flipped crop of its image"
        seen.add(matches[0])
    assert len(seen) == 18  # all 9 offsets, flipped and not


def test_cutout_zeroes_one_square_at_most_its_size():
    images = torch.full((200, 3, 16, 16), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    out = BatchAugment((0.0,) * 3, (1.0,) * 3, padding=0, cutout=6)(images)
    zero = (out == 0).all(1)  # [B, H, W]
    assert zero.any(0).any() and not zero.all()
    for mask in zero:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        if len(rows):  # a rectangle (clipped by the border), no larger than 6×6
            assert mask.sum() == len(rows) * len(cols) and len(rows) <= 6 and len(cols) <= 6


def test_prepared_loader_augments_on_the_device_and_resumes_mid_epoch(tree):
    """What the training loop relies on: Accelerate's prepare, set_epoch (same order per epoch) and skip_first_batches."""
    splits = build_datasets(_data(tree, in_memory=True), seed=0)
    accelerator = make_accelerator()  # a run's: seedable data order
    loader = accelerator.prepare(train_loader(splits, _data(tree, in_memory=True), accelerator.device))
    loader.set_epoch(1)
    full = [(x, y) for x, y in loader]
    assert len(full) == len(splits.train) // 8
    assert all(x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and x.device == accelerator.device for x, _ in full)
    skipped = accelerator.skip_first_batches(loader, 2)
    skipped.set_epoch(1)
    assert [y.tolist() for _, y in skipped] == [y.tolist() for _, y in full[2:]]


def test_settings_in_memory_cannot_serve_are_refused():
    with pytest.raises(ConfigError, match=r"digits are tensors in memory already"):
        load_config(["data.in_memory=true"])
    with pytest.raises(ConfigError, match=r"data.autoaugment=false"):
        load_config(["data.name=imagefolder", "data.root=x", "data.in_memory=true", "data.autoaugment=true"])
    with pytest.raises(ConfigError, match=r"small images .* not 224-pixel"):
        load_config(["data.name=imagenet", "data.root=x", "data.in_memory=true"])


def test_a_run_trains_from_memory(tree, tmp_path):
    report = run(load_config([
        "data.name=imagefolder", f"data.root={tree}", "data.in_memory=true", "data.cutout=8", "data.batch_size=8",
        "stages=[train,convert,eval]", "train.epochs=2", "snn.timesteps=[1,2]", "snn.stats_samples=4",
        f"run_dir={tmp_path / 'run'}",
    ]))
    assert report["status"] == "complete" and report["splits"]["train"] == 54 and len(report["ann"]["history"]) == 2
