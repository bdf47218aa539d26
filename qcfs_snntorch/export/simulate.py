"""simulate_nir: a reference executor for the NIR graphs :func:`~qcfs_snntorch.export.export_nir` writes."""

from __future__ import annotations

from collections import defaultdict, deque

import nir
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["simulate_nir"]


def _topological_order(graph: nir.NIRGraph) -> tuple[list[str], dict[str, list[str]]]:
    preds: dict[str, list[str]] = defaultdict(list)
    indegree = dict.fromkeys(graph.nodes, 0)
    for src, dst in graph.edges:
        preds[dst].append(src)
        indegree[dst] += 1
    ready = deque(n for n, d in indegree.items() if d == 0)
    order = []
    while ready:
        name = ready.popleft()
        order.append(name)
        for src, dst in graph.edges:
            if src == name:
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
    if len(order) != len(graph.nodes):
        raise ValueError("simulate_nir: the graph has a cycle (recurrent graphs are not supported)")
    return order, preds


def _ints(value) -> tuple[int, ...] | str:
    return value if isinstance(value, str) else tuple(int(v) for v in np.atleast_1d(value))


def _conv(node, p, inp):
    conv = F.conv2d if isinstance(node, nir.Conv2d) else F.conv1d
    return conv(inp, p["weight"], p["bias"], _ints(node.stride), _ints(node.padding), _ints(node.dilation), int(node.groups))


def _pool(node, p, inp):
    k, s, pad = _ints(node.kernel_size), _ints(node.stride), _ints(node.padding)
    return F.avg_pool2d(inp, k, s, pad, count_include_pad=True, divisor_override=1 if isinstance(node, nir.SumPool2d) else None)


def _torch_dim(dim) -> int:
    """NIR's dims exclude the batch: one from the start moves past it, one from the end stays."""
    return int(dim) + 1 if int(dim) >= 0 else int(dim)


def _flatten(node, p, inp):
    return inp.flatten(_torch_dim(node.start_dim), _torch_dim(node.end_dim))


# Stateless nodes: (node, its float parameters as tensors, the summed input) → output.
_STATELESS = {
    nir.Input: lambda node, p, inp: inp,
    nir.Output: lambda node, p, inp: inp,
    nir.Conv1d: _conv,
    nir.Conv2d: _conv,
    nir.Affine: lambda node, p, inp: F.linear(inp, p["weight"], p["bias"]),
    nir.Linear: lambda node, p, inp: F.linear(inp, p["weight"]),
    nir.Scale: lambda node, p, inp: inp * p["scale"],
    nir.Flatten: _flatten,
    nir.AvgPool2d: _pool,
    nir.SumPool2d: _pool,
}


@torch.no_grad()
def simulate_nir(graph: nir.NIRGraph, x: torch.Tensor, timesteps: int, *, qcfs_semantics: bool = True) -> torch.Tensor:
    """Run a feed-forward NIR graph for ``timesteps`` steps of dt = 1 on a static input ``x``.

    A reference executor for the nodes :func:`export_nir` writes. With
    ``qcfs_semantics=True`` each IF node follows its metadata (``v_initial``, firing on
    ``v >= v_threshold``, subtract reset; a graded node's ``max_spikes``; the threshold of a
    file written for reset-to-zero consumers divided back by its ``threshold_factor``) and
    reproduces the SpikingModel; with ``False`` it follows the NIR spec alone (v(0) = 0,
    firing on ``v > v_threshold``, reset to ``v_reset``), which is what a NIR consumer that
    ignores metadata runs.

    Returns the Output node's value per step, ``[T, B, …]``.
    """
    order, preds = _topological_order(graph)
    (out_name,) = graph.outputs
    params = {n: {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in vars(node).items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"} for n, node in graph.nodes.items()}
    membranes: dict[str, torch.Tensor] = {}
    outputs = []
    for _ in range(timesteps):
        values: dict[str, torch.Tensor] = {}
        for name in order:
            node, p = graph.nodes[name], params[name]
            inp = x.float() if isinstance(node, nir.Input) else sum(values[s] for s in preds[name])
            if isinstance(node, nir.IF):
                values[name] = _if_step(node, p, inp, membranes, name, qcfs_semantics)
            elif type(node) in _STATELESS:
                values[name] = _STATELESS[type(node)](node, p, inp)
            else:
                raise ValueError(f"simulate_nir: node {name!r} of type {type(node).__name__} is not supported")
        outputs.append(values[out_name])
    return torch.stack(outputs)


def _if_step(node, p, inp, membranes, name, qcfs_semantics: bool) -> torch.Tensor:
    theta, r = p["v_threshold"], p["r"]
    meta = node.metadata
    if name not in membranes:
        start = meta.get("v_initial") if qcfs_semantics else None
        v0 = torch.as_tensor(np.asarray(start), dtype=torch.float32) if start is not None else torch.zeros_like(theta)
        membranes[name] = v0.expand_as(inp).clone()
    v = membranes[name] + r * inp
    if not qcfs_semantics:
        spike = v > theta
        membranes[name] = torch.where(spike, p.get("v_reset", torch.zeros_like(theta)).expand_as(v), v)
        return spike.float()
    theta = theta / float(meta.get("threshold_factor", 1.0))
    # A graded node sends k = min(floor(v / θ), max_spikes) spikes as one value; an IF node is the case max_spikes = 1.
    spikes = torch.clamp(torch.floor(v / theta), 0, int(meta.get("max_spikes", 1))) if "max_spikes" in meta else (v >= theta).float()
    membranes[name] = v - spikes * theta
    return spikes
