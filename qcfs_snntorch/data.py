"""Datasets and transforms: digits (bundled), any ImageFolder (or a .tar.gz of one),
torchvision CIFAR-10/100, ImageNet-style folders.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision import transforms as T

__all__ = ["DataError", "DatasetInfo", "build_datasets", "extract_archive"]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Missing or malformed dataset; the message says what layout was expected."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_chans: int
    image_size: int
    classes: tuple[str, ...]


class Cutout:
    """Zero a random ``size``×``size`` square (DeVries & Taylor 2017); it may cross the border."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        half = self.size // 2
        img = img.clone()
        img[..., max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = 0
        return img


def extract_archive(archive: Path) -> Path:
    """Extract a .tar.gz once into a cache folder outside the project; return its path.

    Extraction goes to a temporary sibling first and is renamed into place, so a killed
    extraction is never mistaken for a complete one.
    """
    cache_root = Path(os.environ.get("QCFS_SNNTORCH_CACHE", Path(tempfile.gettempdir()) / "qcfs_snntorch_data"))
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root / f"{archive.name.split('.')[0]}-{key}"
    if target.is_dir():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=cache_root))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")
        try:
            partial.rename(target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _resolve_root(root: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root {str(path)!r} does not exist")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataError(f"data.root {str(path)!r} is a file but not a tar archive of a dataset folder")
        path = extract_archive(path)
    # An archive usually holds one top folder: descend while there is exactly one folder.
    while path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and not any((path / s).is_dir() for s in ("train", "val", "test")):
            path = dirs[0]
        else:
            break
    return path


def _split_dir(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(
        f"no {what} split under {str(root)!r}: expected one of the folders {', '.join(names)}, each holding "
        f"one sub-folder of images per class (ImageFolder layout), e.g. {root}/{names[0]}/<class>/<image>.jpg"
    )


def _transforms(image_size: int, mean, std, *, train: bool, autoaugment: bool, cutout: int):
    if image_size <= 64:  # CIFAR-style: pad-and-crop, flip
        ops = [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()] if train else [T.Resize(image_size), T.CenterCrop(image_size)]
        if train and autoaugment:
            ops.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    else:  # ImageNet-style
        ops = (
            [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
            if train
            else [T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size)]
        )
        if train and autoaugment:
            ops.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    if train and cutout:
        ops.append(Cutout(cutout))
    return T.Compose(ops)


def _digits() -> tuple[Dataset, Dataset, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=bunch.target)
    train_x = images[idx_train]
    mean, std = train_x.mean(), train_x.std()
    norm = lambda x: (x - mean) / std  # noqa: E731
    info = DatasetInfo("digits", 10, 1, 8, tuple(str(c) for c in range(10)))
    return (
        TensorDataset(norm(train_x), labels[idx_train]),
        TensorDataset(norm(images[idx_test]), labels[idx_test]),
        info,
    )


def _subset(ds: Dataset, size: int | None, seed: int) -> Dataset:
    if size is None or size >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:size].tolist())


def build_datasets(cfg, seed: int = 0) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train, eval, info) for a :class:`~qcfs_snntorch.config.DataConfig`."""
    if cfg.name == "digits":
        train, test, info = _digits()
    else:
        size = cfg.image_size or (224 if cfg.name == "imagenet" else 32)
        mean, std = (CIFAR_MEAN, CIFAR_STD) if size <= 64 else (IMAGENET_MEAN, IMAGENET_STD)
        tf_train = _transforms(size, mean, std, train=True, autoaugment=cfg.autoaugment, cutout=cfg.cutout)
        tf_eval = _transforms(size, mean, std, train=False, autoaugment=False, cutout=0)
        if cfg.name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
            root = Path(cfg.root).expanduser()
            try:
                train = cls(root, train=True, transform=tf_train, download=cfg.download)
                test = cls(root, train=False, transform=tf_eval, download=cfg.download)
            except RuntimeError as exc:
                raise DataError(
                    f"{cfg.name} not found under {str(root)!r} ({exc}). Give data.download=true (needs the internet) "
                    f"or point data.root at torchvision's extracted copy; an ImageFolder copy works with data.name=imagefolder"
                ) from None
            classes = tuple(train.classes)
        else:
            root = _resolve_root(cfg.root)
            train_dir = _split_dir(root, ("train",), "training")
            test_dir = _split_dir(root, ("val", "test", "validation"), "evaluation")
            try:
                train = datasets.ImageFolder(train_dir, transform=tf_train)
                test = datasets.ImageFolder(test_dir, transform=tf_eval)
            except (FileNotFoundError, RuntimeError) as exc:
                raise DataError(
                    f"could not read images under {str(root)!r} ({str(exc).splitlines()[0]}). Expected an ImageFolder "
                    f"tree: {root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/), e.g. the CIFAR-10 "
                    "JPEG copy ../shared/data/cifar10-jpeg.tar.gz (data.root may point at the .tar.gz itself)"
                ) from None
            if train.classes != test.classes:
                raise DataError(f"class folders differ between {train_dir} and {test_dir}")
            classes = tuple(train.classes)
        info = DatasetInfo(cfg.name, len(classes), 3, size, classes)
    return _subset(train, cfg.train_subset, seed), _subset(test, cfg.eval_subset, seed + 1), info
