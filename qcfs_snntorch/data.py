"""Datasets and transforms: digits (bundled), any ImageFolder (or a .tar.gz of one),
torchvision CIFAR-10/100, ImageNet-style folders.

Small images (≤ 64 px) can be decoded once into one uint8 tensor (``data.in_memory``): the
training loader then hands out uint8 batches and :class:`BatchAugment` crops, flips and
normalises each whole batch on the training device, as the fast public CIFAR trainers do.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = [
    "BatchAugment",
    "DataError",
    "DataSplits",
    "DatasetInfo",
    "InMemoryImages",
    "Transformed",
    "build_datasets",
    "class_balanced_indices",
    "decode_images",
    "extract_archive",
    "labels_of",
    "quiet_hangups",
    "quiet_worker",
    "random_indices",
    "sample_batch",
    "train_loader",
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
    mean: tuple[float, ...] = ()  # the normalisation every image gets (per channel, or one value for all)
    std: tuple[float, ...] = ()


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


class InMemoryImages(Dataset):
    """A split decoded once: ``images`` (uint8, ``[N, C, H, W]``) and their labels ``targets``.

    With ``mean`` and ``std`` an item is the normalised float image (what evaluation reads);
    without, it is the uint8 image itself, left for :class:`BatchAugment` to augment a
    whole batch at once. Several views may share one ``images`` tensor.
    """

    def __init__(self, images: torch.Tensor, targets: list[int], mean=None, std=None):
        self.images, self.targets = images, list(targets)
        self.labels = torch.as_tensor(self.targets, dtype=torch.long)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def _view(self, images: torch.Tensor) -> torch.Tensor:
        # The operations of ToTensor and Normalize, in their order: the same floats as the per-image transform.
        return images if self.mean is None else (images.float().div(255) - self.mean) / self.std

    def __getitem__(self, index: int):
        return self._view(self.images[index]), self.targets[index]

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch in one gather (the DataLoader asks for this when it exists)."""
        chosen = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self._view(self.images[chosen]).unbind(0), self.labels[chosen].tolist()))


class BatchAugment:
    """Training augmentation of a whole uint8 batch on one device, in a few tensor ops.

    The same distribution as the per-image small-image transforms (:func:`_transforms`):
    a random crop of the zero-padded image (offsets uniform in ``[0, 2·padding]``), a
    horizontal flip with probability 1/2, normalisation, then Cutout. The crop and the
    flip are one gather: a flipped crop reads its columns in reverse order. The result is
    in channels-last layout (the gather produces it), which convolutions read fastest.
    """

    def __init__(self, mean, std, padding: int, cutout: int = 0):
        self.mean, self.std = tuple(mean), tuple(std)
        self.padding, self.cutout = padding, cutout

    def collate(self, device: torch.device | str):
        """A DataLoader ``collate_fn``: (uint8 image, label) items → an augmented batch on ``device``."""
        return functools.partial(self.collate_on, torch.device(device))

    def collate_on(self, device: torch.device, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in items]).to(device, non_blocking=True)
        labels = torch.tensor([int(label) for _, label in items], dtype=torch.long).to(device, non_blocking=True)
        return self(images), labels

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        device, p = images.device, self.padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        rows = torch.randint(0, 2 * p + 1, (batch, 1), device=device) + torch.arange(height, device=device)
        cols = torch.randint(0, 2 * p + 1, (batch, 1), device=device) + torch.arange(width, device=device)
        flip = torch.rand(batch, 1, device=device) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
        index = torch.arange(batch, device=device)[:, None, None]
        crops = padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B, H, W, C] → NCHW view
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        out = (crops.float().div(255) - mean) / std
        if self.cutout:
            out = self._cutout(out)
        return out

    def _cutout(self, images: torch.Tensor) -> torch.Tensor:
        """Zero a ``cutout``-sided square per image at a uniform centre (it may cross the border), as :class:`Cutout`."""
        batch, _, height, width = images.shape
        device, half = images.device, self.cutout // 2
        cy = torch.randint(0, height, (batch, 1), device=device)
        cx = torch.randint(0, width, (batch, 1), device=device)
        ys, xs = torch.arange(height, device=device), torch.arange(width, device=device)
        inside_y = (ys >= cy - half) & (ys < cy + half)
        inside_x = (xs >= cx - half) & (xs < cx + half)
        return images.masked_fill((inside_y[:, :, None] & inside_x[:, None, :])[:, None], 0.0)


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (antialiased bilinear), then the centre ``size``×``size``: Resize + CenterCrop on a tensor."""
    if image.shape[-2:] != (size, size):
        image = TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
    return image


def _decode_files(paths: list[str], size: int, chunk: int = 512):
    """uint8 ``[C, size, size]`` images read from files: JPEGs decoded a chunk at a time by libjpeg-turbo."""
    import warnings

    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

    for start in range(0, len(paths), chunk):
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; its decoders are still the fastest here
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
            raw = [read_file(path) for path in paths[start : start + chunk]]
            try:
                images = decode_jpeg(raw, mode=ImageReadMode.RGB)
            except RuntimeError:  # not all JPEG (PNG, …): one at a time
                images = [decode_image(data, mode=ImageReadMode.RGB) for data in raw]
        yield from (_fit(image, size) for image in images)


def decode_images(base: Dataset, size: int) -> tuple[torch.Tensor, list[int]]:
    """Every image of ``base`` resized (shorter side) and centre-cropped to ``size``, as one uint8 tensor.

    Reads an ImageFolder's files directly (a PIL round trip per image costs several times
    more), a torchvision CIFAR set's array as it is, and anything else item by item.
    Returns ``(images [N, 3, size, size], labels)``.
    """
    labels = labels_of(base)
    if isinstance(getattr(base, "data", None), np.ndarray) and base.data.ndim == 4:  # torchvision CIFAR: [N, H, W, 3]
        images = torch.from_numpy(base.data).permute(0, 3, 1, 2)
        return (images.contiguous() if images.shape[-1] == size else torch.stack([_fit(i, size) for i in images])), labels
    if hasattr(base, "samples"):
        found = _decode_files([path for path, _ in base.samples], size)
    else:
        found = (_fit(TF.pil_to_tensor(image.convert("RGB")), size) for image, _ in (base[i] for i in range(len(base))))
    images = torch.empty((len(labels), 3, size, size), dtype=torch.uint8)
    for i, image in enumerate(found):
        images[i] = image
    return images, labels


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
    - ``test``: the data set's own test split, evaluated once at the end of each stage;
    - ``augment``: with ``data.in_memory``, the augmentation the training loader applies to
      whole uint8 batches of ``train`` on the device (None: ``train`` items come augmented).
    """

    train: Dataset
    calibration: Dataset
    val: Dataset | None
    test: Dataset
    info: DatasetInfo
    augment: BatchAugment | None = None


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
    info = DatasetInfo("digits", 10, 1, image_size, tuple(str(c) for c in range(10)), (mean.item(),), (std.item(),))
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


def _views(cfg) -> tuple[Dataset, Dataset, Dataset, DatasetInfo, BatchAugment | None]:
    """The whole training split as training items and as evaluation items, the test split, the info,
    and the batch augmentation the training loader applies (data.in_memory), if any."""
    if cfg.name == "digits":
        train_base, test_base, info = _digits(cfg.image_size or 8)
        return train_base, train_base, test_base, info, None
    size = cfg.image_size or (224 if cfg.name == "imagenet" else 32)
    mean, std = (CIFAR_MEAN, CIFAR_STD) if size <= 64 else (IMAGENET_MEAN, IMAGENET_STD)
    train_base, test_base, classes = _image_sets(cfg, size)
    info = DatasetInfo(cfg.name, len(classes), 3, size, classes, mean, std)
    if cfg.in_memory:
        if size > 64 or cfg.autoaugment:
            raise DataError(_in_memory_refusal(size, cfg.autoaugment))
        images, labels = decode_images(train_base, size)
        test_images, test_labels = decode_images(test_base, size)
        augment = BatchAugment(mean, std, padding=size // 8, cutout=cfg.cutout)
        return (InMemoryImages(images, labels), InMemoryImages(images, labels, mean, std),
                InMemoryImages(test_images, test_labels, mean, std), info, augment)
    train_tf = _transforms(size, mean, std, train=True, autoaugment=cfg.autoaugment, cutout=cfg.cutout)
    eval_tf = _transforms(size, mean, std, train=False, autoaugment=False, cutout=0)
    return Transformed(train_base, train_tf), Transformed(train_base, eval_tf), Transformed(test_base, eval_tf), info, None


def _in_memory_refusal(size: int, autoaugment: bool) -> str:
    """Why ``data.in_memory`` cannot serve these settings, and what to use instead."""
    if autoaugment:
        return ("data.in_memory augments whole batches (crop, flip, Cutout) and has no per-image AutoAugment: "
                "use data.autoaugment=false with it, or data.in_memory=false with data.num_workers processes")
    return (f"data.in_memory is for small images (≤ 64 px) that fit in memory, not {size}-pixel ones; "
            "large images stream from disk with data.num_workers processes")


def build_datasets(cfg, seed: int = 0) -> DataSplits:
    """The splits of a :class:`~qcfs_snntorch.config.DataConfig` (see :class:`DataSplits`).

    ``cfg.val_split`` of every class of the training split is held out as the validation
    split, drawn with ``cfg.split_seed`` (not the run's ``seed``: runs with other seeds, or
    fine-tuning a model another run trained, keep the same held-out images); ``train_subset``
    then draws from what is left (with ``seed``), and ``eval_subset`` from the validation and
    the test split alike.
    """
    train_items, eval_items, test_items, info, augment = _views(cfg)
    labels = labels_of(train_items)
    kept, held = _stratified_split(labels, cfg.val_split, cfg.split_seed) if cfg.val_split else (list(range(len(labels))), [])
    if cfg.train_subset is not None and cfg.train_subset < len(kept):
        kept = [kept[i] for i in random_indices(len(kept), cfg.train_subset, seed)]
    return DataSplits(
        train=Subset(train_items, kept),
        calibration=Subset(eval_items, kept),
        val=_subset(Subset(eval_items, held), cfg.eval_subset, seed + 2) if held else None,
        test=_subset(test_items, cfg.eval_subset, seed + 1),
        info=info,
        augment=augment,
    )


def quiet_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every loader with worker processes: an ending run stops them without a word.

    Ctrl-C and SIGTERM reach the whole process group (a terminal, a cluster's preemption). Workers
    ignore both: the main process ends the run (its report says ``interrupted``) and then stops its
    workers itself; a worker that the signal ended first made torch print a traceback of its own on
    the way out. A worker whose main process is gone ends by itself (torch watches the parent).
    And a worker that was handing a batch's shared memory to the main process when it went away
    (multiprocessing's fd server thread: the connection is reset) would print that thread's
    traceback: a hang-up there is the run ending, not an error.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = quiet_hangups


def quiet_hangups(exc_type, exc, tb) -> None:
    """``sys.excepthook`` of a loader worker: silent on the main process hanging up, as usual otherwise."""
    if issubclass(exc_type, (ConnectionResetError, BrokenPipeError, EOFError)):
        return
    sys.__excepthook__(exc_type, exc, tb)


def train_loader(splits: DataSplits, cfg, device: torch.device) -> DataLoader:
    """The training loader of a :class:`~qcfs_snntorch.config.DataConfig`, for ``accelerator.prepare``.

    Per-image transforms: ``cfg.num_workers`` processes that stay alive between epochs, and
    pinned host memory when the device is a GPU (asynchronous copies). In memory
    (``splits.augment``): no worker processes, the batch is gathered from the uint8 tensor
    and augmented on ``device`` by the collate function (its tensors are already there).
    """
    common = {"batch_size": cfg.batch_size, "shuffle": True, "drop_last": True}
    if splits.augment is not None:
        return DataLoader(splits.train, collate_fn=splits.augment.collate(device), num_workers=0, **common)
    workers = cfg.num_workers
    return DataLoader(splits.train, num_workers=workers, persistent_workers=workers > 0,
                      worker_init_fn=quiet_worker if workers else None,
                      pin_memory=torch.device(device).type == "cuda", **common)
