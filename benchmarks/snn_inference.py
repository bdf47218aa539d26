"""SNN inference: the ANN, this engine and its peers side by side, one JSON line per (input, T).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/snn_inference.py --configs 32 224 --timesteps 1 4 8 16

Engines (all timm resnet18 with QCFS → IF, batch-first static input, no grad):
  ann            the QCFS ANN, one forward at batch B (the floor is T × this)
  engine         SpikingModel: time folded into the batch, fused neuron loop, static head once
  engine_no_head the same without the static head (``static_head=False``)
  snntorch       snntorch.Leaky per activation, whole network once per step (tutorial idiom)
  spikingjelly   SpikingJelly 2.0 multi-step IFNode on the time-folded network (if installed)
``ratio`` is ms / (T × ann ms); ``speedup_vs`` is the peer's ms / engine ms; both from wall
time and from CPU time (process_time: on a shared machine it leaves out the time other
processes held the cores). ``--channels-last`` puts every network and input in that layout.
"""

# ruff: noqa: I001, B023  (_common goes before torch: it sets OMP_WAIT_POLICY; the lambdas run within their loop iteration)
from __future__ import annotations

import argparse

from _common import emit, machine, peers, qcfs_resnet18, time_interleaved

import torch

CONFIGS = {"32": (32, 64, 10), "224": (224, 8, 1000)}  # input size, batch, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["32"], choices=list(CONFIGS))
    ap.add_argument("--timesteps", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", nargs="+", default=["engine", "engine_no_head", "snntorch", "spikingjelly"])
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for config in args.configs:
        size, batch, classes = CONFIGS[config]
        ann = qcfs_resnet18(classes).to(memory_format=fmt).eval()
        engines = peers(ann, args.engines)
        if "engine_no_head" in args.engines:
            engines["engine_no_head"] = peers(ann, ["engine"])["engine"]
            engines["engine_no_head"].static_head = False
        x = torch.rand(batch, 3, size, size).contiguous(memory_format=fmt)
        for steps in args.timesteps:
            fns = {"ann": lambda: ann(x)}
            fns.update({name: (lambda e=e: e(x, timesteps=steps)) for name, e in engines.items()})
            with torch.no_grad():
                res = time_interleaved(fns, args.repeats)
            record = {
                "bench": "snn_inference", "model": "resnet18", "input": size, "batch": batch, "T": steps,
                "layout": "channels_last" if args.channels_last else "nchw", "repeats": args.repeats,
            }
            for kind, ms in res.items():
                record[f"{kind}_ms"] = _round(ms)
                record[f"{kind}_ratio"] = _round({k: v / (steps * ms["ann"]) for k, v in ms.items() if k != "ann"})
                if "engine" in ms:
                    record[f"{kind}_speedup_vs"] = _round({k: ms[k] / ms["engine"] for k in ms if k not in ("ann", "engine")})
            record["machine"] = machine()
            emit(record)


def _round(d: dict) -> dict:
    return {k: round(v, 3) for k, v in d.items()}


if __name__ == "__main__":
    main()
