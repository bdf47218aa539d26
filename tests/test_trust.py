"""What makes an accuracy number trustworthy (issue 11): representative samples, a validation
split that never touches training or the test split, the same image scale in training and
evaluation, λ from data that holds on every family, and networks that hold at every L."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import qcfs_snntorch as qs
from qcfs_snntorch.config import DataConfig, TrainConfig, load_config
from qcfs_snntorch.data import CIFAR_MEAN, CIFAR_STD, build_datasets, labels_of
from qcfs_snntorch.tracing import qcfs_layers
from qcfs_snntorch.training import Classification, evaluate_ann_at_levels, fit, make_accelerator

CLASSES = 4
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def coloured_tree(root: Path, per_class: int = 12, sizes=(24, 40)) -> Path:
    """An ImageFolder whose class is written in the red channel (c · 60), images of two sizes."""
    from PIL import Image

    for split, count in (("train", per_class), ("val", per_class // 2)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                size = sizes[i % len(sizes)]
                Image.new("RGB", (size, size), (c * 60, 100, 100)).save(folder / f"{i:03d}.png")
    return root


def class_of(images: torch.Tensor) -> list[int]:
    red = images[:, 0].mean((1, 2)) * CIFAR_STD[0] + CIFAR_MEAN[0]
    return (red * 255 / 60).round().long().tolist()


def test_calibration_and_statistics_samples_hold_every_class(tmp_path):
    """An ImageFolder is sorted by class: the first N items would all be of one class."""
    from qcfs_snntorch.pipeline.setup import setup

    root = coloured_tree(tmp_path / "data")
    cfg = load_config(["data.name=imagefolder", f"data.root={root}", "data.val_split=0.25", "snn.calibrate_samples=8",
                       "snn.stats_samples=8", "stages=[train]", f"run_dir={tmp_path / 'run'}", "model.threshold_init=fixed"])
    ctx = setup(cfg)
    calibration, statistics = class_of(ctx.calibration_batch()), class_of(ctx.statistics_batch())
    assert sorted(calibration) == [0, 0, 1, 1, 2, 2, 3, 3]  # class-balanced
    assert set(statistics) == set(range(CLASSES))  # a random sample of the test split, not its first items
    assert class_of(torch.stack([ctx.data.test[i][0] for i in range(8)])) == [0] * 6 + [1] * 2  # what "first" would be


def test_the_validation_split_is_held_out_of_training_and_apart_from_test():
    splits = build_datasets(DataConfig(name="digits", val_split=0.2))
    train_rows = {tuple(splits.train[i][0].flatten().tolist()) for i in range(len(splits.train))}
    val_rows = {tuple(splits.val[i][0].flatten().tolist()) for i in range(len(splits.val))}
    test_rows = {tuple(splits.test[i][0].flatten().tolist()) for i in range(len(splits.test))}
    assert not train_rows & val_rows and not test_rows & val_rows
    counts = torch.bincount(torch.tensor(labels_of(splits.val)), minlength=10)
    assert counts.min() >= 0.8 * counts.max()  # every class held out alike (stratified)
    assert len(splits.test) == 360  # the test split is the data set's own, untouched by the split
    again = build_datasets(DataConfig(name="digits", val_split=0.2, split_seed=0), seed=7)
    assert labels_of(again.val) == labels_of(splits.val)  # the run's seed does not move the split


def _stripes(size: int):
    from PIL import Image

    width = size / 16
    image = Image.new("RGB", (size, size))
    for x in range(size):
        value = 255 if int(x // width) % 2 else 0
        for y in range(size):
            image.putpixel((x, y), (value, value, value))
    return image


def _transitions(image: torch.Tensor) -> int:
    row = image[0, image.shape[1] // 2, 4:28] * CIFAR_STD[0] + CIFAR_MEAN[0]  # the centre, clear of crop padding
    bits = (row > 0.5).int()
    return int((bits[1:] != bits[:-1]).sum())


def test_training_and_evaluation_see_the_same_scale(tmp_path):
    """16 stripes across images of 20 to 64 pixels: at data.image_size = 32 they are 2 pixels wide,
    in training (its random crop and flip included) as in evaluation."""
    sizes = (20, 24, 40, 64)
    for split in ("train", "val"):
        folder = tmp_path / split / "stripes"
        folder.mkdir(parents=True)
        for size in sizes:
            _stripes(size).save(folder / f"{size:03d}.png")
    splits = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, val_split=0.0))
    torch.manual_seed(0)
    for i in range(len(sizes)):  # the same image: training transform (train) and evaluation transform (calibration)
        expected = _transitions(splits.calibration[i][0])
        assert 10 <= expected <= 13, (sizes[i], expected)
        for _ in range(5):
            assert abs(_transitions(splits.train[i][0]) - expected) <= 1, sizes[i]


# λ from data across families: the six the issue names, each a different way to build a network. RegNet is
# the real regnetx_002 (where λ exploded); the others are cut down through timm's own arguments (as in
# test_coverage.py) to keep the test short; their stems, blocks and wiring are unchanged.
FAMILIES = {
    "resnet": ("resnet18", dict(layers=(1, 1, 1, 1), channels=(16, 16, 32, 32))),
    "resnet-d": ("resnet18d", dict(layers=(1, 1, 1, 1), stem_width=8, channels=(16, 16, 32, 32))),
    "regnet": ("regnetx_002", {}),
    "mobilenetv2": ("mobilenetv2_050", dict(depth_multiplier=0.5)),
    "vgg": ("vgg11_bn", dict(mlp_ratio=1 / 64)),  # its widths are a table, narrowed in the test
    "densenet": ("densenet121", dict(growth_rate=8, block_config=(2, 2, 2, 2))),
}


def _digits_rgb32(count: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, normalised, upsampled to 32×32 and repeated to 3 channels: the images
    where λ exploded (their borders are constant, so some channels are constant across images)."""
    splits = build_datasets(DataConfig(name="digits", val_split=0.0, image_size=32))
    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))]).repeat(1, 3, 1, 1)
    y = torch.tensor(labels_of(splits.train))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:count]
    return x[order], y[order]


def _cifar_subset(count: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} is not here")
    splits = build_datasets(DataConfig(name="imagefolder", root=str(SHARED), val_split=0.0))
    from qcfs_snntorch.data import sample_batch

    return sample_batch(splits.calibration, count, seed=0)


def _relu_percentiles(name: str, kwargs: dict, batches: list[torch.Tensor]) -> list[float | None]:
    """The same network with ReLU (and the average pooling QCFS networks use), as it trains (BatchNorm on batch
    statistics): each activation's 99.9th percentile."""
    torch.manual_seed(0)
    relu = qs.create_model(name, num_classes=10, activations=(), **kwargs).train()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].detach().flatten()))
             for n, m in relu.named_modules() if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))]
    with torch.no_grad():
        for b in batches:
            relu(b)
    for hook in hooks:
        hook.remove()
    result = []
    for chunks in seen.values():
        values = torch.cat(chunks)
        values = values[values > 0][:: max(1, values.numel() // (1 << 22))]
        result.append(torch.quantile(values, 0.999).item() if values.numel() else None)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "cifar10-jpeg"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lambda_from_data_holds_on_every_family(family, data, tmp_path, monkeypatch):
    name, kwargs = FAMILIES[family]
    from timm.models import vgg

    monkeypatch.setitem(vgg.cfgs, "vgg11", [16, "M", 32, "M", 64, 64, "M", 64, 64, "M", 64, 64, "M"])
    x, y = _digits_rgb32() if data == "digits" else _cifar_subset()
    batches = list(x[:512].split(128))
    torch.manual_seed(0)
    model = qs.create_model(name, num_classes=10, levels=4, **kwargs)
    qs.calibrate_from_data(model, batches)
    lam = [act.threshold.item() for act in qcfs_layers(model)]
    reference = _relu_percentiles(name, kwargs, batches)
    assert len(lam) == len(reference)
    median = torch.tensor([r for r in reference if r]).median().item()
    for i, (ours, relu) in enumerate(zip(lam, reference)):
        if relu is not None and relu > 0.01 * median:
            assert relu / 1.5 <= ours <= relu * 1.5, (family, i, ours, relu)  # the ReLU network's own scale
        else:  # a layer the data never drives (e.g. regnet's last stage on digits): the network's median
            assert 0.5 * median <= ours <= 2 * median, (family, i, ours, median)
    assert max(lam) < 50, lam  # the explosion this guards against reached 10⁵
    if data != "digits" or family == "mobilenetv2":
        # timm's MobileNetV2 starts with logits of about 30 for 10 classes: at this lr, without warm-up, its first
        # steps reach NaN on some CPUs (an AMD EPYC) and not on others, with ReLU6 as with QCFS
        # (docs/TROUBLESHOOTING.md). Its λ is checked above; whether it trains says nothing about λ.
        return
    # and it trains: one short epoch (all 1,437 digits, batch 16) from there is clearly above chance (10 %).
    # Before λ was measured with batch statistics and zero-initialised residual branches were started, RegNet
    # stayed at chance here (λ up to 10⁵; then a dead last stage).
    x, y = _digits_rgb32(count=1437)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, drop_last=True)
    history = fit(model, loader, cfg=TrainConfig(epochs=1, lr=0.02, warmup_epochs=0, scheduler="none"),
                  accelerator=make_accelerator(), checkpoints=tmp_path, log=lambda m: None)
    assert history[0]["train_top1"] > 0.25, (family, history[0])


def test_levels_drawn_per_batch_train_every_L_and_leave_the_trained_L():
    """train.levels_choices: each batch runs every QCFS at an L drawn (by seed and step) from the set."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), qs.QCFS(4, 1.0), torch.nn.Linear(8, 3))
    task = Classification(levels_choices=[1, 2, 8], seed=0)
    used = []
    net[1].register_forward_pre_hook(lambda m, a: used.append(m.levels))
    for step in range(30):
        task(net, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), step)
    assert set(used) == {1, 2, 8} and net[1].levels == 4
    again = []
    net[1] = qs.QCFS(4, 1.0)
    net[1].register_forward_pre_hook(lambda m, a: again.append(m.levels))
    for step in range(30):
        Classification(levels_choices=[1, 2, 8], seed=0)(net, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), step)
    assert again == used  # a function of (seed, step): every rank and every resume draws alike


def test_ann_at_levels_reports_every_L_and_restores_the_trained_one():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), qs.QCFS(4, 1.0), torch.nn.Linear(8, 3)).eval()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    accelerator = make_accelerator()
    loader = accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=16))
    at = evaluate_ann_at_levels(net, loader, [1, 4, 64], accelerator)
    assert net[1].levels == 4  # the trained L is back
    with torch.no_grad():
        for levels, acc in zip([1, 4, 64], at):
            net[1].levels = levels
            assert acc == pytest.approx((net(x).argmax(-1) == y).float().mean().item())
    assert len(set(at)) > 1  # L changes what the network computes
