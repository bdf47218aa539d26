"""Shared parts of the benchmarks: machine description, interleaved timing, peer engines.

Import this module before torch: on shared CPUs PyTorch's default OpenMP wait policy
makes every small op stall behind other processes (loops look up to 20× slower than
they are), so ``OMP_WAIT_POLICY=PASSIVE`` is set unless the caller chose a policy.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import qcfs_snntorch as qs  # noqa: E402


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict, repeats: int, warmup: int = 1, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Median wall and CPU milliseconds of each callable, run side by side: one call of each per round.

    Interleaving (with the order rotated every round) spreads the noise of a shared machine
    over all candidates instead of biasing whichever ran during a busy spell. CPU time
    (``time.process_time``, all threads of this process) does not count the time other
    processes held the cores, so on a shared machine it is the steadier of the two.
    """
    names = list(fns)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            if r >= warmup:
                wall[name].append((time.perf_counter() - w) * 1e3)
                cpu[name].append((time.process_time() - c) * 1e3)
    return {"wall": {n: statistics.median(t) for n, t in wall.items()}, "cpu": {n: statistics.median(t) for n, t in cpu.items()}}


def add_device_args(ap) -> None:
    """``--device`` and ``--dtype`` (bf16: every candidate under autocast) for the scripts that run on GPUs too."""
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast around every call")


def autocast(device: str, dtype: str):
    """The autocast context of ``--dtype`` on ``device`` (a no-op for fp32)."""
    import contextlib

    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def cuda_peak_mb(fn, device: str) -> float:
    """Peak CUDA memory one call of ``fn`` allocates above what was allocated before it (MiB)."""
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def peak_mb(fn, device: str) -> float:
    """Peak memory of one call: CUDA allocations on a GPU, resident memory on the CPU."""
    return cuda_peak_mb(fn, device) if device.startswith("cuda") else peak_rss_mb(fn)


def layout(module: nn.Module) -> str:
    """The memory layout of a network's first 4-D weight (what its convolutions run in)."""
    weight = next((p for p in module.parameters() if p.dim() == 4), None)
    if weight is None:
        return "none"
    return "channels_last" if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous() else "nchw"


def _status_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def peak_rss_mb(fn) -> float:
    """Peak resident memory added by one call of ``fn`` (MiB), on Linux.

    Free memory is handed back to the OS first (``malloc_trim``) and the kernel's
    high-water mark is reset (``/proc/self/clear_refs`` ← 5), so the figure is this
    call's peak above what was live before it: activations, gradients, temporaries.
    """
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def saved_mb(fn, params) -> float:
    """MiB of tensors autograd saves for backward during ``fn`` (distinct storages, parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


# --- models -------------------------------------------------------------------------


def qcfs_resnet18(num_classes: int, threshold: float = 1.0) -> nn.Module:
    """timm resnet18 with QCFS activations (max pool → avg pool), λ = ``threshold`` so that neurons fire."""
    torch.manual_seed(0)
    return qs.create_model("resnet18", num_classes=num_classes, levels=4, threshold=threshold)


def relu_resnet18(num_classes: int) -> nn.Module:
    """The same architecture (avg pool) with ReLU."""
    torch.manual_seed(0)
    return qs.create_model("resnet18", num_classes=num_classes, activations=())


def _replace_qcfs(model: nn.Module, make) -> nn.Module:
    net = copy.deepcopy(model)
    for name, m in list(net.named_modules()):
        if isinstance(m, qs.QCFS):
            net.set_submodule(name, make(m.threshold.item()))
    return net


class SnnTorchStepLoop(nn.Module):
    """The snnTorch tutorial idiom: every QCFS → ``snntorch.Leaky`` (β = 1, subtract reset,
    spikes worth θ, ``init_hidden``), the whole network called once per step.

    (snnTorch fires on v > θ and starts at v = 0: a slightly different function, the same work.)
    """

    def __init__(self, ann: nn.Module):
        super().__init__()
        import snntorch

        def leaky(theta):
            return snntorch.Leaky(beta=1.0, threshold=theta, reset_mechanism="subtract", graded_spikes_factor=theta, init_hidden=True)

        self.net = _replace_qcfs(ann, leaky)
        self.leaky = [m for m in self.net.modules() if isinstance(m, snntorch.Leaky)]

    def forward(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        for m in self.leaky:
            m.reset_mem()
        return torch.stack([self.net(x) for _ in range(timesteps)])


class _SJFolded(nn.Module):
    """SpikingJelly multi-step ``IFNode`` inside a time-folded network: ``[T·B, …]`` → ``[T, B, …]`` and back
    (what ``SeqToANNContainer`` does around the stateless layers), spikes scaled to θ."""

    def __init__(self, theta: float, timesteps: list[int]):
        super().__init__()
        from spikingjelly.activation_based import neuron

        self.node = neuron.IFNode(v_threshold=theta, v_reset=None, detach_reset=True, step_mode="m")
        self.theta, self.timesteps = theta, timesteps

    def forward(self, x):
        steps = self.timesteps[0]
        return self.node(x.reshape(steps, -1, *x.shape[1:])).flatten(0, 1) * self.theta


class SpikingJellyMultiStep(nn.Module):
    """SpikingJelly 2.0 multi-step: IFNode(step_mode="m", soft reset) per QCFS, stateless layers on ``[T·B, …]``."""

    def __init__(self, ann: nn.Module):
        super().__init__()
        self.steps = [1]
        self.net = _replace_qcfs(ann, lambda theta: _SJFolded(theta, self.steps))

    def forward(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        from spikingjelly.activation_based import functional

        functional.reset_net(self.net)
        self.steps[0] = timesteps
        folded = x.unsqueeze(0).expand(timesteps, *x.shape).flatten(0, 1)
        out = self.net(folded)
        return out.reshape(timesteps, -1, *out.shape[1:])


def spikingjelly_available() -> bool:
    try:
        import spikingjelly.activation_based  # noqa: F401
    except Exception:
        return False
    return True


def peers(ann: nn.Module, want: list[str]) -> dict[str, nn.Module]:
    """The SNN engines compared, each a module called as ``engine(x, timesteps)`` → ``[T, B, classes]``."""
    engines = {}
    if "engine" in want:
        engines["engine"] = qs.convert(ann)  # its defaults, the layout it picks included
    if "engine_nchw" in want:  # the same engine held to PyTorch's default layout: what the choice of layout gains
        engines["engine_nchw"] = qs.convert(ann, memory_format=torch.contiguous_format)
    if "snntorch" in want:
        engines["snntorch"] = SnnTorchStepLoop(ann)
    if "spikingjelly" in want and spikingjelly_available():
        engines["spikingjelly"] = SpikingJellyMultiStep(ann)
    return engines
