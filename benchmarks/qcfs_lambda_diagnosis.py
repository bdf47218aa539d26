"""Why a QCFS network trains worse than its ReLU twin: is it λ's gradient? (docs/RESULTS.md, issue 20).

A plain training loop over the library's model and data (no pipeline), so that λ's treatment can
be varied where the recipe has no setting for it. One JSON line per epoch: mean training loss,
validation accuracy, the λ range and the largest |∂loss/∂λ| of the epoch.

    python benchmarks/qcfs_lambda_diagnosis.py --model regnetx_002 --variant learned --seed 0 --epochs 6

Variants: ``learned`` (as the library trains it), ``frozen`` (λ stays at its value from data),
``lsq`` (λ's gradient scaled by 1/sqrt(elements per sample × L), the step-size gradient scale of
LSQ, Esser et al. 2020, now the library's ``train.threshold_gradient=lsq``; ``--levels-start`` trains at a larger L first), ``projected`` (learned, and every λ below the floor set back to it after
each step, as :func:`qcfs_snntorch.training.tasks.project_thresholds` does in the library's loop
since this diagnosis), ``relu`` (the ReLU twin: no QCFS). ``lambda_below`` counts the steps that
left some λ below the floor.
"""

from __future__ import annotations

import argparse
import json
import math

import _common  # noqa: F401  (OMP policy, import path)
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import qcfs_snntorch as qs
from qcfs_snntorch.calibration.thresholds import calibrate_from_data
from qcfs_snntorch.config import DataConfig
from qcfs_snntorch.data import build_datasets, sample_batch
from qcfs_snntorch.qcfs import MIN_THRESHOLD
from qcfs_snntorch.training.tasks import project_thresholds


def per_channel_thresholds(model, images, percentile: float) -> int:
    """λ per channel (shape [C, 1, 1]) for every QCFS that sees 4-D inputs: the percentile of each channel's
    positive inputs, measured with every QCFS acting as a ReLU; returns how many layers got one."""
    layers = [m for m in model.modules() if isinstance(m, qs.QCFS)]
    seen: dict = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.setdefault(mod, []).append(args[0].detach())) for m in layers]
    trained = [(m.levels, m.threshold.detach().clone()) for m in layers]
    for m in layers:  # ~ReLU: a clip far above any input, levels too fine to matter
        m.levels = 1 << 20
        m.threshold.data.fill_(1e6)
    model.eval()
    with torch.no_grad():
        for chunk in images.split(32):
            model(chunk)
    model.train()
    for hook in hooks:
        hook.remove()
    changed = 0
    for m, (levels, threshold) in zip(layers, trained):
        m.levels = levels
        m.threshold.data.copy_(threshold)
        z = torch.cat(seen[m])
        if z.dim() != 4:
            continue
        rows = z.transpose(0, 1).reshape(z.shape[1], -1)
        per_channel = [torch.quantile(r[r > 0][: 1 << 24], percentile / 100) if (r > 0).sum() >= 16 else threshold
                       for r in rows]
        m.threshold = torch.nn.Parameter(torch.stack(per_channel).clamp_min(1e-3).reshape(-1, 1, 1))
        changed += 1
    return changed


def watch_batchnorms(model, eps: float | None) -> tuple[list[float], list]:
    """Set every BatchNorm's eps (if given); hooks that record, per training step, the smallest per-channel
    batch variance any BatchNorm2d sees (returned list, and the hook handles)."""
    if eps is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eps = eps
    smallest: list[float] = []

    def record(module, args, output):
        if module.training and args[0].dim() == 4:
            smallest.append(args[0].detach().var(dim=(0, 2, 3)).min().item())

    return smallest, [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def set_levels(layers, start: int, target: int, epoch: int, epochs: int) -> None:
    """L for this epoch: geometric from ``start`` in the first epoch to ``target`` in the last."""
    fraction = epoch / max(epochs - 1, 1)
    for m in layers:
        m.levels = max(target, round(start * (target / start) ** fraction))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="regnetx_002")
    ap.add_argument("--variant", choices=["learned", "frozen", "lsq", "projected", "relu"], default="learned")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--percentile", type=float, default=99.9, help="λ from this percentile of each layer's inputs")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--bn-eps", type=float, help="set every BatchNorm's eps (the default is 1e-5)")
    ap.add_argument("--per-channel", action="store_true", help="λ per channel of every 4-D activation, from data")
    ap.add_argument("--levels-start", type=int, help="train at this L in the first epoch and lower it geometrically "
                                                    "to the model's L (4) in the last")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    data = build_datasets(DataConfig(name="digits", image_size=args.image_size, batch_size=32), seed=0)
    extra = {"activations": []} if args.variant == "relu" else {}
    model = qs.create_model(args.model, num_classes=10, in_chans=1, **extra)
    smallest_var, hooks = watch_batchnorms(model, args.bn_eps)
    if any(isinstance(m, qs.QCFS) for m in model.modules()):
        images, _ = sample_batch(data.calibration, 256, args.seed)
        calibrate_from_data(model, images.split(32), percentile=args.percentile, update_bn=True)
        if args.per_channel:
            per_channel_thresholds(model, images, args.percentile)
        if args.variant == "lsq":
            qs.set_threshold_gradient(model, "lsq")  # what train.threshold_gradient=lsq does
    lambdas = [m.threshold for m in model.modules() if isinstance(m, qs.QCFS)]
    is_lambda = {id(p) for p in lambdas}
    others = [p for p in model.parameters() if id(p) not in is_lambda]
    groups = [{"params": [p for p in others if p.ndim > 1], "weight_decay": 5e-4},
              {"params": [p for p in others if p.ndim <= 1], "weight_decay": 0.0}]
    if lambdas:
        groups.append({"params": lambdas, "weight_decay": 0.0, "lr_scale": 0.0 if args.variant == "frozen" else 1.0})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    loader = DataLoader(data.train, batch_size=32, shuffle=True, drop_last=True)
    total_steps, step = args.epochs * len(loader), 0

    def validation_accuracy() -> float:
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in DataLoader(data.val, batch_size=256):
                correct += (model(x).argmax(1) == y).sum().item()
                seen += len(y)
        model.train()
        return 100 * correct / seen

    layers = [m for m in model.modules() if isinstance(m, qs.QCFS)]
    target = layers[0].levels if layers else None
    for epoch in range(args.epochs):
        losses, largest, below = [], 0.0, 0
        smallest_var.clear()
        if args.levels_start and layers:
            set_levels(layers, args.levels_start, target, epoch, args.epochs)
        for x, y in loader:
            warmup = min(1.0, (step + 1) / len(loader))  # one warm-up epoch, then cosine
            cosine = 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for group in optimizer.param_groups:
                group["lr"] = args.lr * warmup * cosine * group.get("lr_scale", 1.0)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if lambdas:
                largest = max(largest, max(p.grad.abs().max().item() for p in lambdas))
            optimizer.step()
            below += any((p < MIN_THRESHOLD).any().item() for p in lambdas)
            if args.variant == "projected":
                project_thresholds(model)
            step += 1
            losses.append(loss.item())
        values = [round(v, 2) for p in lambdas for v in (p.min().item(), p.max().item())]
        print(json.dumps({"model": args.model, "variant": args.variant, "seed": args.seed, "lr": args.lr,
                          "percentile": args.percentile, "per_channel": args.per_channel, "epoch": epoch + 1, "loss": round(sum(losses) / len(losses), 3),
                          "val": round(validation_accuracy(), 2), "lambda_min": min(values, default=None),
                          "lambda_max": max(values, default=None), "max_lambda_grad": round(largest, 2),
                          "lambda_below": below, "bn_eps": args.bn_eps, "levels": layers[0].levels if layers else None,
                          "min_bn_batch_var": float(f"{min((v for v in smallest_var if v == v), default=float('nan')):.3g}")}), flush=True)
    for hook in hooks:
        hook.remove()


if __name__ == "__main__":
    main()
