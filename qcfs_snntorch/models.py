"""create_model: a timm model by name, with QCFS activations and average pooling.

The surgery is driven by two registries, so a user can extend it without touching the
walker: ``ACTIVATION_GROUPS`` (which activation classes a named group replaces by QCFS)
and ``POOL_REPLACEMENTS`` (which pooling class becomes which linear pooling).
"""

from __future__ import annotations

import difflib
from collections import Counter
from typing import Callable, Iterable

import timm
import timm.layers
from timm.layers import activations as timm_act
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import nn

from .qcfs import QCFS

__all__ = [
    "ACTIVATION_GROUPS",
    "POOL_REPLACEMENTS",
    "UnknownModelError",
    "create_model",
    "replace_activations",
    "replace_pooling",
    "register_activation",
    "apply_cifar_stem",
]

# "relu" is what QCFS approximates with no loss in the ANN; the others are allowed on
# request because the network is (re)trained with QCFS anyway. Gates (sigmoid, tanh,
# hard-sigmoid) are never replaced: they multiply, and check() refuses them instead.
ACTIVATION_GROUPS: dict[str, tuple[type[nn.Module], ...]] = {
    "relu": (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.PReLU),
    "silu": (nn.SiLU, timm_act.Swish),
    "gelu": (nn.GELU, timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU),
    "hardswish": (nn.Hardswish, timm_act.HardSwish),
    "mish": (nn.Mish, timm_act.Mish, timm_act.HardMish),
    "elu": (nn.ELU, nn.CELU, nn.SELU),
}


def _max_to_avg(pool: nn.MaxPool2d) -> nn.Module:
    if pool.dilation not in (1, (1, 1)):
        raise ValueError(f"cannot turn a dilated MaxPool2d into an average pool: {pool}")
    if isinstance(pool, MaxPool2dSame):
        return AvgPool2dSame(pool.kernel_size, pool.stride, ceil_mode=pool.ceil_mode)
    # count_include_pad=False keeps border outputs on the same scale as the max they replace.
    return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode, count_include_pad=False)


def _adaptive_max_to_avg(pool: nn.AdaptiveMaxPool2d) -> nn.Module:
    return nn.AdaptiveAvgPool2d(pool.output_size)


POOL_REPLACEMENTS: dict[type[nn.Module], Callable[[nn.Module], nn.Module]] = {
    nn.MaxPool2d: _max_to_avg,
    nn.AdaptiveMaxPool2d: _adaptive_max_to_avg,
}


class UnknownModelError(ValueError):
    """A model name that timm does not know."""


def register_activation(group: str, cls: type[nn.Module]) -> None:
    """Add an activation class to a replacement group (created if new)."""
    ACTIVATION_GROUPS[group] = tuple(dict.fromkeys((*ACTIVATION_GROUPS.get(group, ()), cls)))


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
        raise ValueError(f"unknown activation group(s) {unknown}; valid: {sorted(ACTIVATION_GROUPS)}")
    targets = tuple(cls for g in groups for cls in ACTIVATION_GROUPS[g])
    counts: Counter = Counter()
    for name, module in list(model.named_modules()):
        if isinstance(module, targets) and not isinstance(module, QCFS):
            counts[type(module).__name__] += 1
            model = _swap(model, name, QCFS(levels=levels, threshold=threshold))
    return model, counts


def replace_pooling(model: nn.Module) -> tuple[nn.Module, Counter]:
    """Replace max pooling by average pooling of the same geometry; returns (model, counts)."""
    counts: Counter = Counter()
    for name, module in list(model.named_modules()):
        for cls, factory in POOL_REPLACEMENTS.items():
            if isinstance(module, cls):
                counts[type(module).__name__] += 1
                model = _swap(model, name, factory(module))
                break
        if isinstance(module, timm.layers.SelectAdaptivePool2d) and "max" in module.pool_type:
            counts[f"SelectAdaptivePool2d({module.pool_type})"] += 1
            module.pool = nn.AdaptiveAvgPool2d(1)
            module.pool_type = "avg"
    return model, counts


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """The paper's CIFAR stem: 3×3 stride-1 first conv and no stem pooling (ResNet family).

    timm's ImageNet stem (7×7 stride 2 + pool) shrinks a 32×32 image to 8×8 before the
    first block, which costs several points on CIFAR.
    """
    conv1 = getattr(model, "conv1", None)
    if not hasattr(model, "maxpool") or conv1 is None:
        raise ValueError(
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


def create_model(
    name: str,
    *,
    num_classes: int,
    levels: int = 4,
    threshold: float = 8.0,
    pretrained: bool = False,
    activations: Iterable[str] = ("relu",),
    cifar_stem: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm model by name, ready for QCFS training and conversion.

    Every activation in the ``activations`` groups (see ``ACTIVATION_GROUPS``) becomes a
    :class:`~qcfs_snntorch.QCFS` with ``levels`` and initial λ ``threshold``; max pooling
    becomes average pooling. What was replaced is in ``model.qcfs_surgery``. Whether the
    result converts is :func:`qcfs_snntorch.check`'s job.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels <= 0:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        closest = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"closest timm names: {', '.join(closest)}" if closest else "see timm.list_models()"
        raise UnknownModelError(f"unknown model {name!r}; {hint}")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
    if cifar_stem:
        model = apply_cifar_stem(model)
    model, act_counts = replace_activations(model, levels=levels, threshold=threshold, groups=activations)
    model, pool_counts = replace_pooling(model)
    model.qcfs_surgery = {"activations": dict(act_counts), "pooling": dict(pool_counts)}
    return model
