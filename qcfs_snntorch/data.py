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

__all__ = [
    "DataError",
    "DataSplits",
    "DatasetInfo",
    "Transformed",
    "build_datasets",
    "class_balanced_indices",
    "extract_archive",
    "labels_of",
    "random_indices",
    "sample_batch",
]

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
    """Training and evaluation transforms that show the network the same scale.

    Small images (≤ 64 px, CIFAR-style): every image is first resized to ``image_size``
    (shorter side) and centre-cropped, in training too, then training pads and crops and
    flips; a data set of 28-pixel images is thus trained and tested on the same 32-pixel
    content. Large images (ImageNet-style): random resized crop for training, resize to
    256/224 of the size and centre crop for evaluation (the usual pairing).
    """
    if image_size <= 64:
        ops = [T.Resize(image_size), T.CenterCrop(image_size)]
        if train:
            ops += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
            if autoaugment:
                ops.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    else:
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


class Transformed(Dataset):
    """``base[i]`` (an image and its label) with ``transform`` applied to the image."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return (self.transform(image) if self.transform is not None else image), label


def labels_of(dataset: Dataset) -> list[int]:
    """Every item's label, read without loading an image (ImageFolder, CIFAR, tensors, subsets)."""
    if isinstance(dataset, Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if isinstance(dataset, Transformed):
        return labels_of(dataset.base)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"cannot read the labels of a {type(dataset).__name__} without loading it")
    return [int(t) for t in targets]


def class_balanced_indices(labels: list[int], count: int, seed: int) -> list[int]:
    """``count`` indices drawn without replacement, as evenly over the classes as they allow.

    Classes take turns (each in its own seeded random order), so every class is in a
    sample of at least as many items as there are classes, whatever order the data set
    keeps (an ImageFolder is sorted by class).
    """
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    queues = [[members[i] for i in torch.randperm(len(members), generator=gen).tolist()] for _, members in sorted(by_class.items())]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(count, len(labels)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < count:
                chosen.append(queue[depth])
        depth += 1
    order = torch.randperm(len(chosen), generator=gen).tolist()  # not grouped by class within a batch
    return [chosen[i] for i in order]


def random_indices(length: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of ``range(length)``, a seeded uniform draw."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:count].tolist()


def sample_batch(dataset: Dataset, count: int, seed: int, *, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random sample of ``dataset`` as one batch (images, labels): class-balanced or uniform.

    What calibration and statistics read: never the first items of a data set, which an
    ImageFolder sorts by class.
    """
    indices = (
        class_balanced_indices(labels_of(dataset), count, seed) if balanced else random_indices(len(dataset), count, seed)
    )
    items = [dataset[i] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([int(label) for _, label in items])


def _stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out): ``fraction`` of every class held out, chosen by a seeded draw."""
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    held: list[int] = []
    for _, members in sorted(by_class.items()):
        take = int(round(fraction * len(members)))
        held += [members[i] for i in torch.randperm(len(members), generator=gen)[:take].tolist()]
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


@dataclass
class DataSplits:
    """What a run reads.

    - ``train``: training images with the training transform (the validation part held out);
    - ``calibration``: the same training images with the evaluation transform (λ, BN, v(0));
    - ``val``: the held-out part of the training split, evaluation transform (None when
      ``data.val_split`` is 0): every choice during a run (best epoch, calibration) looks here;
    - ``test``: the data set's own test split, evaluated once at the end of each stage.
    """

    train: Dataset
    calibration: Dataset
    val: Dataset | None
    test: Dataset
    info: DatasetInfo


def _digits(image_size: int) -> tuple[Dataset, Dataset, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:  # the same digits on a larger canvas, for models that need more pixels
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=bunch.target)
    train_x = images[idx_train]
    mean, std = train_x.mean(), train_x.std()
    info = DatasetInfo("digits", 10, 1, image_size, tuple(str(c) for c in range(10)))
    return (
        TensorDataset((train_x - mean) / std, labels[idx_train]),
        TensorDataset((images[idx_test] - mean) / std, labels[idx_test]),
        info,
    )


def _subset(ds: Dataset, size: int | None, seed: int) -> Dataset:
    if size is None or size >= len(ds):
        return ds
    return Subset(ds, random_indices(len(ds), size, seed))


def _image_sets(cfg, size: int) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """(train, test) without transforms (PIL images) and the class names, for every non-digits data set."""
    if cfg.name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
        root = Path(cfg.root).expanduser()
        try:
            train = cls(root, train=True, download=cfg.download)
            test = cls(root, train=False, download=cfg.download)
        except RuntimeError as exc:
            raise DataError(
                f"{cfg.name} not found under {str(root)!r} ({exc}). Give data.download=true (needs the internet) "
                f"or point data.root at torchvision's extracted copy; an ImageFolder copy works with data.name=imagefolder"
            ) from None
        return train, test, tuple(train.classes)
    root = _resolve_root(cfg.root)
    train_dir = _split_dir(root, ("train",), "training")
    test_dir = _split_dir(root, ("val", "test", "validation"), "evaluation")
    try:
        train = datasets.ImageFolder(train_dir)
        test = datasets.ImageFolder(test_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(
            f"could not read images under {str(root)!r} ({str(exc).splitlines()[0]}). Expected an ImageFolder "
            f"tree: {root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/), e.g. the CIFAR-10 "
            "JPEG copy ../shared/data/cifar10-jpeg.tar.gz (data.root may point at the .tar.gz itself)"
        ) from None
    if train.classes != test.classes:
        raise DataError(f"class folders differ between {train_dir} and {test_dir}")
    return train, test, tuple(train.classes)


def build_datasets(cfg, seed: int = 0) -> DataSplits:
    """The splits of a :class:`~qcfs_snntorch.config.DataConfig` (see :class:`DataSplits`).

    ``cfg.val_split`` of every class of the training split is held out as the validation
    split (seeded by ``seed``); ``train_subset`` then draws from what is left, and
    ``eval_subset`` from the validation and the test split alike.
    """
    if cfg.name == "digits":
        train_base, test_base, info = _digits(cfg.image_size or 8)
        train_tf = eval_tf = None
    else:
        size = cfg.image_size or (224 if cfg.name == "imagenet" else 32)
        mean, std = (CIFAR_MEAN, CIFAR_STD) if size <= 64 else (IMAGENET_MEAN, IMAGENET_STD)
        train_tf = _transforms(size, mean, std, train=True, autoaugment=cfg.autoaugment, cutout=cfg.cutout)
        eval_tf = _transforms(size, mean, std, train=False, autoaugment=False, cutout=0)
        train_base, test_base, classes = _image_sets(cfg, size)
        info = DatasetInfo(cfg.name, len(classes), 3, size, classes)
    kept, held = _stratified_split(labels_of(train_base), cfg.val_split, seed) if cfg.val_split else (list(range(len(train_base))), [])
    kept_set = Subset(train_base, kept)
    kept_set = _subset(kept_set, cfg.train_subset, seed)
    val = _subset(Transformed(Subset(train_base, held), eval_tf), cfg.eval_subset, seed + 2) if held else None
    return DataSplits(
        train=Transformed(kept_set, train_tf),
        calibration=Transformed(kept_set, eval_tf),
        val=val,
        test=_subset(Transformed(test_base, eval_tf), cfg.eval_subset, seed + 1),
        info=info,
    )
