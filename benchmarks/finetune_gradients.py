"""Gradient norm and batch accuracy over the first fine-tuning steps, reset detached or kept.

The diagnosis of docs/RESULTS.md ("Why fine-tuning at T = 4 collapsed"): loads a finished run's
ANN, converts it, and runs ``--steps`` SGD steps of the fine-tuning loss (TET, distillation 0.9 from
the ANN, BN frozen) at each ``--timesteps``, once with the reset detached from the gradient and
once with it kept. One JSON line per step:

    python benchmarks/finetune_gradients.py RUN_DIR IMAGEFOLDER_ROOT --timesteps 2 4 --steps 12

IMAGEFOLDER_ROOT is the extracted data set (its ``train`` folder is read).
"""

from __future__ import annotations

import argparse
import json

import torch
import torchvision
from torchvision import transforms

from qcfs_snntorch import convert, load_run
from qcfs_snntorch.training.tasks import SpikingFinetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("root")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    run = load_run(args.run_dir)
    meta = run.metadata
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(meta["mean"], meta["std"])])
    images = torchvision.datasets.ImageFolder(f"{args.root}/train", normalise)
    for timesteps in args.timesteps:
        for detach_reset in (True, False):
            torch.manual_seed(0)
            batches = iter(torch.utils.data.DataLoader(images, batch_size=args.batch, shuffle=True))
            snn = convert(run.ann, learn_threshold=True, detach_reset=detach_reset, verify=False)
            task = SpikingFinetune(timesteps, loss="tet", distill=0.9, teacher=run.ann)
            optimizer = torch.optim.SGD([p for p in snn.parameters() if p.requires_grad], lr=args.lr, momentum=0.9)
            for step in range(args.steps):
                x, y = next(batches)
                task.train_mode(snn)
                result = task(snn, x, y, step)
                optimizer.zero_grad()
                result["loss"].backward()
                norm = torch.sqrt(sum((p.grad**2).sum() for p in snn.parameters() if p.grad is not None))
                optimizer.step()
                task.after_update(snn)
                print(json.dumps({
                    "T": timesteps, "detach_reset": detach_reset, "step": step, "loss": round(result["loss"].item(), 4),
                    "batch_top1": round((result["output"].argmax(-1) == y).float().mean().item(), 4),
                    "grad_norm": round(norm.item(), 3),
                }), flush=True)


if __name__ == "__main__":
    main()
