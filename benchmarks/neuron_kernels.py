"""The IF neuron alone over T steps: this engine's kernels against simpler loops, one JSON line per shape.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/neuron_kernels.py

  inference   the no-grad loop of IFNeuron (membrane and output preallocated, spikes written in place)
  naive       the same dynamics written the obvious way (a bool tensor and a copy per step)
  fused       training: forward + backward through the fused autograd node (saves v only)
  reference   training: forward + backward through the per-step autograd graph (``fused = False``)
Shapes are resnet18's first neuron layer at 32×32, batch 64 (64×16×16 per sample) and its last (512×1×1).
"""

# ruff: noqa: I001, B023  (_common goes before torch: it sets OMP_WAIT_POLICY; the lambdas run within their loop iteration)
from __future__ import annotations

import argparse

from _common import emit, machine, time_interleaved

import torch

from qcfs_snntorch import IFNeuron


def naive(currents: torch.Tensor, theta: float) -> torch.Tensor:
    mem = torch.full_like(currents[0], theta / 2)
    out = []
    for current in currents:
        mem = mem + current
        spike = (mem >= theta).float() * theta
        mem = mem - spike
        out.append(spike)
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timesteps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    steps = args.timesteps
    for shape in [(64, 64, 16, 16), (64, 512, 1, 1)]:
        torch.manual_seed(0)
        x = torch.randn(steps * shape[0], *shape[1:]) * 0.5
        grad = torch.randn_like(x)
        neurons = {}
        for fused in (True, False):
            n = IFNeuron(1.0)
            n.fused, n.timesteps = fused, steps
            neurons[fused] = n

        def run(n, train):
            n.reset_state()
            if not train:
                with torch.no_grad():
                    return n(x)
            n(x.requires_grad_()).backward(grad)
            x.requires_grad_(False)

        with torch.no_grad():
            assert torch.equal(run(neurons[True], False).reshape(steps, *shape), naive(x.reshape(steps, *shape), 1.0))
        fns = {
            "inference": lambda: run(neurons[True], False),
            "naive": lambda: naive(x.reshape(steps, *shape), 1.0),
            "fused": lambda: run(neurons[True], True),
            "reference": lambda: run(neurons[False], True),
        }
        res = time_interleaved(fns, args.repeats)
        record = {"bench": "neuron_kernels", "shape": list(shape), "T": steps, "repeats": args.repeats}
        for kind, ms in res.items():
            record[f"{kind}_ms"] = {k: round(v, 2) for k, v in ms.items()}
            record[f"{kind}_speedup"] = {
                "inference_vs_naive": round(ms["naive"] / ms["inference"], 2),
                "fused_vs_reference": round(ms["reference"] / ms["fused"], 2),
            }
        record["machine"] = machine()
        emit(record)


if __name__ == "__main__":
    main()
