"""The cost of QCFS in ANN training: one SGD step of resnet18 with QCFS against the same model with ReLU.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/qcfs_training.py --configs 32

Both models are timm resnet18 with max pooling replaced by average pooling (the QCFS
surgery), trained in train mode (BatchNorm batch statistics), cross-entropy, SGD with
momentum. One JSON line per configuration; ``overhead`` = QCFS ms / ReLU ms − 1.
``--layouts nchw channels_last`` times both layouts side by side (``channels_last_speedup``
= NCHW ms / channels-last ms): what the Train stage's choice of layout rests on.
"""

# ruff: noqa: I001, B023  (_common goes before torch: it sets OMP_WAIT_POLICY; the lambdas run within their loop iteration)
from __future__ import annotations

import argparse

from _common import emit, machine, qcfs_resnet18, relu_resnet18, time_interleaved

import torch
import torch.nn.functional as F

CONFIGS = {"32": (32, 64, 10), "224": (224, 8, 1000)}  # input size, batch, classes
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["32"], choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--channels-last", action="store_true", help="the same as --layouts channels_last")
    ap.add_argument("--layouts", nargs="+", default=["nchw"], choices=list(LAYOUTS),
                    help="several: every model in each layout, timed side by side (suffix _cl for channels-last)")
    args = ap.parse_args()
    layouts = ["channels_last"] if args.channels_last else args.layouts
    for config in args.configs:
        size, batch, classes = CONFIGS[config]
        x = torch.rand(batch, 3, size, size)
        y = torch.randint(0, classes, (batch,))
        fns = {}
        for name, build in (("relu", relu_resnet18), ("qcfs", lambda c: qcfs_resnet18(c, threshold=8.0))):
            for fmt_name in layouts:
                fmt = LAYOUTS[fmt_name]
                model = build(classes).to(memory_format=fmt).train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
                inputs = x.contiguous(memory_format=fmt)

                def step(model=model, opt=opt, inputs=inputs):
                    F.cross_entropy(model(inputs), y).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                fns[name + ("_cl" if fmt_name == "channels_last" else "")] = step
        res = time_interleaved(fns, args.repeats)
        record = {
            "bench": "qcfs_training", "model": "resnet18", "input": size, "batch": batch,
            "layout": layouts[0] if len(layouts) == 1 else layouts, "repeats": args.repeats,
        }
        for kind, ms in res.items():
            record[f"{kind}_ms"] = {k: round(v, 1) for k, v in ms.items()}
            for suffix in ("", "_cl"):
                if "qcfs" + suffix in ms:
                    record[f"{kind}_overhead{suffix}"] = round(ms["qcfs" + suffix] / ms["relu" + suffix] - 1, 4)
            if len(layouts) > 1:
                record[f"{kind}_channels_last_speedup"] = {n: round(ms[n] / ms[n + "_cl"], 3) for n in ("relu", "qcfs")}
        record["machine"] = machine()
        emit(record)


if __name__ == "__main__":
    main()
