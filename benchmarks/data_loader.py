"""Does the training loader keep up? Images per second it delivers against what a training step consumes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/data_loader.py recipe=cifar10_jpeg_cpu data.root=/tmp/c10
    python benchmarks/data_loader.py --device cuda --workers 0 4 8 --in-memory recipe=cifar10_jpeg_cpu data.root=...
    python benchmarks/data_loader.py --synthetic-imagenet 512 --workers 0 1 2 recipe=resnet34_imagenet

Arguments after the options are a run's ``key=value`` overrides (the recipe's loader settings,
data and model). For each loader setting (``--workers``, and with ``--in-memory`` the decoded
uint8 tensor with batches augmented on ``--device``) one JSON line: ``loader_img_s`` is the
rate of the loader alone (batches fetched and moved to the device, nothing computed), then
``step_img_s`` the rate of the recipe's model in one training step (forward, cross-entropy,
backward, SGD) on random data of the same shape, and ``loader_over_step`` their ratio: below 1
the loader is the bottleneck. ``--synthetic-imagenet N`` writes N ImageNet-sized JPEGs (smooth
noise, 500×375, quality 90, ~45 KB) in 10 classes first, for machines without ImageNet.
"""

# ruff: noqa: I001  (_common goes before torch: it sets OMP_WAIT_POLICY)
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import autocast, emit, machine, sync

import torch
import torch.nn.functional as F

import qcfs_snntorch as qs
from qcfs_snntorch.config import load_config
from qcfs_snntorch.convert import preferred_memory_format
from qcfs_snntorch.data import build_datasets, train_loader


def synthetic_imagenet(root: Path, count: int, classes: int = 10) -> Path:
    """An ImageFolder tree (train/ and val/) of ImageNet-sized JPEGs: smooth colour noise, so they compress like photos."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", count), ("val", max(classes, count // 10))):
        for i in range(n):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = torch.rand(1, 3, 24, 32, generator=gen)
            image = F.interpolate(small, size=(375, 500), mode="bicubic", align_corners=False)[0].clamp(0, 1)
            Image.fromarray((image * 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(folder / f"{i}.JPEG", quality=90)
    return root


def loader_rate(loader, device: str, batches: int) -> float:
    """Images per second of ``loader`` alone, after one warm-up batch (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    seen, start = 0, time.perf_counter()
    for _ in range(batches):
        images, labels = next(it)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        seen += len(labels)
    sync(device)
    return seen / (time.perf_counter() - start)


def step_rate(cfg, info, device: str, dtype: str, repeats: int) -> float:
    """Images per second one training step of the run's QCFS model consumes (random data of the loader's shape)."""
    model = qs.create_model(cfg.model.name, num_classes=info.num_classes, levels=cfg.model.levels,
                            cifar_stem=cfg.model.cifar_stem, in_chans=info.in_chans).to(device).train()
    if device.startswith("cuda"):
        model = model.to(memory_format=preferred_memory_format(model))  # as the Train stage does on a GPU
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(cfg.data.batch_size, info.in_chans, info.image_size, info.image_size, device=device)
    y = torch.randint(0, info.num_classes, (cfg.data.batch_size,), device=device)

    def step():
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return repeats * len(y) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", nargs="+", type=int, help="worker processes per setting (default: the recipe's)")
    ap.add_argument("--in-memory", action="store_true", help="also measure data.in_memory=true (small images)")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--step-repeats", type=int, default=3)
    ap.add_argument("--synthetic-imagenet", type=int, default=0, metavar="N")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.synthetic_imagenet:
        root = synthetic_imagenet(Path(tempfile.mkdtemp(prefix="synthetic_imagenet_")), args.synthetic_imagenet)
        overrides.append(f"data.root={root}")
    base = load_config(overrides)
    settings = [(w, False) for w in (args.workers or [base.data.num_workers])] + ([(0, True)] if args.in_memory else [])
    step = None
    for workers, in_memory in settings:
        cfg = load_config([*overrides, f"data.num_workers={workers}", f"data.in_memory={str(in_memory).lower()}"])
        started = time.perf_counter()
        splits = build_datasets(cfg.data, cfg.seed)
        built = time.perf_counter() - started
        if step is None:
            step = step_rate(cfg, splits.info, args.device, args.dtype, args.step_repeats)
        rate = loader_rate(train_loader(splits, cfg.data, torch.device(args.device)), args.device, args.batches)
        emit({
            "bench": "data_loader", "recipe": cfg.recipe, "model": cfg.model.name, "image_size": splits.info.image_size,
            "batch": cfg.data.batch_size, "workers": workers, "in_memory": in_memory, "device": args.device,
            "dtype": args.dtype, "build_s": round(built, 1), "loader_img_s": round(rate, 1), "step_img_s": round(step, 1),
            "loader_over_step": round(rate / step, 2), "machine": machine(),
        })


if __name__ == "__main__":
    main()
