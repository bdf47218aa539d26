"""Chains of compensated operations run on running means, with no round trip to spikes between them.

A compensated op (:mod:`qcfs_snntorch.compensation`) turns its inputs into running means
(``cumsum``, divide), applies ``f`` and turns the result back into per-step values (times
``t``, difference over time). When its output only feeds another compensated op, through
layers that are linear (a projection, a reshape, a scale), the second op's running mean
undoes the first op's difference exactly: the round trip is wasted work. In a ViT's
attention (LayerNorm → q, k, v → attention) it is most of the compensation's cost.

Linear layers commute with taking running means (the mean over steps of ``W·x_t + b`` is
``W·m_t + b``), so such a chain can run on running means from its first op to its last:
the first op takes running means of its inputs as before, the ones after it take their
inputs as running means already (:attr:`CompensatedOp.mean_signals`), the linear layers in
between compute on running means, and the values are turned back into per-step values
once, where something needs them per step: a neuron, the output, a layer that also sees a
per-step value, a BatchNorm or dropout (batch statistics and random masks in training are
not linear), by the op itself or by a :class:`~qcfs_snntorch.compensation.StepDifference`.

The result is the same function (the outputs through step ``t`` still sum to ``t·f`` of
the running means, in the folded engine and in the streaming ``step`` API alike), up to
floating-point rounding; at ``T = 1`` every running mean is its value and nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx
from torch import nn

from .compensation import CompensatedOp, StepDifference
from .neurons import MultiStepNeuron
from .qcfs import QCFS
from .tracing import node_owner

__all__ = ["run_chains_on_means"]

_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel"}


def _is_metadata(node: torch.fx.Node) -> bool:
    """A shape, dtype or size read off a value: the same whatever the value's domain."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRS


def _needs_steps(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A node that must see per-step values: a neuron, or a layer that is linear only in eval mode."""
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, (QCFS, MultiStepNeuron, nn.modules.batchnorm._BatchNorm)) or "drop" in type(module).__name__.lower()
    if node.op in ("call_function", "call_method"):
        return "dropout" in getattr(node.target, "__name__", str(node.target)).lower()
    return node.op == "output"


def _signal_args(node: torch.fx.Node, op: CompensatedOp) -> set[torch.fx.Node]:
    found = set()
    for key in op.signals:
        arg = node.args[key] if isinstance(key, int) else node.kwargs.get(key)
        if isinstance(arg, torch.fx.Node):
            found.add(arg)
    return found


def run_chains_on_means(graph: torch.fx.Graph, modules: dict[str, nn.Module], ops: dict[torch.fx.Node, CompensatedOp],
                        add_difference: Callable[[StepDifference], str]) -> int:
    """Rewrite ``graph`` (in place) so that chains of the compensated ops ``ops`` run on running means.

    ``modules`` maps the graph's module targets to modules;
    ``add_difference`` registers a new :class:`StepDifference` and returns its target.
    Sets each op's ``mean_signals`` and ``emits_means``; returns how many ops take a signal
    as a running mean.
    """
    nodes = list(graph.nodes)
    signal: set[torch.fx.Node] = set()  # depends on the input (not a constant, not metadata)
    can_mean: set[torch.fx.Node] = set()  # linear, and every signal input could be a running mean
    for node in nodes:
        inputs = [a for a in node.all_input_nodes if a in signal]
        if node.op == "placeholder" or (inputs and not _is_metadata(node)):
            signal.add(node)
        linear = node.op != "placeholder" and node in signal and not _needs_steps(node, modules)
        if node in ops or (linear and all(a in ops or a in can_mean for a in inputs)):
            can_mean.add(node)
    # Backwards: a value is wanted as a running mean when a compensated op takes it as a signal,
    # or a linear node that is itself computed on running means uses it.
    on_means: set[torch.fx.Node] = set()
    for node in reversed(nodes):
        if node not in can_mean:
            continue
        if any(_takes_means(user, node, ops, on_means) for user in node.users):
            on_means.add(node)
    fused = 0
    for node in nodes:
        if node in ops:
            op = ops[node]
            op.mean_signals = frozenset(k for k in op.signals if _arg(node, k) in on_means)
            fused += bool(op.mean_signals)
        if node not in on_means:
            continue
        step_users = [u for u in node.users if not _takes_means(u, node, ops, on_means)]
        if node in ops:
            ops[node].emits_means = True
        if step_users:
            target = add_difference(StepDifference(_where(node, ops)))
            with graph.inserting_after(node):
                back = graph.call_module(target, (node,))
            for user in step_users:
                user.replace_input_with(node, back)
    for node, op in ops.items():
        if node not in on_means:
            op.emits_means = False
    return fused


def _takes_means(user: torch.fx.Node, node: torch.fx.Node, ops: dict, on_means: set) -> bool:
    """Does ``user`` take ``node`` as a running mean: a compensated op's signal, or a linear node computed on means?"""
    if user in ops:
        return node in _signal_args(user, ops[user])
    return user in on_means


def _arg(node: torch.fx.Node, key: int | str):
    return node.args[key] if isinstance(key, int) else node.kwargs.get(key)


def _where(node: torch.fx.Node, ops: dict[torch.fx.Node, CompensatedOp]) -> str:
    return ops[node].where if node in ops else node_owner(node)
