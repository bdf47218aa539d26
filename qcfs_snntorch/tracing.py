"""The torch.fx tracer, forward-function resolution and the module walks every part uses.

- :class:`LeafTracer` traces a whole network with QCFS, neurons and ``torch.nn`` layers as
  leaves (the engine, the exporters, the checks and the statistics all read that graph);
- :func:`trace_own_forward` traces one module's own ``forward`` with its submodules as leaves;
- walks with names that say which network they act on: :func:`qcfs_layers` (the ANN's
  activations), :func:`spiking_neurons` (the SNN's neurons), :func:`batchnorms`;
- two context managers for temporary state: :func:`eval_mode` and :func:`forward_hooks`.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.fx
from timm.layers import get_notrace_functions, is_notrace_module
from torch import nn

from .compensation import RunningState
from .neurons import MultiStepNeuron
from .qcfs import QCFS

__all__ = [
    "MISSING",
    "LeafTracer",
    "ShallowTracer",
    "batchnorms",
    "eval_mode",
    "forward_function",
    "forward_hooks",
    "has_own_forward",
    "is_hashable",
    "node_owner",
    "qcfs_layers",
    "resolve_name",
    "spiking_neurons",
    "stateful_modules",
    "trace_own_forward",
]


def qcfs_layers(model: nn.Module) -> list[QCFS]:
    """The ANN's QCFS activations, in module order."""
    return [m for m in model.modules() if isinstance(m, QCFS)]


def spiking_neurons(model: nn.Module) -> list[MultiStepNeuron]:
    """The SNN's neurons, in module order (paired one to one with the ANN's :func:`qcfs_layers`)."""
    return [m for m in model.modules() if isinstance(m, MultiStepNeuron)]


def stateful_modules(model: nn.Module) -> list[MultiStepNeuron | RunningState]:
    """What carries state over time steps: the neurons and the compensation's running state, in module order."""
    return [m for m in model.modules() if isinstance(m, (MultiStepNeuron, RunningState))]


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d) in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module, no_grad: bool = True) -> Iterator[None]:
    """Eval mode (and no autograd) for the duration; every submodule's own mode is restored after."""
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable]], *, prepend: bool = False) -> Iterator[None]:
    """Register ``module.register_forward_hook(fn)`` for each pair; all removed on exit."""
    handles = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_hook(fn, prepend=prepend))
        yield
    finally:
        for handle in handles:
            handle.remove()


class LeafTracer(torch.fx.Tracer):
    """Traces a whole network, keeping QCFS, neurons and torch.nn layers as leaves.

    Every QCFS / neuron stays a ``call_module`` node of its own (the engine and the
    exporters rely on that). timm's no-trace modules (the ones symbolic tracing cannot
    enter, e.g. ``Conv2dSame``) are leaves too, as timm's own FX feature extraction does,
    unless they contain an activation (``BatchNormAct2d``), which must stay visible.
    """

    def __init__(self):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))

    def trace(self, root, concrete_args=None):
        """As torch.fx, with the root's optional arguments fixed to their defaults (see
        :func:`optional_defaults`): a symbolic ``mask=None`` is "not None" and would trace the
        masked branch (timm's Hiera), which then fails on the real ``None``."""
        if concrete_args is None and isinstance(root, nn.Module):
            concrete_args = optional_defaults(root) or None
        return super().trace(root, concrete_args=concrete_args)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QCFS, MultiStepNeuron, RunningState)):
            return True
        if is_notrace_module(type(m)):
            return not any(isinstance(sub, (QCFS, MultiStepNeuron)) for sub in m.modules())
        return super().is_leaf_module(m, qualname)


class ShallowTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule it calls is a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def has_own_forward(module: nn.Module) -> bool:
    """True if the module's forward is code outside torch.nn (its ops are not covered by class rules)."""
    if isinstance(module, (QCFS, MultiStepNeuron, RunningState)):
        return False
    return not type(module).__module__.startswith("torch.nn")


def forward_function(module: nn.Module):
    """The function ``module(x)`` runs: its class's ``forward``, or one set on the instance
    (timm's FasterNet picks ``self.forward = self.forward_split_cat`` at init)."""
    bound = module.__dict__.get("forward")
    if inspect.ismethod(bound) and bound.__self__ is module:
        return bound.__func__
    return type(module).forward


def optional_defaults(module: nn.Module) -> dict:
    """``module.forward``'s optional arguments after the input with non-tensor defaults
    (``pre_logits=False``, ``mask=None``), name → default: what tracing fixes them to."""
    params = list(inspect.signature(module.forward).parameters.values())[1:]  # after the input
    return {
        p.name: p.default
        for p in params
        if p.kind is p.POSITIONAL_OR_KEYWORD
        and p.default is not inspect.Parameter.empty
        and not isinstance(p.default, torch.Tensor)
    }


def node_owner(node: torch.fx.Node) -> str:
    """The module path a node belongs to (a call_module's own path; else the innermost module on the stack)."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def trace_own_forward(module: nn.Module) -> torch.fx.Graph:
    """The fx graph of ``module.forward`` with every submodule as a leaf; raises if it does not trace.

    Optional arguments with non-tensor defaults (``pre_logits=False``, ``mask=None``) are
    fixed to their defaults: they are what the parent passes in the common case, and a
    symbolic flag would stop tracing at the first ``if``.
    """
    concrete = optional_defaults(module)
    cls, forward = type(module), forward_function(module)
    if forward is not cls.forward:  # fx traces type(root).forward: lend the instance a class with its own
        module.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    try:
        return ShallowTracer().trace(module, concrete_args=concrete or None)
    finally:
        module.__class__ = cls


MISSING = object()


def resolve_name(expr, module: nn.Module, globals_: dict):
    """The object a dotted name (an ``ast`` expression) in ``module``'s forward refers to
    (``self.relu``, ``F.relu``), or :data:`MISSING`."""
    import ast

    attrs = []
    while isinstance(expr, ast.Attribute):
        attrs.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return MISSING
    obj = module if expr.id == "self" else globals_.get(expr.id, getattr(builtins, expr.id, MISSING))
    for attr in reversed(attrs):
        obj = getattr(obj, attr, MISSING)
    return obj


def is_hashable(obj) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True
