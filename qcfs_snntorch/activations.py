"""The one table of activation classes and functions: what QCFS may replace, by group.

``models.create_model`` reads it to do the surgery; ``check`` reads it to name what is
left over. A group is what a user asks for with ``model.activations=[...]``:

- ``ACTIVATION_GROUPS``: module classes per group;
- ``FUNCTIONAL_ACTIVATIONS``: the same groups called as functions inside a forward
  (``F.relu(x)``, ``x.relu()``; strings are tensor-method names);
- ``OTHER_ACTIVATIONS``: non-linear activation classes no group replaces (Softplus, …):
  ``check`` finds them like an unreplaced group member, and conversion compensates them.

Gates (sigmoid, tanh, hard-sigmoid) are never replaced: they multiply another signal, so
conversion runs them as expectation-compensated operations (``compensation.py``), and
``convert(strict=True)`` refuses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import activations as timm_act
from timm.layers import activations_me as timm_act_me
from torch import nn

__all__ = ["ACTIVATION_GROUPS", "FUNCTIONAL_ACTIVATIONS", "OTHER_ACTIVATIONS", "activation_classes", "register_activation"]

# "relu" is what QCFS approximates with no loss in the ANN; the others are allowed on
# request because the network is (re)trained with QCFS anyway.
ACTIVATION_GROUPS: dict[str, tuple[type[nn.Module], ...]] = {
    "relu": (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.PReLU),
    "silu": (nn.SiLU, timm_act.Swish, timm_act_me.SwishMe),
    "gelu": (nn.GELU, timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU),
    "hardswish": (nn.Hardswish, timm_act.HardSwish, timm_act_me.HardSwishMe),
    "mish": (nn.Mish, timm_act.Mish, timm_act.HardMish, timm_act_me.MishMe, timm_act_me.HardMishMe),
    "elu": (nn.ELU, nn.CELU, nn.SELU),
}

FUNCTIONAL_ACTIVATIONS: dict[str, tuple] = {
    "relu": (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.rrelu, "relu", "relu_"),
    # timm's own functions too: its get_act_fn() hands them out (nfnet's GammaAct).
    "silu": (F.silu, timm_act.swish, timm_act_me.swish_me),
    "gelu": (F.gelu, timm_act.gelu, timm_act.gelu_tanh, timm_act.quick_gelu),
    "hardswish": (F.hardswish, timm_act.hard_swish, timm_act_me.hard_swish_me),
    "mish": (F.mish, timm_act.mish, timm_act.hard_mish, timm_act_me.mish_me, timm_act_me.hard_mish_me),
    "elu": (F.elu, F.elu_, F.celu, F.selu, torch.selu),
}

OTHER_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.Softplus, nn.Hardtanh, nn.Softsign, nn.Tanhshrink)


def activation_classes() -> tuple[type[nn.Module], ...]:
    """Every activation class of every group, and the ones no group replaces."""
    return tuple(dict.fromkeys((*(cls for group in ACTIVATION_GROUPS.values() for cls in group), *OTHER_ACTIVATIONS)))


def register_activation(group: str, cls: type[nn.Module]) -> None:
    """Add an activation class to a replacement group (created if new)."""
    ACTIVATION_GROUPS[group] = tuple(dict.fromkeys((*ACTIVATION_GROUPS.get(group, ()), cls)))
