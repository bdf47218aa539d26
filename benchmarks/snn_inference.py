"""SNN inference: the ANN, this engine and its peers side by side, one JSON line per (input, T).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/snn_inference.py --configs 32 224 --timesteps 1 4 8 16
    python benchmarks/snn_inference.py --device cuda --dtype bf16 --configs 32 224 --timesteps 1 2 4 8

Engines (all timm resnet18 with QCFS → IF, batch-first static input, no grad):
  ann            the QCFS ANN as built (PyTorch's default NCHW layout), one forward at batch B
  ann_cl         the same ANN in channels-last layout (the faster one on the machines measured)
  engine         ``qcfs_snntorch.convert(ann)`` with its defaults: time folded into the batch, fused
                 neuron loop, static head once, the layout it picks itself (channels-last for conv nets)
  engine_no_head the same without the static head (``static_head=False``)
  engine_nchw    the engine held to NCHW (``memory_format=torch.contiguous_format``): what the layout gains
  snntorch       snntorch.Leaky per activation, whole network once per step (tutorial idiom)
  spikingjelly   SpikingJelly 2.0 multi-step IFNode on the time-folded network (if installed)
The peers run in the layout of the ANN they are built from (NCHW unless ``--channels-last``).
``ratio`` is ms / (T × ann ms), ``ratio_cl`` ms / (T × ann_cl ms); ``speedup_vs`` is the peer's
ms / engine ms; all from wall time and, on the CPU, from CPU time (process_time: on a
shared machine it leaves out the time other processes held the cores). ``--channels-last``
puts every network and input in that layout. On a GPU ``peak_mb`` is each call's peak CUDA
memory above what was allocated before it.
"""

# ruff: noqa: I001, B023  (_common goes before torch: it sets OMP_WAIT_POLICY; the lambdas run within their loop iteration)
from __future__ import annotations

import argparse
import copy

from _common import add_device_args, autocast, emit, layout, machine, peak_mb, peers, qcfs_resnet18, time_interleaved

import torch

CONFIGS = {"32": (32, 64, 10), "224": (224, 8, 1000)}  # input size, batch, classes


def engines_for(ann, names: list[str], device: str) -> dict:
    engines = {name: e.to(device) for name, e in peers(ann, names).items()}
    if "engine_no_head" in names:
        engines["engine_no_head"] = peers(ann, ["engine"])["engine"].to(device)
        engines["engine_no_head"].static_head = False
    return engines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["32"], choices=list(CONFIGS))
    ap.add_argument("--timesteps", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", nargs="+", default=["engine", "engine_nchw", "engine_no_head", "snntorch", "spikingjelly"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--batch", type=int, help="batch size for every config (default: 64 at 32×32, 8 at 224×224)")
    add_device_args(ap)
    args = ap.parse_args()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    device = args.device
    for config in args.configs:
        size, batch, classes = CONFIGS[config]
        batch = args.batch or batch
        ann = qcfs_resnet18(classes).to(device, memory_format=fmt).eval()
        ann_cl = copy.deepcopy(ann).to(memory_format=torch.channels_last)
        engines = engines_for(ann, args.engines, device)
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        for steps in args.timesteps:
            fns = {"ann": lambda: ann(x), "ann_cl": lambda: ann_cl(x)}
            fns.update({name: (lambda e=e: e(x, timesteps=steps)) for name, e in engines.items()})
            with torch.no_grad(), autocast(device, args.dtype):
                res = time_interleaved(fns, args.repeats, device=device)
                memory = {n: round(peak_mb(f, device), 1) for n, f in fns.items()} if device.startswith("cuda") else None
            record = {
                "bench": "snn_inference", "model": "resnet18", "input": size, "batch": batch, "T": steps,
                "device": device, "dtype": args.dtype, "repeats": args.repeats,
                "layout": {"ann": layout(ann), "ann_cl": layout(ann_cl), **{n: layout(e) for n, e in engines.items()}},
            }
            for kind, ms in res.items():
                if kind == "cpu" and device != "cpu":
                    continue  # host time of asynchronous GPU work means nothing
                record[f"{kind}_ms"] = _round(ms)
                for base, key in (("ann", "ratio"), ("ann_cl", "ratio_cl")):
                    record[f"{kind}_{key}"] = _round({k: v / (steps * ms[base]) for k, v in ms.items() if not k.startswith("ann")})
                if "engine" in ms:
                    record[f"{kind}_speedup_vs"] = _round({k: ms[k] / ms["engine"] for k in ms if k not in ("ann", "ann_cl", "engine")})
            if memory is not None:
                record["peak_mb"] = memory
            record["machine"] = machine()
            emit(record)


def _round(d: dict) -> dict:
    return {k: round(v, 3) for k, v in d.items()}


if __name__ == "__main__":
    main()
