"""Compensated networks (ViT, ConvNeXt, EfficientNet): SNN inference cost against T × the ANN, one JSON line per (model, T).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compensated_inference.py --timesteps 4 8
    python benchmarks/compensated_inference.py --models vit_tiny_patch16_224 convnext_atto --size 64 --batch 16

Each model is built by :func:`qcfs_snntorch.create_model` with QCFS in place of ReLU,
GELU and SiLU (random weights, eval mode, no grad); everything else non-linear
(LayerNorm, attention, gates, …) is compensated by :func:`qcfs_snntorch.convert`. Timed
side by side (interleaved rounds, median): ``ann`` (one forward at batch B), ``engine``
(``snn(x, timesteps=T)``, the engine's defaults: BatchNorm kept for fine-tuning, chains of
compensated ops on running means), ``fold_bn`` (``convert(fold_bn=True)``, the deployment
setting) and ``per_op`` (``chains_on_means=False``: every compensated op on its own, the
engine before chains), ``no_head`` (the engine's network with ``static_head=False``: every
layer folded over T, the layers before the first neuron too) and ``ann_TB`` (the ANN on the
input repeated T times, batch T·B: what the folded engine would cost with nothing of its own).
``ratio`` = engine ms / (T × ann ms), from wall and CPU time (process_time leaves out the
time other processes held the cores on a shared machine); ``ratios`` gives it for every
variant. ``compensated`` counts the wrapped ops per kind.
"""

# ruff: noqa: I001, B023  (_common goes before torch: it sets OMP_WAIT_POLICY; the lambdas run within their loop iteration)
from __future__ import annotations

import argparse
from collections import Counter

from _common import emit, machine, time_interleaved

import torch

import qcfs_snntorch as qs
from qcfs_snntorch.compensation import compensated_ops

MODELS = ["test_vit", "test_convnext", "test_efficientnet"]


VARIANTS = {"engine": {}, "fold_bn": {"fold_bn": True}, "per_op": {"chains_on_means": False}}


def build(name: str, size: int) -> tuple[torch.nn.Module, dict[str, qs.SpikingModel]]:
    kwargs = {"img_size": size} if "vit" in name else {}
    ann = qs.create_model(name, num_classes=10, activations=("relu", "gelu", "silu"), **kwargs).eval()
    snns = {variant: qs.convert(ann, **options).eval() for variant, options in VARIANTS.items()}
    snns["no_head"] = qs.SpikingModel(snns["engine"].net, static_head=False).eval()
    return ann, snns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--timesteps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--size", type=int, default=32, help="input side in pixels")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.models:
        ann, snns = build(name, args.size)
        x = torch.randn(args.batch, 3, args.size, args.size)
        kinds = dict(Counter(op.kind for op in compensated_ops(snns["engine"].net)))
        for t in args.timesteps:
            repeated = x.repeat(t, 1, 1, 1)
            fns = {"ann": lambda: ann(x)} | {variant: (lambda snn=snn: snn(x, timesteps=t)) for variant, snn in snns.items()}
            fns["ann_TB"] = lambda: ann(repeated)
            with torch.no_grad():
                times = time_interleaved(fns, args.repeats)
            record = {"benchmark": "compensated_inference", "model": name, "T": t, "batch": args.batch, "size": args.size,
                      "compensated": kinds, "neurons": len(snns["engine"].neurons()), "machine": machine()}
            for clock in ("wall", "cpu"):
                ms = times[clock]
                record[f"{clock}_ms"] = {k: round(v, 2) for k, v in ms.items()}
                record[f"{clock}_ratio"] = round(ms["engine"] / (t * ms["ann"]), 3)
                record[f"{clock}_ratios"] = {k: round(ms[k] / (t * ms["ann"]), 3) for k in [*snns, "ann_TB"]}
            emit(record)


if __name__ == "__main__":
    main()
