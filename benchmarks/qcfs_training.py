"""The cost of QCFS in ANN training: one SGD step of resnet18 with QCFS against the same model with ReLU.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/qcfs_training.py --configs 32

Both models are timm resnet18 with max pooling replaced by average pooling (the QCFS
surgery), trained in train mode (BatchNorm batch statistics), cross-entropy, SGD with
momentum. One JSON line per configuration; ``overhead`` = QCFS ms / ReLU ms − 1.
"""

# ruff: noqa: I001, B023  (_common goes before torch: it sets OMP_WAIT_POLICY; the lambdas run within their loop iteration)
from __future__ import annotations

import argparse

from _common import emit, machine, qcfs_resnet18, relu_resnet18, time_interleaved

import torch
import torch.nn.functional as F

CONFIGS = {"32": (32, 64, 10), "224": (224, 8, 1000)}  # input size, batch, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["32"], choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for config in args.configs:
        size, batch, classes = CONFIGS[config]
        models = {"relu": relu_resnet18(classes), "qcfs": qcfs_resnet18(classes, threshold=8.0)}
        x = torch.rand(batch, 3, size, size).contiguous(memory_format=fmt)
        y = torch.randint(0, classes, (batch,))
        fns = {}
        for name, model in models.items():
            model.to(memory_format=fmt).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

            def step(model=model, opt=opt):
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            fns[name] = step
        res = time_interleaved(fns, args.repeats)
        record = {
            "bench": "qcfs_training", "model": "resnet18", "input": size, "batch": batch,
            "layout": "channels_last" if args.channels_last else "nchw", "repeats": args.repeats,
        }
        for kind, ms in res.items():
            record[f"{kind}_ms"] = {k: round(v, 1) for k, v in ms.items()}
            record[f"{kind}_overhead"] = round(ms["qcfs"] / ms["relu"] - 1, 4)
        record["machine"] = machine()
        emit(record)


if __name__ == "__main__":
    main()
