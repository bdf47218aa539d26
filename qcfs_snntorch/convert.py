"""convert: a QCFS network → a SpikingModel of IF neurons (snnTorch ``Leaky``)."""

from __future__ import annotations

import copy

import torch
import torch.fx
from timm.layers import BatchNormAct2d, is_notrace_module
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from .check import ConversionError, GraphSort, check, sort_graph
from .compensation import COMPENSATED_KINDS, CompensatedOp, StepDifference, TensorMethod
from .mean_domain import run_chains_on_means
from .neurons import NEURON_KINDS, MultiStepNeuron, make_neuron
from .qcfs import QCFS
from .spiking import SpikingModel
from .tracing import LeafTracer

__all__ = ["compensate", "convert", "fold_batchnorm", "preferred_memory_format", "to_memory_format"]


def _fuse(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        new_weight = weight * scale[:, None]
    elif isinstance(layer, nn.modules.conv._ConvTransposeNd):
        raise ValueError("BatchNorm after a transposed convolution is not folded")
    else:
        new_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        layer.weight.copy_(new_weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(bias * scale + shift)
        else:
            layer.bias.copy_(bias * scale + shift)


# Layers whose output is ``weight * x + bias`` with the stored weight. Subclasses that
# transform their weight in forward (timm's StdConv2d standardises it) are excluded:
# folding a scale into a weight that is re-standardised would be undone.
_FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, Conv2dSame)


def _foldable_layer(layer: nn.Module) -> bool:
    return type(layer) in _FOLDABLE_LAYERS


def _bn_replacement(bn: nn.Module) -> nn.Module | None:
    """What is left of a BatchNorm module once its affine map is folded away (None: do not fold)."""
    if type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return nn.Identity()
    if type(bn) is BatchNormAct2d:  # timm's BN + dropout + activation in one module
        return nn.Sequential(bn.drop, bn.act)
    return None


class _FoldTracer(LeafTracer):
    """For finding conv → BN pairs only: every timm no-trace module is a leaf, so
    ``BatchNormAct2d`` is one foldable node and VGG's head (which does not trace) is opaque."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_notrace_module(type(m)) or super().is_leaf_module(m, qualname)


def fold_batchnorm(net: nn.Module) -> int:
    """Fold each BatchNorm that directly follows a conv/linear used only by it; returns the count.

    Pairs are found on the traced graph, so residual branches and shared layers are never
    folded wrongly. Folding uses the running statistics (the network's eval-mode function).
    timm's ``BatchNormAct2d`` is folded too; its activation stays in place.
    """
    try:
        graph = _FoldTracer().trace(net)
    except Exception as exc:
        raise ValueError(f"fold_bn needs a traceable network; tracing {type(net).__name__} failed: {exc}") from exc
    modules = dict(net.named_modules())
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        layer, bn = modules[source.target], modules[node.target]
        rest = _bn_replacement(bn)
        if rest is not None and _foldable_layer(layer) and layer.weight.shape[0] == bn.num_features and bn.track_running_stats:
            _fuse(layer, bn)
            net.set_submodule(node.target, rest)
            folded += 1
    return folded


def _compensate_if_traceable(net: nn.Module, chains_on_means: bool) -> set[str]:
    """Compensate where needed; returns the paths of activations that compute constants (left as QCFS)."""
    try:
        sort = sort_graph(net)
    except Exception:  # noqa: BLE001 - does not trace: check refused it if it needed compensation
        return set()
    compensate(net, sort, chains_on_means=chains_on_means)
    return sort.constant_activations


def _unique(name: str, taken: nn.ModuleDict) -> str:
    base = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "root"
    key, i = base, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    return key


def _free_attr(net: nn.Module, name: str) -> str:
    while hasattr(net, name):
        name += "_"
    return name


def compensate(net: nn.Module, sort: GraphSort | None = None, *, chains_on_means: bool = True) -> int:
    """Rewrite ``net`` (in place) so that every non-linear op after a neuron is a compensated op
    and every activation called at several places has one module per call; returns the number
    of ops rewritten (0: the network is left exactly as it was).

    The whole network is traced (:func:`~qcfs_snntorch.check.sort_graph`, in eval mode);
    each op to compensate becomes a :mod:`~qcfs_snntorch.compensation` module in
    ``net.compensated`` (a module op keeps its parameters where they are, shared by all its
    call sites), each extra call of a shared QCFS a copy in ``net.call_sites``. The traced
    graph becomes the network's ``forward`` (its class is kept, as a subclass), so module
    paths and the state dict are those of the input plus the new modules. With
    ``chains_on_means`` (the default), chains of compensated ops joined by linear layers run
    on running means from the first op to the last (:mod:`~qcfs_snntorch.mean_domain`: the
    same function, without a round trip to per-step values between them).
    """
    sort = sort or sort_graph(net)
    if not sort.compensated and not sort.call_sites:
        return 0
    graph, modules = sort.graph, dict(net.named_modules())
    compensated, sites = nn.ModuleDict(), nn.ModuleDict()
    ops: dict[torch.fx.Node, CompensatedOp] = {}
    for node, kind, where, op in sort.compensated:
        fn = modules[node.target] if node.op == "call_module" else TensorMethod(node.target) if node.op == "call_method" else node.target
        signals = [i for i, a in enumerate(node.args) if _is_signal(a, sort)]
        signals += [k for k, a in node.kwargs.items() if _is_signal(a, sort)]
        name = _unique(f"{where}_{op}", compensated)
        compensated[name] = COMPENSATED_KINDS[kind](fn, signals, where)
        ops[_retarget(sort, node, f"{{}}.{name}")] = compensated[name]
    for target, nodes in sort.call_sites.items():
        for node in nodes[1:]:  # the first call keeps the module
            name = _unique(f"{target}_call", sites)
            sites[name] = copy.deepcopy(modules[target])
            _retarget(sort, node, f"{{sites}}.{name}")
    prefix = {"": _free_attr(net, "compensated"), "sites": _free_attr(net, "call_sites")}
    for node in graph.nodes:
        if node.op == "call_module" and node.target.startswith("{"):
            node.target = node.target.replace("{}", prefix[""]).replace("{sites}", prefix["sites"])
    if len(compensated):
        net.add_module(prefix[""], compensated)
    if len(sites):
        net.add_module(prefix["sites"], sites)

    def add_difference(module: StepDifference) -> str:
        name = _unique(f"{module.where}_to_steps", compensated)
        compensated[name] = module
        return f"{prefix['']}.{name}"

    if chains_on_means and ops:
        run_chains_on_means(graph, dict(net.named_modules()), ops, add_difference)
    _install_forward(net, graph)
    return len(sort.compensated) + sum(len(n) - 1 for n in sort.call_sites.values())


def _is_signal(arg, sort: GraphSort) -> bool:
    return isinstance(arg, torch.fx.Node) and arg in sort.dynamic


def _retarget(sort: GraphSort, node: torch.fx.Node, target: str) -> torch.fx.Node:
    """Make ``node`` a call of the module at ``target`` with the same arguments (a signal stays one)."""
    with sort.graph.inserting_after(node):
        new = sort.graph.call_module(target, node.args, node.kwargs)
    new.meta = dict(node.meta)
    if node in sort.dynamic:
        sort.dynamic.add(new)
    node.replace_all_uses_with(new)
    sort.graph.erase_node(node)
    return new


def _install_forward(net: nn.Module, graph: torch.fx.Graph) -> None:
    """Give ``net`` the graph's code as its forward (a subclass of its class, as create_model's rewrites do)."""
    graph.lint()
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<compensated forward of {type(net).__name__}>", "exec"), namespace)
    cls = type(net)
    net.__class__ = type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__})
    net.__dict__.pop("forward", None)  # a forward chosen per instance would hide the new one


def preferred_memory_format(model: nn.Module) -> torch.memory_format:
    """The layout a network runs fastest in: channels-last where it has 2-D convolutions, else PyTorch's default.

    Convolutions are most of an SNN's time. On the 2-core CPU of docs/BENCHMARKS.md the
    converted resnet18 ran as fast in channels-last at T = 1 and up to 1.25× faster at
    larger T (a larger folded batch); cuDNN's tensor-core kernels prefer that layout too.
    A network in this layout makes its activations channels-last whatever layout its
    input has.
    """
    has_conv2d = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if has_conv2d else torch.contiguous_format


_FORMAT_RANKS = {torch.channels_last: 4, torch.channels_last_3d: 5}


def to_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """``model`` (in place) with its parameters and buffers in ``memory_format`` where the layout applies.

    ``model.to(memory_format=torch.channels_last)`` fails on any 5-D weight (a Conv3d, as in timm's
    lambda layers: "required rank 4 tensor to use channels_last format"); here only the tensors of
    the format's rank change (4-D for channels-last, 5-D for channels-last-3d) and the others stay.
    """
    rank = _FORMAT_RANKS.get(memory_format)
    if rank is None:
        return model.to(memory_format=memory_format)
    with torch.no_grad():
        for module in model.modules():
            for _, param in module.named_parameters(recurse=False):
                if param.dim() == rank:
                    param.data = param.data.contiguous(memory_format=memory_format)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.dim() == rank:
                    setattr(module, name, buffer.contiguous(memory_format=memory_format))
    return model


def convert(
    model: nn.Module,
    *,
    fold_bn: bool = False,
    learn_threshold: bool = False,
    surrogate: str = "triangle",
    surrogate_width: float = 1.0,
    detach_reset: bool = False,
    chunk_size: int | None = None,
    max_spikes: int = 1,
    neuron: str = "if",
    verify: bool = True,
    memory_format: torch.memory_format | str | None = "auto",
    strict: bool = False,
    chains_on_means: bool = True,
) -> SpikingModel:
    """Convert a network with QCFS activations into a :class:`SpikingModel`.

    Each QCFS becomes an :class:`~qcfs_snntorch.neurons.IFNeuron` with θ = λ, v(0) = φ·θ
    (θ/2 with the paper's φ = ½), reset by subtraction and firing on v ≥ θ; with
    ``max_spikes=B`` > 1 a :class:`~qcfs_snntorch.neurons.GradedIFNeuron` that sends up to B
    spikes of θ = λ/B per step (one layer at T steps is then QCFS with L = B·T). The input
    model is not modified.

    Args:
        fold_bn: fold BatchNorm into the preceding conv/linear (same eval-mode function).
        learn_threshold: make θ a parameter (for hybrid fine-tuning).
        surrogate, surrogate_width: surrogate gradient of the firing rule, width in units of θ.
        detach_reset: no gradient through the reset by subtraction (snnTorch's rule). Off by default:
            with it the gradient of a neuron's count counts every earlier input once per later step,
            about (T + 1)/2 times the slope of its rate, and that gain compounds over the layers of a
            deep network (ResNet-18 fine-tuned at T = 4 collapsed to chance in a few steps).
        chunk_size: most time steps per folded forward (memory bound at large T).
        max_spikes: spikes one neuron may send per step (1: binary IF neurons).
        neuron: the kind of neuron, a key of :data:`~qcfs_snntorch.neurons.NEURON_KINDS`: ``"if"``
            (spikes of +θ only) or ``"signed"`` (:class:`~qcfs_snntorch.neurons.SignedIFNeuron`: also
            −θ spikes that take back earlier ones; binary or graded by ``max_spikes`` alike).
        verify: run :func:`~qcfs_snntorch.check` first (skip it only for a model already checked).
        strict: a network of IF neurons only: refuse every non-linear op that is not QCFS
            (LayerNorm, gates, attention, …) instead of compensating it (see :func:`compensate`).
        memory_format: the layout of the SNN's weights (and so of its activations): ``"auto"``
            picks :func:`preferred_memory_format` (channels-last for 2-D conv networks); a
            ``torch.memory_format`` forces one; ``None`` keeps the model's. The function
            computed is the same in every layout, up to the rounding of convolutions.
        chains_on_means: run chains of compensated ops joined by linear layers on running
            means (:mod:`~qcfs_snntorch.mean_domain`); ``False`` compensates every op on its
            own (the same function up to rounding, slower: for comparisons).

    Raises:
        ConversionError: listing every module or functional op that cannot be converted.
    """
    if isinstance(max_spikes, bool) or not isinstance(max_spikes, int) or max_spikes < 1:
        raise ValueError(f"max_spikes must be a positive integer (1: binary spikes), got {max_spikes!r}")
    if neuron not in NEURON_KINDS:
        raise ValueError(f"unknown neuron {neuron!r}; valid: {', '.join(NEURON_KINDS)}")
    if verify:
        report = check(model, strict=strict)
        if not report.convertible:
            raise ConversionError(report)
    net = copy.deepcopy(model)
    if fold_bn:
        fold_batchnorm(net)
    constants = _compensate_if_traceable(net, chains_on_means) if not strict and not isinstance(net, QCFS) else set()

    def neuron_for(act: QCFS) -> MultiStepNeuron:
        common = dict(shift=act.shift, learn_threshold=learn_threshold, surrogate=surrogate, surrogate_width=surrogate_width,
                      detach_reset=detach_reset)
        # θ = λ for one spike per step; else the arithmetic of QCFS's step λ/L (bit for bit when B = L)
        unit = act.threshold.detach().clone() if max_spikes == 1 else act.threshold.detach() / max_spikes
        return make_neuron(neuron, unit, max_spikes, **common).to(act.threshold.device)

    if isinstance(net, QCFS):
        net = neuron_for(net)
    else:
        for name, module in list(net.named_modules()):
            if isinstance(module, QCFS) and name not in constants:  # a QCFS on parameters alone is no signal
                net.set_submodule(name, neuron_for(module))
    if memory_format == "auto":
        memory_format = preferred_memory_format(net)
    if memory_format is not None:
        net = to_memory_format(net, memory_format)
    return SpikingModel(net, chunk_size=chunk_size).train(model.training)
