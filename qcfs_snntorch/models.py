"""create_model: a timm model by name, with QCFS activations and average pooling.

The surgery is driven by registries, so a user can extend it without touching the
walkers: ``ACTIVATION_GROUPS`` (which activation classes a named group replaces by QCFS),
``FUNCTIONAL_ACTIVATIONS`` (the same groups called as functions inside a forward; see
``rewrite_activation_calls``) and ``POOL_REPLACEMENTS`` (which pooling class becomes
which linear pooling).
"""

from __future__ import annotations

import ast
import copy
import difflib
import inspect
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import timm
import torch
from timm.layers import SelectAdaptivePool2d
from timm.layers.adaptive_avgmax_pool import (
    AdaptiveAvgMaxPool2d,
    FastAdaptiveAvgMaxPool,
    FastAdaptiveAvgPool,
    FastAdaptiveMaxPool,
)
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import nn

from .activations import ACTIVATION_GROUPS, FUNCTIONAL_ACTIVATIONS, register_activation
from .qcfs import QCFS
from .tracing import MISSING, forward_function, has_own_forward, is_hashable, resolve_name

__all__ = [
    "ACTIVATION_GROUPS",
    "FUNCTIONAL_ACTIVATIONS",
    "POOL_REPLACEMENTS",
    "ModelError",
    "UnknownModelError",
    "create_model",
    "replace_activations",
    "rewrite_activation_calls",
    "replace_pooling",
    "register_activation",
    "apply_cifar_stem",
    "start_residual_branches",
]

def _max_to_avg(pool: nn.MaxPool2d) -> nn.Module | None:
    if pool.dilation not in (1, (1, 1)):
        return None  # no average pool has the same geometry: left for check() to refuse
    if isinstance(pool, MaxPool2dSame):
        return AvgPool2dSame(pool.kernel_size, pool.stride, ceil_mode=pool.ceil_mode)
    # count_include_pad=False keeps border outputs on the same scale as the max they replace.
    return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode, count_include_pad=False)


def _fast_global_max_to_avg(pool: nn.Module) -> nn.Module:
    avg = FastAdaptiveAvgPool(pool.flatten)
    avg.dim = pool.dim  # the input format (NCHW / NHWC) it was built for
    return avg


# Global poolings: max and (avg + max) / 2 both become the average. timm's "catavgmax"
# (channels doubled) has no drop-in linear counterpart and is left for check() to refuse.
POOL_REPLACEMENTS: dict[type[nn.Module], Callable[[nn.Module], nn.Module | None]] = {
    nn.MaxPool2d: _max_to_avg,
    nn.AdaptiveMaxPool2d: lambda pool: nn.AdaptiveAvgPool2d(pool.output_size),
    AdaptiveAvgMaxPool2d: lambda pool: nn.AdaptiveAvgPool2d(pool.output_size),
    FastAdaptiveMaxPool: _fast_global_max_to_avg,
    FastAdaptiveAvgMaxPool: _fast_global_max_to_avg,
}


class ModelError(ValueError):
    """A model setting that timm or the QCFS surgery cannot honour; the message names it and what is valid."""


class UnknownModelError(ModelError):
    """A model name that timm does not know."""


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    model.set_submodule(name, new)
    return model


def replace_activations(
    model: nn.Module,
    *,
    levels: int = 4,
    threshold: float = 8.0,
    groups: Iterable[str] = ("relu",),
) -> tuple[nn.Module, Counter]:
    """Replace every activation of the given groups by a fresh QCFS; returns (model, counts by type)."""
    groups = list(groups)
    unknown = [g for g in groups if g not in ACTIVATION_GROUPS]
    if unknown:
        raise ModelError(f"unknown activation group(s) {unknown}; valid: {sorted(ACTIVATION_GROUPS)}")
    targets = tuple(cls for g in groups for cls in ACTIVATION_GROUPS[g])
    counts: Counter = Counter()
    # remove_duplicate=False: an instance registered under two paths gets a QCFS at each.
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, targets) and not isinstance(module, QCFS):
            counts[type(module).__name__] += 1
            model = _swap(model, name, QCFS(levels=levels, threshold=threshold))
    return model, counts


def replace_pooling(model: nn.Module) -> tuple[nn.Module, Counter]:
    """Replace max pooling by average pooling of the same geometry; returns (model, counts)."""
    counts: Counter = Counter()
    for name, module in list(model.named_modules()):
        factory = next((f for cls, f in POOL_REPLACEMENTS.items() if isinstance(module, cls)), None)
        new = factory(module) if factory else None
        if new is not None:
            counts[type(module).__name__] += 1
            model = _swap(model, name, new)
    for module in model.modules():  # keep timm's pool_type (repr, feat_mult) truthful
        if isinstance(module, SelectAdaptivePool2d) and isinstance(module.pool, (nn.AdaptiveAvgPool2d, FastAdaptiveAvgPool)):
            module.pool_type = module.pool_type.replace("avgmax", "avg").replace("max", "avg")
    return model, counts


def rewrite_activation_calls(
    model: nn.Module,
    *,
    levels: int = 4,
    threshold: float = 8.0,
    groups: Iterable[str] = ("relu",),
) -> tuple[nn.Module, dict[str, list[str]]]:
    """Give every activation call site in a module's ``forward`` its own QCFS module.

    Two patterns need it:

    - functional activations of the requested groups (``F.relu(x)``, ``x.relu()``, or a
      function stored on the module such as nfnet's ``self.act_fn``; see
      ``FUNCTIONAL_ACTIVATIONS``) become calls of a new QCFS child ``qcfs_fn<i>``;
    - a QCFS child called at several places (timm's DLA blocks reuse one ``self.relu``)
      gets a copy for every place after the first: converted, each place needs its own
      membrane, and in training its own λ.

    The forward's source is rewritten call site by call site (Python's ``ast``) and the
    instance gets a subclass of its class with that forward: control flow, optional
    arguments and timm's methods stay as they were. Forwards without source, with closures
    (zero-argument ``super()``) or with a decorator are left alone, as are sites in helper
    methods; :func:`qcfs_snntorch.check` names what remains. A rewritten model pickles
    only through its ``state_dict``. Returns (model, {module path: [rewritten ops]}).
    """
    targets = {t for g in groups for t in FUNCTIONAL_ACTIVATIONS.get(g, ())}
    rewritten: dict[str, list[str]] = {}
    for name, module in list(model.named_modules()):
        if has_own_forward(module):
            ops = _rewrite_forward(module, targets, levels, threshold)
            if ops:
                rewritten[name] = ops
    return model, rewritten


def _rewrite_forward(module: nn.Module, targets: set, levels: int, threshold: float) -> list[str]:
    forward = forward_function(module)
    if forward.__code__.co_freevars or hasattr(forward, "__wrapped__"):
        return []  # recompiling would lose the closure (e.g. the __class__ cell of super())
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        filename = inspect.getsourcefile(forward) or "<forward>"
    except (OSError, TypeError):
        return []
    tree = ast.parse(source)
    function = tree.body[0]
    if not isinstance(function, ast.FunctionDef) or function.decorator_list:
        return []
    ast.increment_lineno(tree, forward.__code__.co_firstlineno - 1)  # tracebacks point at the real file
    rewriter = _CallSiteRewriter(module, forward.__globals__, targets)
    try:
        tree = ast.fix_missing_locations(rewriter.visit(tree))
    except _CannotRewrite:
        return []
    if not rewriter.new_children:
        return []
    namespace: dict = {}
    exec(compile(tree, filename, "exec"), forward.__globals__, namespace)
    for attr, template in rewriter.new_children:
        child = copy.deepcopy(template) if template is not None else QCFS(levels=levels, threshold=threshold)
        module.add_module(attr, child)
    cls = type(module)
    module.__class__ = type(cls.__name__, (cls,), {"forward": namespace[function.name], "__module__": cls.__module__})
    module.__dict__.pop("forward", None)  # a forward chosen per instance would hide the rewritten one
    return rewriter.ops


class _CannotRewrite(Exception):
    pass


class _CallSiteRewriter(ast.NodeTransformer):
    """Replaces activation call sites in one forward by ``self.qcfs_fn<i>(input)``."""

    def __init__(self, module: nn.Module, globals_: dict, targets: set):
        self.module, self.globals = module, globals_
        self.functions = {t for t in targets if not isinstance(t, str)}
        self.methods = {t for t in targets if isinstance(t, str)}
        self.seen: set[int] = set()  # QCFS children already called once
        self.new_children: list[tuple[str, nn.Module | None]] = []  # (attr, QCFS to copy or None for a fresh one)
        self.ops: list[str] = []

    def _call_new_child(self, node: ast.Call, template, args, keywords, op: str) -> ast.Call:
        taken = {a for a, _ in self.new_children}
        i = 0
        while hasattr(self.module, f"qcfs_fn{i}") or f"qcfs_fn{i}" in taken:
            i += 1
        attr = f"qcfs_fn{i}"
        self.new_children.append((attr, template))
        self.ops.append(op)
        func = ast.Attribute(value=ast.Name(id="self", ctx=ast.Load()), attr=attr, ctx=ast.Load())
        return ast.copy_location(ast.Call(func=func, args=args, keywords=keywords), node)

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)  # inner calls first: F.relu(self.bn(x))
        target = resolve_name(node.func, self.module, self.globals)
        if isinstance(target, QCFS):
            if id(target) not in self.seen:
                self.seen.add(id(target))
                return node
            return self._call_new_child(node, target, node.args, node.keywords, f"{ast.unparse(node.func)} (repeated call)")
        function = target if target is not MISSING and is_hashable(target) and target in self.functions else None
        method = (
            target is MISSING
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in self.methods
            and not node.args
            and not node.keywords
        )
        if not function and not method:
            return node
        if method:
            source, op, inplace = node.func.value, f".{node.func.attr}()", node.func.attr.endswith("_")
        else:
            given = node.args[:1] or [k.value for k in node.keywords if k.arg == "input"]
            if not given:
                raise _CannotRewrite
            source, op = given[0], ast.unparse(node.func)
            if not op.endswith(function.__name__):  # a function stored on the module: say which
                op = f"{op} ({function.__name__})"
            inplace = function.__name__.endswith("_") or any(
                k.arg == "inplace" and not (isinstance(k.value, ast.Constant) and not k.value.value) for k in node.keywords
            )
        call = self._call_new_child(node, None, [source], [], op)
        call.inplace_source = source if inplace else None
        return call

    def visit_Expr(self, node: ast.Expr):
        # A bare in-place call (``F.relu_(x)``) worked by mutating x: keep that as ``x = ...``.
        self.generic_visit(node)
        source = getattr(node.value, "inplace_source", None)
        if source is None:
            return node
        if not isinstance(source, ast.Name):
            raise _CannotRewrite
        return ast.copy_location(ast.Assign(targets=[ast.Name(id=source.id, ctx=ast.Store())], value=node.value), node)


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """The paper's CIFAR stem: 3×3 stride-1 first conv and no stem pooling (ResNet family).

    timm's ImageNet stem (7×7 stride 2 + pool) shrinks a 32×32 image to 8×8 before the
    first block, which costs several points on CIFAR.
    """
    conv1 = getattr(model, "conv1", None)
    if not hasattr(model, "maxpool") or conv1 is None:
        raise ModelError(
            f"model.cifar_stem is supported for timm ResNet-family models (with conv1 and "
            f"maxpool attributes), not {type(model).__name__}"
        )
    first_name = "conv1" if isinstance(conv1, nn.Conv2d) else "conv1.0"
    first = model.get_submodule(first_name)
    model.set_submodule(
        first_name,
        nn.Conv2d(first.in_channels, first.out_channels, 3, stride=1, padding=1, bias=first.bias is not None),
    )
    model.maxpool = nn.Identity()
    return model


@torch.no_grad()
def start_residual_branches(model: nn.Module) -> int:
    """Give every BatchNorm that timm initialised to zero (the last of each residual branch) γ = 1; returns the count.

    A zero-initialised branch adds exactly zero at first, which a ReLU network can afford:
    the tiny values that still reach its ReLUs pass, and so does their gradient. QCFS floors
    them to zero and has no gradient at exactly zero, so a block whose shortcut carries
    nothing yet (a strided 1×1 shortcut sees only the image corner, constant on digit-like
    images) never starts to train: a RegNet stayed at chance on digits. With started branches
    one short epoch is clearly above chance on every family of tests/test_trust.py.

    A model built on the ``meta`` device (benchmarks/coverage_census.py checks the structure
    of every timm name that way) has no values to look at: its BatchNorms are left alone.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.weight is None or module.weight.is_meta:
            continue
        if not module.weight.any():
            module.weight.fill_(1.0)
            count += 1
    return count


def _build_timm(name: str, *, pretrained: bool, pretrained_file: str | None, **kwargs) -> nn.Module:
    """``timm.create_model`` with every failure a user can cause turned into a :class:`ModelError`."""
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise ModelError(f"model.pretrained_file {str(path)!r} does not exist; give a .safetensors or .pth file "
                             f"of {name}'s weights in timm's format, or model.pretrained=true to download them")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:  # an argument the architecture does not take
        raise ModelError(f"timm's {name} does not accept these arguments (model.kwargs): {exc}") from None
    except (RuntimeError, OSError, ValueError) as exc:
        if not pretrained:
            raise
        if pretrained_file is not None:
            raise ModelError(f"the weights in {pretrained_file!r} do not fit {name} ({_first_line(exc)}); they must "
                             f"be {name}'s own weights in timm's format") from None
        raise ModelError(
            f"could not load timm's pretrained weights for {name} ({_first_line(exc)}). Without access to the "
            f"Hugging Face hub, download them elsewhere and give model.pretrained_file=PATH (a .safetensors or .pth "
            f"file in timm's format), or set HF_HUB_OFFLINE=1 with the weights already in the hub cache"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def create_model(
    name: str,
    *,
    num_classes: int,
    levels: int = 4,
    threshold: float = 8.0,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    activations: Iterable[str] = ("relu",),
    cifar_stem: bool = False,
    model_kwargs: dict | None = None,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm model by name, ready for QCFS training and conversion.

    Every activation in the ``activations`` groups (see ``ACTIVATION_GROUPS``) becomes a
    :class:`~qcfs_snntorch.QCFS` with ``levels`` and initial λ ``threshold``, wherever it
    sits (also inside blocks that hard-code their own, such as squeeze-excite's), and so
    does every functional call of the group inside a submodule's forward (``F.relu(x)``);
    an activation module called at several places gets a copy per place (see
    :func:`rewrite_activation_calls`); max pooling becomes average pooling.
    ``model.qcfs_surgery`` records what was replaced: ``{"activations": {class: count},
    "calls": {module path: [rewritten ops]}, "pooling": {class: count}}``. Whether the
    result converts is :func:`qcfs_snntorch.check`'s job.

    ``pretrained=True`` starts from timm's weights (from the Hugging Face hub);
    ``pretrained_file`` from a local copy of them (a ``.safetensors`` or ``.pth`` file in
    timm's format), for machines without the hub. A classifier of another size is
    re-initialised, as timm does. Extra keyword arguments go to ``timm.create_model``;
    ``model_kwargs`` does the same for timm arguments whose names collide with this
    function's (DLA's ``levels``).

    Raises :class:`ModelError` (:class:`UnknownModelError` for a name timm does not know)
    for anything a user can get wrong, with what is valid.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels <= 0:
        raise ModelError(f"levels must be a positive integer, got {levels!r}")
    activations = tuple(activations)
    unknown = [g for g in activations if g not in ACTIVATION_GROUPS]
    if unknown:  # before building: a large model takes seconds
        raise ModelError(f"unknown activation group(s) {unknown}; valid: {sorted(ACTIVATION_GROUPS)}")
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        closest = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"closest timm names: {', '.join(closest)}" if closest else "see timm.list_models()"
        raise UnknownModelError(f"unknown model {name!r}; {hint}")
    timm_kwargs.update(model_kwargs or {})
    not_names = [key for key in timm_kwargs if not (isinstance(key, str) and key.isidentifier())]
    if not_names:  # YAML reads `{img_size:32}` (no space after the colon) as a key 'img_size:32' with no value
        raise ModelError(f"model.kwargs key(s) {not_names} are not argument names; in YAML a colon needs a space "
                         f"after it: 'model.kwargs={{img_size: 32, patch_size: 4}}' (quoted on the command line)")
    model = _build_timm(name, pretrained=pretrained, pretrained_file=pretrained_file, num_classes=num_classes, **timm_kwargs)
    if cifar_stem:
        model = apply_cifar_stem(model)
    model, act_counts = replace_activations(model, levels=levels, threshold=threshold, groups=activations)
    model, calls = rewrite_activation_calls(model, levels=levels, threshold=threshold, groups=activations)
    model, pool_counts = replace_pooling(model)
    started = 0 if (pretrained or pretrained_file) else start_residual_branches(model)
    model.qcfs_surgery = {"activations": dict(act_counts), "calls": calls, "pooling": dict(pool_counts),
                          "residual_branches_started": started}
    return model
