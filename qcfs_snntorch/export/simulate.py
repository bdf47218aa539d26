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


@torch.no_grad()
def simulate_nir(graph: nir.NIRGraph, x: torch.Tensor, timesteps: int, *, qcfs_semantics: bool = True) -> torch.Tensor:
    """Run a feed-forward NIR graph for ``timesteps`` steps of dt = 1 on a static input ``x``.

    A reference executor for the nodes :func:`export_nir` writes. With
    ``qcfs_semantics=True`` each IF node follows its metadata (``v_initial``, firing on
    ``v >= v_threshold``, subtract reset) and reproduces the SpikingModel; with ``False``
    it follows the NIR spec alone (v(0) = 0, firing on ``v > v_threshold``, reset to
    ``v_reset``), which is what a NIR consumer that ignores metadata runs.

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
            if isinstance(node, (nir.Input, nir.Output)):
                out = inp
            elif isinstance(node, nir.Conv2d):
                out = F.conv2d(inp, p["weight"], p["bias"], _ints(node.stride), _ints(node.padding), _ints(node.dilation), int(node.groups))
            elif isinstance(node, nir.Conv1d):
                out = F.conv1d(inp, p["weight"], p["bias"], _ints(node.stride), _ints(node.padding), _ints(node.dilation), int(node.groups))
            elif isinstance(node, nir.Affine):
                out = F.linear(inp, p["weight"], p["bias"])
            elif isinstance(node, nir.Linear):
                out = F.linear(inp, p["weight"])
            elif isinstance(node, nir.Scale):
                out = inp * p["scale"]
            elif isinstance(node, nir.Flatten):
                end = int(node.end_dim)
                out = inp.flatten(int(node.start_dim) + 1, end + 1 if end >= 0 else -1)
            elif isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
                k, s, pad = _ints(node.kernel_size), _ints(node.stride), _ints(node.padding)
                out = F.avg_pool2d(inp, k, s, pad, count_include_pad=True, divisor_override=1 if isinstance(node, nir.SumPool2d) else None)
            elif isinstance(node, nir.IF):
                out = _if_step(node, p, inp, membranes, name, qcfs_semantics)
            else:
                raise ValueError(f"simulate_nir: node {name!r} of type {type(node).__name__} is not supported")
            values[name] = out
        outputs.append(values[out_name])
    return torch.stack(outputs)


def _if_step(node, p, inp, membranes, name, qcfs_semantics: bool) -> torch.Tensor:
    theta, r = p["v_threshold"], p["r"]
    if name not in membranes:
        start = node.metadata.get("v_initial") if qcfs_semantics else None
        v0 = torch.as_tensor(np.asarray(start), dtype=torch.float32) if start is not None else torch.zeros_like(theta)
        membranes[name] = v0.expand_as(inp).clone()
    v = membranes[name] + r * inp
    spike = (v >= theta) if qcfs_semantics else (v > theta)
    if qcfs_semantics:
        v = v - spike * theta
    else:
        v = torch.where(spike, p["v_reset"].expand_as(v), v)
    membranes[name] = v
    return spike.float()
