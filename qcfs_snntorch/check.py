"""check: how each operation of a network converts, and what cannot, exactly where and why.

Every operation falls in one of four sorts:

- **spiking**: a QCFS activation, which becomes an IF neuron;
- **linear** in the spike rates: conv, linear, BN in eval mode, average pooling, add,
  concat, reshape, products with parameters: they run on spikes as they are;
- **compensated**: any other non-linear op after a neuron (LayerNorm/GroupNorm/RMSNorm,
  softmax, sigmoid gates, unreplaced GELU/SiLU, max, products of two signals such as
  attention): an IF neuron cannot compute it from a rate, so conversion wraps it in an
  expectation-compensated op (:mod:`qcfs_snntorch.compensation`) that computes it on
  the running means; :data:`COMPENSATION` says which kind handles which;
- **refused**: what still cannot convert (a network that torch.fx cannot trace while it
  needs compensated ops, an activation with λ ≤ 0), by path with its reason.

``strict=True`` (``snn.strict=true``) wants a network of neurons only (hardware): every
non-linear op that is not QCFS is refused, as before compensation existed.

Two passes: every module is matched against class rules, and every module's *own*
``forward`` is traced with torch.fx (its submodules as leaves) to find functional ops
(``F.relu``, ``x * gate``, ``q @ k``). Only ops on signals count: arithmetic on
parameters or shapes (weight standardisation, ``x.shape[1] ** -0.5``) is constant.
Tracing one module at a time names the module that owns each op and survives modules
that do not trace (data-dependent control flow): their source is scanned by name instead,
and they are listed in ``CheckReport.untraced``. An activation module used at several
places (or in a loop) is refused in strict mode (converted, the places would share one
membrane); otherwise conversion gives each call site its own neuron.

Not strict, the sorting is done on the graph of the whole network (:func:`sort_graph`),
which is what conversion rewrites: an op counts as compensated only where it runs after a
neuron; the same ops before the first neuron run on the input as in the ANN (a note).
"""

from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import activations as timm_act
from timm.layers import activations_me as timm_act_me
from torch import nn

from .activations import activation_classes
from .models import create_model
from .neurons import MultiStepNeuron
from .qcfs import QCFS
from .tracing import (
    MISSING,
    LeafTracer,
    eval_mode,
    forward_function,
    has_own_forward,
    is_hashable,
    node_owner,
    resolve_name,
    trace_own_forward,
)

__all__ = ["COMPENSATION", "PROBE_BATCHES", "CheckReport", "ConversionError", "GraphSort", "Problem", "check", "folded_batch_problems", "module_kind", "node_kind", "sort_graph"]


@dataclass(frozen=True)
class Problem:
    path: str  # module path, or "forward of <module path>" for a functional op
    op: str
    reason: str
    kind: str = ""  # short category: activation, gate, max, norm, attention, nonlinear

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.op}: {self.reason}"


@dataclass
class CheckReport:
    model: str
    problems: list[Problem] = field(default_factory=list)  # refused
    activations: int = 0  # spiking: QCFS activation modules
    notes: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)  # modules whose own forward fx could not trace
    compensated: list[Problem] = field(default_factory=list)  # kind: the compensation kind (COMPENSATED_KINDS)
    linear: int | None = None  # ops linear in the spike rates (None: the whole network was not traced)
    strict: bool = False
    untraceable: str | None = None  # why the whole network did not trace (then nothing could be compensated)

    @property
    def convertible(self) -> bool:
        return not self.problems and self.activations > 0

    def counts(self) -> dict:
        """How many operations of each sort (compensated also per kind)."""
        return {"spiking": self.activations, "linear": self.linear, "compensated": len(self.compensated),
                "compensated_kinds": dict(Counter(p.kind for p in self.compensated)), "refused": len(self.problems)}

    def summary(self, limit: int = 40) -> str:
        sorts = self._sorts()
        if self.convertible:
            head = f"{self.model}: convertible ({sorts})"
        elif not self.problems:
            head = (f"{self.model}: not convertible: no QCFS activation found (create it with qcfs_snntorch.create_model, "
                    f"naming the network's activations: model.activations=[relu, gelu, silu])")
        else:
            head = f"{self.model}: not convertible, {len(self.problems)} problem(s):"
        lines = [head, *(f"  - {p}" for p in self.problems)]
        if self.compensated:
            lines.append("  compensated (run on the running means of their inputs; snn.strict=true refuses them):")
            lines += [f"  ~ {p}" for p in self.compensated[:limit]]
            if len(self.compensated) > limit:
                lines.append(f"  ~ … and {len(self.compensated) - limit} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _sorts(self) -> str:
        parts = [f"{self.activations} QCFS activations → spiking neurons"]
        if self.compensated:
            kinds = Counter(p.kind for p in self.compensated)
            parts.append(f"{len(self.compensated)} compensated ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")
        if self.linear is not None:
            parts.append(f"{self.linear} linear")
        return ", ".join(parts)


class ConversionError(ValueError):
    """The network contains operations an IF network cannot compute by rate."""

    def __init__(self, report: CheckReport):
        self.report = report
        super().__init__(report.summary())


# kind -> reason shown to the user
REASONS = {
    "activation": "a non-linear activation that is not QCFS; replace it by QCFS (create_model's `activations` groups) and train",
    "gate": "multiplicative gating (e.g. squeeze-excite): a product of two signals is not a rate code",
    "max": "max pooling is not linear in spike rates; use average pooling (create_model does) and train",
    "norm": "per-sample normalisation (statistics of the activations) is not linear in spike rates",
    "attention": "attention multiplies activations with each other; not rate-codable by IF neurons",
    "nonlinear": "a non-linear function of the activations, not expressible by IF neurons",
    "threshold": "a QCFS whose λ is ≤ 0: its neuron would have no threshold to fire at; train it again or "
    "set λ from data (model.threshold_init=data)",
    "shared": "one activation module used at several places (or in a loop): converted, they would share one "
    "membrane; each call needs its own module (create_model does this where the calls are distinct in the source)",
    "batch": "time is folded into the batch dimension, and this op runs over time steps (a neuron or a compensated op): "
    "its input must keep the batch in dim 0 (alone, or as its outer factor: batch × windows), and here the network "
    "moved it (or mixed the samples of a batch)",
    "untraceable": "compensated operations need the whole network to trace with torch.fx (data-dependent control "
    "flow does not); without them it would be a network of IF neurons only",
}

# Check kind → the compensation kind that computes it (not strict); a kind not here is refused.
COMPENSATION = {"activation": "elementwise", "nonlinear": "elementwise", "gate": "gate", "max": "max", "norm": "norm",
                "attention": "product"}
# What the user reads for each compensation kind.
COMPENSATED_REASONS = {
    "norm": "normalisation of the running means (expectation compensation)",
    "gate": "gate of the running mean (expectation compensation)",
    "product": "product of the running means of its operands (expectation compensation)",
    "max": "max of the running means (expectation compensation)",
    "elementwise": "non-linear function of the running mean, left unreplaced (expectation compensation)",
}

_MODULE_RULES: list[tuple[tuple[type, ...], str]] = [
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), "max"),
    (
        (
            nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Softmax, nn.Softmax2d, nn.GLU,
            timm_act.Sigmoid, timm_act.Tanh, timm_act.HardSigmoid, timm_act_me.HardSigmoidMe,
        ),
        "gate",
    ),
    ((nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, nn.RMSNorm), "norm"),
    ((nn.MultiheadAttention,), "attention"),
    (activation_classes(), "activation"),
]

_NONLINEAR_FUNCTIONS = {
    **dict.fromkeys(
        (
            F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.rrelu, F.prelu, F.gelu,
            F.silu, F.mish, F.hardswish, F.elu, F.celu, F.selu, torch.selu, F.softplus, F.hardtanh,
            torch.clamp, torch.clamp_min, torch.clip,
        ),
        "activation",
    ),
    **dict.fromkeys(
        (torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardsigmoid, F.softmax, torch.softmax, F.glu), "gate"
    ),
    **dict.fromkeys(
        (
            F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
            torch.max, torch.amax, torch.maximum, torch.min, torch.amin, torch.minimum,
        ),
        "max",
    ),
    **dict.fromkeys(
        (F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm, F.normalize, torch.var, torch.std, torch.var_mean,
         torch.rsqrt, torch.sqrt, torch.norm),
        "norm",
    ),
    F.scaled_dot_product_attention: "attention",
    **dict.fromkeys((torch.exp, torch.log, torch.pow, operator.pow, torch.abs, torch.sign, torch.topk, torch.sort), "nonlinear"),
}
_NONLINEAR_METHODS = {
    **dict.fromkeys(("relu", "relu_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_"), "activation"),
    **dict.fromkeys(("sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax"), "gate"),
    **dict.fromkeys(("max", "amax", "min", "amin", "maximum", "minimum"), "max"),
    **dict.fromkeys(("sqrt", "rsqrt", "var", "std", "norm"), "norm"),
    **dict.fromkeys(("exp", "exp_", "log", "pow", "pow_", "abs", "abs_", "sign", "topk", "sort"), "nonlinear"),
}
# Bilinear ops are linear when one operand is a parameter (x @ W, conv with its own
# weight) and not when both are signals: a product of two signals is a gate, a matrix
# product of two signals is attention, a convolution with a signal-made kernel (CondConv)
# is a gate.
_BILINEAR_FUNCTIONS = {
    **dict.fromkeys((operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div), "gate"),
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d, F.linear), "gate"),
    **dict.fromkeys((operator.matmul, torch.matmul, torch.bmm, torch.einsum, torch.baddbmm), "attention"),
}
_BILINEAR_METHODS = {**dict.fromkeys(("mul", "mul_", "div", "div_"), "gate"), **dict.fromkeys(("matmul", "bmm"), "attention")}
# Shapes and dtypes of a signal are static at trace time, not signals.
_STATIC_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_STATIC_METHODS = {"size", "dim", "numel", "type_as"}


def _dynamic_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose value depends on the forward's inputs (not on parameters or shapes alone)."""
    dynamic: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            dynamic.add(node)
        elif node.op in ("call_function", "call_method", "call_module"):
            if node.op == "call_method" and node.target in _STATIC_METHODS:
                continue
            if node.op == "call_function" and node.target is getattr and node.args[1] in _STATIC_ATTRS:
                continue
            if any(a in dynamic for a in node.all_input_nodes):
                dynamic.add(node)
    return dynamic


def _count_signal_operands(node: torch.fx.Node, dynamic: set[torch.fx.Node]) -> int:
    # Counted with repeats: x * x is a square, not a product of a signal and a constant.
    operands: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), operands.append)
    return sum(a in dynamic for a in operands)


def node_kind(node: torch.fx.Node, dynamic: set[torch.fx.Node]) -> tuple[str, str, str] | None:
    """(check kind, compensation kind, op name) of a functional op on signals that is not linear, else None."""
    if node not in dynamic:
        return None  # arithmetic on parameters or shapes only (e.g. weight standardisation)
    two_signals = _count_signal_operands(node, dynamic) >= 2
    if node.op == "call_function":
        op = getattr(node.target, "__name__", str(node.target))
        nonlinear, bilinear = _NONLINEAR_FUNCTIONS.get(node.target), _BILINEAR_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        op = f".{node.target}()"
        nonlinear, bilinear = _NONLINEAR_METHODS.get(node.target), _BILINEAR_METHODS.get(node.target)
    else:
        return None
    if nonlinear:
        return nonlinear, COMPENSATION.get(nonlinear, ""), op
    if bilinear and two_signals:
        return bilinear, "product", op
    return None


def module_kind(module: nn.Module) -> tuple[str, str] | None:
    """(check kind, compensation kind) of a module the class rules name, else None."""
    kind = next((kind for classes, kind in _MODULE_RULES if isinstance(module, classes)), None)
    return (kind, COMPENSATION.get(kind, "")) if kind else None


def _graph_problems(graph: torch.fx.Graph, where: str) -> list[Problem]:
    dynamic = _dynamic_nodes(graph)
    problems = []
    for node in graph.nodes:
        found = node_kind(node, dynamic)
        if found:
            problems.append(Problem(where, found[2], REASONS[found[0]], found[0]))
    return problems


@dataclass
class GraphSort:
    """The whole network's graph with every node sorted (what :func:`check` reports and ``convert`` rewrites).

    ``compensated``: (node, compensation kind, module path, op) for each non-linear op after a
    neuron; ``call_sites``: each QCFS called more than once, with its call nodes;
    ``before``: (module path, op) of non-linear ops before any neuron (they see the input).
    """

    graph: torch.fx.Graph
    dynamic: set[torch.fx.Node]  # nodes whose value depends on the input (signals)
    compensated: list[tuple[torch.fx.Node, str, str, str]]
    call_sites: dict[str, list[torch.fx.Node]]
    before: list[tuple[str, str]]
    linear: int
    constant_activations: set[str] = field(default_factory=set)  # QCFS on parameters only (a relative-position MLP)


def _leaf_kind(module: nn.Module) -> tuple[str, str, str] | None:
    """A leaf of the whole-network trace: its class rule, or (a timm no-trace module) the first
    non-linear op of its own forward, which then makes the whole module one compensated op."""
    found = module_kind(module)
    if found:
        return (*found, type(module).__name__)
    if isinstance(module, (QCFS, MultiStepNeuron)) or not has_own_forward(module):
        return None
    try:
        inner = _graph_problems(trace_own_forward(module), "")
    except Exception:  # noqa: BLE001 - opaque: treat as non-linear to be safe
        return "nonlinear", "elementwise", type(module).__name__
    if not inner:
        return None
    return inner[0].kind, COMPENSATION.get(inner[0].kind, ""), type(module).__name__


def sort_graph(model: nn.Module) -> GraphSort:
    """Trace the whole network (QCFS as leaves) and sort its nodes; raises if it does not trace."""
    with eval_mode(model, no_grad=False):  # the inference graph: dropout and drop-path off
        graph = LeafTracer().trace(model)
    modules = dict(model.named_modules())
    dynamic = _dynamic_nodes(graph)
    after: set[torch.fx.Node] = set()  # downstream of a QCFS
    compensated, before, linear, constant = [], [], 0, set()
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, (QCFS, MultiStepNeuron)):
            if node not in dynamic:  # computes a constant of the parameters: stays an ANN activation
                constant.add(node.target)
                continue
            calls.setdefault(node.target, []).append(node)
            after.add(node)
            continue
        if any(a in after for a in node.all_input_nodes):
            after.add(node)
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        found = _leaf_kind(module) if module is not None else node_kind(node, dynamic)
        if module is not None and found and node not in dynamic:
            found = None  # a module on parameters alone
        if not found:
            linear += node in dynamic  # shape arithmetic is not counted
        elif node in after:
            compensated.append((node, found[1], node_owner(node), found[2]))
        else:
            before.append((node_owner(node), found[2]))
    shared = {target: nodes for target, nodes in calls.items() if len(nodes) > 1}
    return GraphSort(graph, dynamic, compensated, shared, before, linear, constant - set(calls))


def _scan(model: nn.Module) -> tuple[list[Problem], int, list[str], list[str]]:
    problems, untraced, notes = [], [], []
    # Where each activation module is used: registered paths and call sites in traced forwards.
    uses: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (QCFS, MultiStepNeuron)):
            uses.setdefault(module, []).append(name)
    calls: Counter = Counter()
    for name, module in model.named_modules():
        if isinstance(module, (QCFS, MultiStepNeuron)):
            if not module.threshold.is_meta and not bool((module.threshold > 0).all()):
                problems.append(Problem(name, type(module).__name__, REASONS["threshold"], "threshold"))
            continue
        kind = next((kind for classes, kind in _MODULE_RULES if isinstance(module, classes)), None)
        if kind:
            problems.append(Problem(name, type(module).__name__, REASONS[kind], kind))
            continue  # its own forward is the op just named
        if not has_own_forward(module):
            continue
        where = f"forward of {name}" if name else "forward"
        try:
            graph = trace_own_forward(module)
        except Exception as exc:  # data-dependent control flow etc.: read its source instead
            untraced.append(name)
            scanned = _source_problems(module, where, uses, calls)
            how = "its source was scanned instead" if scanned is not None else "no source: its own ops were not checked"
            notes.append(f"{where or 'forward'} ({type(module).__name__}) not traced ({type(exc).__name__}); {how}")
            problems += scanned or []
            continue
        problems += _graph_problems(graph, where)
        for node in graph.nodes:
            if node.op == "call_module" and module.get_submodule(node.target) in uses:
                calls[module.get_submodule(node.target)] += 1
    for activation, paths in uses.items():
        if len(paths) > 1 or calls[activation] > 1:
            places = "several places" if calls[activation] > len(paths) else f"{len(paths)} paths"
            problems.append(Problem(paths[0], f"{type(activation).__name__} used at {places}", REASONS["shared"], "shared"))
    return problems, len(uses), untraced, notes


def _source_problems(module: nn.Module, where: str, uses: dict, calls: Counter) -> list[Problem] | None:
    """Fallback for a forward fx cannot trace: find the same ops by name in its source.

    Catches non-linear functions and methods, and activation children called in a loop
    (one module, many calls: converted, one membrane) or at several places. Products of
    two signals cannot be told from products with constants without tracing, and are
    not checked.
    """
    forward = forward_function(module)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    problems: list[Problem] = []
    loops = (ast.For, ast.While, ast.AsyncFor, ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)

    def visit(node: ast.AST, in_loop: bool) -> None:
        if isinstance(node, ast.Call):
            target = resolve_name(node.func, module, forward.__globals__)
            op = ast.unparse(node.func)
            if target in uses:
                calls[target] += 2 if in_loop else 1
            elif target is not MISSING and is_hashable(target) and target in _NONLINEAR_FUNCTIONS:
                kind = _NONLINEAR_FUNCTIONS[target]
                problems.append(Problem(where, op, REASONS[kind], kind))
            elif target is MISSING and isinstance(node.func, ast.Attribute) and node.func.attr in _NONLINEAR_METHODS:
                kind = _NONLINEAR_METHODS[node.func.attr]
                problems.append(Problem(where, f".{node.func.attr}()", REASONS[kind], kind))
        for child in ast.iter_child_nodes(node):
            visit(child, in_loop or isinstance(node, loops))

    visit(tree, False)
    return problems


NO_SPIKING_PATH = ("every QCFS activation acts on parameters alone (e.g. a relative-position MLP), so no neuron "
                   "would see the input; replace the network's other activations too: model.activations=[relu, gelu, silu]")


# The probe's batch sizes: odd, unlike the 2, 3 or 4 that a reshape puts in front (qkv, heads), and two of
# them, so that a dim 0 that does not grow with the batch (tokens, a sequence) cannot match both by chance.
PROBE_BATCHES = (5, 7)


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the whole-network graph once and keeps the shape of every tensor a node makes."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph):
        super().__init__(model, graph=graph)
        self.shapes: dict[torch.fx.Node, tuple[int, ...]] = {}

    def run_node(self, node: torch.fx.Node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            self.shapes[node] = tuple(result.shape)
        return result


def _batch_major(shapes: list[tuple[int, ...]]) -> bool:
    """Is dim 0 the batch times one factor that does not depend on it (batch alone, batch × windows), at every probe size?"""
    if any(not shape or shape[0] % batch for shape, batch in zip(shapes, PROBE_BATCHES)):
        return False
    return len({shape[0] // batch for shape, batch in zip(shapes, PROBE_BATCHES)}) == 1


def folded_batch_problems(model: nn.Module, sort: GraphSort, example: torch.Tensor) -> list[Problem]:
    """Ops that run over time steps whose signal input does not have the batch in dim 0.

    The SNN folds time into the batch dimension, in front of it; a neuron or a compensated op
    unfolds it from dim 0. That holds while dim 0 is the batch, or the batch times a factor
    of its own (a Swin's windows: batch × windows). A network that moves the batch elsewhere
    first (attention over a transposed 2-D tensor, a sequence-first ``nn.MultiheadAttention``)
    would fail there at run time, or worse, read another dimension as time. Eval-mode forwards
    of ``PROBE_BATCHES`` copies of ``example`` (one sample, no batch dimension; a tensor on the
    ``meta`` device is enough) find them before any training: dim 0 must grow with the batch.
    """
    modules = dict(model.named_modules())
    timed = {node for node, *_ in sort.compensated}
    timed |= {n for n in sort.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), QCFS)
              and n in sort.dynamic}
    recorded = []
    with eval_mode(model):
        for size in PROBE_BATCHES:
            probe = _ShapeRecorder(model, sort.graph)
            probe.run(example.unsqueeze(0).expand(size, *example.shape).contiguous())
            recorded.append(probe.shapes)
    problems = []
    for node in sort.graph.nodes:
        if node not in timed:
            continue
        operands: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), operands.append)
        for position, operand in enumerate(operands, 1):
            shapes = [shapes_at.get(operand) for shapes_at in recorded]
            if operand in sort.dynamic and None not in shapes and not _batch_major(shapes):
                op = (type(modules[node.target]).__name__ if node.op == "call_module"
                      else getattr(node.target, "__name__", str(node.target)))
                sizes = " and ".join(f"{list(shape)} for a batch of {size}" for shape, size in zip(shapes, PROBE_BATCHES))
                problems.append(Problem(node_owner(node), op, f"operand {position} has shape {sizes}: {REASONS['batch']}",
                                        "batch"))
                break
    return problems


def check(model_or_name, *, strict: bool = False, example: torch.Tensor | None = None, **create_kwargs) -> CheckReport:
    """Report how a model (or a timm name, built with :func:`create_model`) converts.

    Never raises for an unconvertible model: the report sorts the operations (spiking,
    linear, compensated, refused) and lists every refused module path and operation with
    the reason. ``strict=True`` refuses every non-linear op that is not QCFS (a network of
    neurons only). :func:`qcfs_snntorch.convert` raises :class:`ConversionError` carrying
    the same report.

    ``example`` (one input sample without a batch dimension, e.g. one image of the data set)
    adds a forward pass that finds ops whose input lost the batch in dim 0
    (:func:`folded_batch_problems`); without it the check is static.
    """
    if isinstance(model_or_name, str):
        create_kwargs.setdefault("num_classes", 10)
        model = create_model(model_or_name, **create_kwargs)
        label = model_or_name
    else:
        model, label = model_or_name, type(model_or_name).__name__
    problems, activations, untraced, notes = _scan(model)
    report = CheckReport(label, problems, activations, notes, untraced, strict=strict)
    if strict or not activations:  # no neuron at all: nothing to compensate around, today's refusals say what to replace
        return report
    try:
        sort = sort_graph(model)
    except Exception as exc:  # noqa: BLE001 - data-dependent control flow etc.: today's refusals, with why
        report.untraceable = f"{type(exc).__name__}: {str(exc)[:200]}"
        if any(p.kind in COMPENSATION or p.kind == "shared" for p in problems):
            notes.append(f"the whole network does not trace with torch.fx ({report.untraceable}); "
                         f"{REASONS['untraceable']}")
        return report
    report.activations = activations - len(sort.constant_activations)
    if not report.activations:  # every QCFS works on parameters alone: no neuron on the signal path
        notes.append(NO_SPIKING_PATH)
        return report
    report.problems = [p for p in problems if p.kind not in COMPENSATION and p.kind != "shared"]
    report.compensated = [Problem(where, op, COMPENSATED_REASONS[kind], kind) for _, kind, where, op in sort.compensated]
    report.linear = sort.linear
    if sort.call_sites:
        places = ", ".join(f"{t} ({len(n)} calls)" for t, n in sort.call_sites.items())
        notes.append(f"activations called at several places get one neuron per call: {places}")
    if sort.before:
        ops = ", ".join(f"{w or '<root>'}: {op}" for w, op in sort.before[:5]) + (" …" if len(sort.before) > 5 else "")
        notes.append(f"{len(sort.before)} non-linear op(s) before the first neuron run on the input as in the ANN: {ops}")
    if example is not None:
        try:
            lost_batch = folded_batch_problems(model, sort, example)
            refused = {(p.path, p.op) for p in lost_batch}
            report.problems += lost_batch
            report.compensated = [c for c in report.compensated if (c.path, c.op) not in refused]  # refused, not compensated
        except Exception as exc:  # noqa: BLE001 - the ANN fails on this input: training will say why, in its own words
            notes.append(f"the forward pass on the example input failed, its batch dimension was not checked "
                         f"({type(exc).__name__}: {str(exc)[:200]})")
    return report
