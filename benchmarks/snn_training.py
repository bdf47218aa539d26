"""One fine-tuning step through T steps (forward, loss on the mean output, backward, SGD step):
this engine against the ANN and the peers, time and memory, one JSON line per T.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/snn_training.py --timesteps 1 2 4

Engines (timm resnet18 with QCFS, 32×32, batch 64; SNNs with BatchNorm frozen, as
fine-tuning does by default):
  ann          the ANN's training step at batch B, NCHW as built (``ratio`` is ms / (T × this))
  ann_cl       the same in channels-last layout (``ratio_cl`` is ms / (T × this))
  ann_TB       the ANN's training step at batch T·B (the memory reference)
  engine       ``qcfs_snntorch.convert(ann)`` with its defaults: time folded, static head once,
               fused IF autograd node, the layout it picks (channels-last for conv nets)
  engine_nchw  the engine held to NCHW (``memory_format=torch.contiguous_format``): what the layout gains
  snntorch     snntorch.Leaky per activation, network called once per step, BPTT by autograd
  spikingjelly SpikingJelly 2.0 multi-step IFNode (if installed)
Memory, per engine (MiB): ``peak_mb`` is the peak resident memory one step adds above what
was live before it (glibc's free lists trimmed, the kernel's high-water mark reset; Linux
only), on a GPU the peak CUDA memory above what was allocated before it; ``saved_mb`` is
what autograd stores for backward (distinct storages, parameters excluded), which is what
grows with T. ``--device cuda --dtype bf16`` runs every step under bf16 autocast.
"""

# ruff: noqa: I001, B023  (_common goes before torch: it sets OMP_WAIT_POLICY; the lambdas run within their loop iteration)
from __future__ import annotations

import argparse
import copy

from _common import add_device_args, autocast, emit, layout, machine, peak_mb, peers, qcfs_resnet18, saved_mb, time_interleaved

import torch
import torch.nn.functional as F
from torch import nn


def _freeze_bn(net: nn.Module) -> nn.Module:
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timesteps", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", nargs="+", default=["engine", "engine_nchw", "snntorch", "spikingjelly"])
    ap.add_argument("--channels-last", action="store_true", help="all networks and inputs in channels-last layout")
    add_device_args(ap)
    args = ap.parse_args()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    device = args.device

    ann = qcfs_resnet18(10).to(device, memory_format=fmt).train()
    ann_cl = copy.deepcopy(ann).to(memory_format=torch.channels_last)
    engines = {name: _freeze_bn(e.to(device)) for name, e in peers(ann, args.engines).items()}
    x = torch.rand(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step(module, opt, inputs, labels, steps=None):
        with autocast(device, args.dtype):
            out = module(inputs) if steps is None else module(inputs, timesteps=steps).mean(0)
            loss = F.cross_entropy(out.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    models = [("ann", ann), ("ann_cl", ann_cl), *engines.items()]
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for name, m in models}
    for steps in args.timesteps:
        xt, yt = x.repeat(steps, 1, 1, 1).contiguous(memory_format=fmt), y.repeat(steps)
        fns = {"ann": lambda: step(ann, opts["ann"], x, y), "ann_cl": lambda: step(ann_cl, opts["ann_cl"], x, y),
               "ann_TB": lambda: step(ann, opts["ann"], xt, yt)}
        fns.update({n: (lambda n=n, e=e: step(e, opts[n], x, y, steps)) for n, e in engines.items()})
        res = time_interleaved(fns, args.repeats, device=device)
        memory = {n: round(peak_mb(f, device), 1) for n, f in fns.items()}
        with autocast(device, args.dtype):
            saved = {"ann": saved_mb(lambda: ann(x), ann.parameters()), "ann_TB": saved_mb(lambda: ann(xt), ann.parameters())}
            saved.update({n: saved_mb(lambda e=e: e(x, timesteps=steps), e.parameters()) for n, e in engines.items()})
        record = {
            "bench": "snn_training", "model": "resnet18", "input": args.size, "batch": args.batch, "T": steps,
            "device": device, "dtype": args.dtype, "repeats": args.repeats,
            "layout": {"ann": layout(ann), "ann_cl": layout(ann_cl), **{n: layout(e) for n, e in engines.items()}},
        }
        for kind in ("wall", "cpu"):
            if kind == "cpu" and device != "cpu":
                continue  # host time of asynchronous GPU work means nothing
            ms = res[kind]
            record[f"{kind}_ms"] = {k: round(v, 1) for k, v in ms.items()}
            for base, key in (("ann", "ratio"), ("ann_cl", "ratio_cl")):
                record[f"{kind}_{key}"] = {k: round(v / (steps * ms[base]), 3) for k, v in ms.items() if k not in ("ann", "ann_cl")}
        record["peak_mb"], record["saved_mb"] = memory, {k: round(v, 1) for k, v in saved.items()}
        record["machine"] = machine()
        emit(record)


if __name__ == "__main__":
    main()
