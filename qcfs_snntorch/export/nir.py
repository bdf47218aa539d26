"""export_nir: a converted network → a NIR graph (nir 1.0.8), written to an HDF5 file.

Two forms (docs/NIR.md has the tables):

- **portable** (``portable=True``; the default whenever it is exact): only the node types
  every public NIR consumer maps — ``Input``, ``Output``, ``Conv2d``, ``Affine``, ``IF``,
  ``Flatten`` — written so that nir 1.0.4 reads it too (no IF ``v_reset``, metadata only on
  IF, Affine and Flatten nodes). Average pooling becomes a fixed-weight ``Conv2d`` (the
  window's ones on each channel's diagonal, divided by torch's divisor); every scale folds
  into neighbouring weights. Where a pool divides its windows by different counts
  (``count_include_pad=False`` with padding, ``ceil_mode`` overhang), no conv with weights
  shared over positions computes it: that layer and every layer after it are written as
  dense matrices (a ``Conv2d`` reading the whole map at once, then 1×1 convs on
  ``[N, 1, 1]``), exact while each matrix stays under :data:`DENSE_LIMIT` weights.
- **metadata** (``portable=False``): also ``AvgPool2d``, ``SumPool2d``, ``Scale``,
  ``Conv1d`` and graded neurons (IF nodes whose metadata carry ``max_spikes``).

Both forms: BatchNorm is folded into the preceding conv/linear (on a copy), or becomes a
per-channel 1×1 conv; grouped convs are written block-diagonal and non-square kernels in a
square one (nir 1.0.8 types convs by ``weight.shape[1]`` and the kernel height); a
residual add has no node (NIR sums a node's incoming edges); flatten maps to
``nir.Flatten`` without the batch dimension.

Scales. A NIR spike is 1, ours is worth θ: every signal carries a scale (its real value =
scale × its NIR value; scalar, per channel or per element). A conv/linear folds the scale
of its input into its weights and emits scale 1; an IF emits scale θ. An IF node always
has ``r = 1``: where its input arrives with scale s (after a residual sum with an identity
shortcut, whose spikes keep their θ), its membrane is written in units of s — threshold
θ/s, v_initial v(0)/s — which leaves an IF neuron's spikes unchanged (its metadata says
``membrane_scale = s``). Summands of a residual add get one scale: those computed only for
the sum (a conv branch) are rescaled in their weights; otherwise a ``Scale`` node (metadata
form) or a diagonal layer (portable form) does it.

What NIR's IF cannot express is in each IF node's metadata: ``reset = "subtract"``,
``fire = "v >= v_threshold"``, ``v_initial`` (the neuron's calibrated v(0)),
``spike_value`` (θ, folded downstream), ``source_module``. :func:`simulate_nir` runs a graph
with these semantics or with NIR's alone. For consumers that reset to zero (NIR 1.0.8's IF,
norse), ``threshold_factor`` writes every threshold scaled down (docs/NIR.md measures it).

Whatever cannot be exported raises :class:`ExportError` (a ``ValueError``) with a
one-paragraph message naming the module or operation; what has an exact form but not a
portable one raises its subclass :class:`NotPortableError` under ``portable=True``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path

import h5py
import nir
import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..compensation import compensated_ops
from ..convert import fold_batchnorm
from ..neurons import GradedIFNeuron, IFNeuron, MultiStepNeuron
from ..progress import track
from ..qcfs import QCFS
from ..tracing import LeafTracer
from .errors import ExportError, NotPortableError
from .layout import as_scale, is_one, linear_matrix, per_channel, square_taps, ungrouped, window_sizes

__all__ = ["DENSE_LIMIT", "PORTABLE_NODES", "ExportError", "NotPortableError", "export_nir"]

PORTABLE_NODES = (nir.Input, nir.Output, nir.Conv2d, nir.Affine, nir.IF, nir.Flatten)
DENSE_LIMIT = 1 << 22  # weights in one dense or block-diagonal layer of the portable form (16 MiB of float32)

# nir 1.0.4, which sinabs 3.1.3 pins, takes metadata on these node types only (and no IF v_reset).
_METADATA_READ_BY_NIR_104 = (nir.IF, nir.Affine, nir.Flatten)
_ADDS = {("call_function", f) for f in (operator.add, operator.iadd, torch.add)} | {("call_method", "add"), ("call_method", "add_")}
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_RESCALABLE = (nir.Conv1d, nir.Conv2d, nir.Affine, nir.Scale)
_ONE = as_scale(1.0)
_REMEDY = "export with portable=False (snn.nir_portable=false) for the form with NIR's other node types and metadata"


@dataclass(frozen=True)
class _Signal:
    """A value of the traced network as NIR sees it: the sum of ``sources``' outputs."""

    sources: tuple[str, ...]
    scale: np.ndarray  # real value = scale × NIR value; broadcastable to ``shape``
    shape: tuple[int, ...]  # torch's shape of one sample (no batch dimension)
    exclusive: bool  # only one consumer: its producing weights may be rescaled
    dense: bool = False  # carried as [prod(shape), 1, 1] in torch's element order (portable form)

    @property
    def nir_shape(self) -> tuple[int, ...]:
        return (prod(self.shape), 1, 1) if self.dense else self.shape

    def columns(self, scale: np.ndarray | None = None) -> np.ndarray | None:
        """``scale`` (default: the signal's) as one factor per NIR channel of this signal, or None
        when it varies within a channel (a conv's weights have one column per channel)."""
        scale = self.scale if scale is None else scale
        if self.dense:
            return np.broadcast_to(scale, self.shape).reshape(-1).copy()
        return per_channel(scale, self.shape)


@dataclass(frozen=True)
class _Call:
    """One call of a module in the traced network."""

    name: str  # the NIR node's name
    path: str  # the module's path in the network
    inp: _Signal
    out_shape: tuple[int, ...]
    exclusive: bool


@dataclass(frozen=True)
class _Pool:
    """An average pool's geometry on its input: windows, and what torch divides each output by."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    counts: np.ndarray  # [H_out, W_out]
    overhang: bool  # ceil_mode added windows past the padded input (NIR pools follow the floor rule)
    plain: bool  # what nir.AvgPool2d computes: no padding, no divisor_override, no overhang

    @classmethod
    def of(cls, m: nn.Module, call: _Call) -> _Pool:
        (_, height, width), out_hw = call.inp.shape, tuple(call.out_shape[1:])
        if isinstance(m, nn.AdaptiveAvgPool2d):
            if height % out_hw[0] or width % out_hw[1]:
                raise ExportError(f"export_nir: {call.path!r} pools {height}×{width} to {out_hw[0]}×{out_hw[1]}, not an integer ratio")
            kernel = (height // out_hw[0], width // out_hw[1])
            stride, padding, divisor, include_pad = kernel, (0, 0), None, True
        else:
            kernel, padding = as_pair(m.kernel_size), as_pair(m.padding)
            stride = as_pair(m.stride if m.stride is not None else m.kernel_size)
            divisor, include_pad = m.divisor_override, m.count_include_pad
        dims = list(zip((height, width), out_hw, kernel, stride, padding))
        if divisor is not None:
            counts = np.full(out_hw, float(divisor))
        else:
            counts = np.outer(*(window_sizes(n, o, k, s, p, include_pad) for n, o, k, s, p in dims)).astype(np.float64)
        overhang = any((o - 1) * s + k > n + 2 * p for n, o, k, s, p in dims)
        return cls(kernel, stride, padding, counts, overhang, not overhang and padding == (0, 0) and divisor is None)

    @property
    def uniform(self) -> bool:
        return bool(np.all(self.counts == self.counts.flat[0]))


def as_pair(value) -> tuple:
    """A pooling argument (an int or a pair) as a pair."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _bias(m: nn.Module, channels: int) -> np.ndarray:
    return _np(m.bias) if getattr(m, "bias", None) is not None else np.zeros(channels, np.float32)


def _per_channel_conv(scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """The 1×1 depthwise conv that computes ``scale[c] · x + shift[c]`` (an unfolded BatchNorm)."""
    conv = nn.Conv2d(len(scale), len(scale), 1, groups=len(scale))
    conv.weight.data, conv.bias.data = scale.detach().reshape(-1, 1, 1, 1).float(), shift.detach().float()
    return conv


def _conv_map(m: nn.Module):
    """A conv module's map without its bias (the dense form adds the bias per element)."""
    return lambda x: F.conv2d(x, m.weight.float(), None, m.stride, m.padding, m.dilation, m.groups)


class _Exporter:
    def __init__(self, net: nn.Module, graph: torch.fx.Graph, portable: bool, threshold_factor: float = 1.0):
        self.modules = dict(net.named_modules())
        self.graph, self.portable, self.threshold_factor = graph, portable, threshold_factor
        self.nodes: dict[str, nir.NIRNode] = {}
        self.edges: list[tuple[str, str]] = []
        self.dense_cause: str | None = None  # why the portable form went dense, for the messages after it
        # Exact types only: timm's leaf subclasses (Conv2dSame, AvgPool2dSame, BatchNormAct2d) compute
        # something else (dynamic "same" padding, a fused activation) and are refused.
        self.exact = {
            nn.Conv1d: self.conv, nn.Conv2d: self.conv, nn.BatchNorm2d: self.batchnorm,
            nn.AvgPool2d: self.avg_pool, nn.AdaptiveAvgPool2d: self.avg_pool,
        }
        # Any subclass: these compute what their base class computes.
        self.by_base = {
            MultiStepNeuron: self.neuron, QCFS: self.unconverted, nn.Linear: self.affine, nn.Flatten: self.flatten_module,
            **dict.fromkeys(_PASS_THROUGH, self.pass_through),
        }

    # -- nodes and scales ------------------------------------------------------------
    def add(self, name: str, node: nir.NIRNode, inp: _Signal | None) -> str:
        """Add ``node`` fed by ``inp``; returns its name (made unique)."""
        while name in self.nodes:
            name += "_"
        if self.portable and not isinstance(node, _METADATA_READ_BY_NIR_104):
            node.metadata = {}
        self.nodes[name] = node
        if inp is not None:
            self.edges += [(src, name) for src in inp.sources]
        return name

    def rescalable(self, sig: _Signal) -> bool:
        return sig.exclusive and all(isinstance(self.nodes[s], _RESCALABLE) for s in sig.sources)

    def rescale_producers(self, sig: _Signal, factor: np.ndarray) -> bool:
        """Multiply the output of ``sig``'s producers by ``factor`` in their weights, if they all can."""
        rows = sig.columns(factor)
        if not self.rescalable(sig) or (rows is None and any(not isinstance(self.nodes[s], nir.Scale) for s in sig.sources)):
            return False
        for src in sig.sources:
            node = self.nodes[src]
            if isinstance(node, nir.Scale):
                node.scale = node.scale * np.broadcast_to(factor, sig.shape).reshape(node.scale.shape)
            else:
                node.weight = node.weight * rows.reshape(-1, *[1] * (node.weight.ndim - 1))
                node.bias = node.bias * rows
        return True

    def to_scale(self, sig: _Signal, target: np.ndarray, name: str) -> _Signal:
        """Express ``sig`` in units of ``target``: rescale its producers, or add a layer that does."""
        if np.array_equal(np.broadcast_to(sig.scale, sig.shape), np.broadcast_to(target, sig.shape)):
            return replace(sig, scale=target)
        factor = as_scale(sig.scale / target)
        if self.rescale_producers(sig, factor):
            return replace(sig, scale=target)
        if not self.portable:
            node = nir.Scale(scale=np.broadcast_to(factor, sig.shape).astype(np.float32))
            return _Signal((self.add(name, node, sig),), target, sig.shape, exclusive=True)
        scaled = self.identity_layer(replace(sig, scale=factor), name)
        return replace(scaled, scale=target)

    def identity_layer(self, sig: _Signal, name: str) -> _Signal:
        """A layer that only applies ``sig``'s scale: diagonal weights (portable form's Scale)."""
        rows = sig.columns()
        if len(sig.shape) == 1:
            node = nir.Affine(weight=np.diag(rows), bias=np.zeros_like(rows))
        elif rows is not None and not sig.dense and len(sig.shape) == 3:
            node = nir.Conv2d(input_shape=sig.shape[1:], weight=np.diag(rows)[:, :, None, None], stride=1, padding=0,
                              dilation=1, groups=1, bias=np.zeros_like(rows))
        else:
            return self.dense(_Call(name, name, sig, sig.shape, True), lambda x: x, None)
        return _Signal((self.add(name, node, sig),), _ONE, sig.shape, exclusive=True, dense=sig.dense)

    def dense(self, call: _Call, linear, bias: np.ndarray | None) -> _Signal:
        """A linear layer as one matrix, in a Conv2d that reads the whole input map at once (portable form).

        Exact for any linear layer, including pools whose divisor differs between windows,
        which no conv with weights shared over positions computes. The output is carried as
        ``[N, 1, 1]`` (``_Signal.dense``), so every layer after it is a matrix too.
        """
        inp = call.inp
        if not inp.dense and len(inp.shape) != 3:
            raise NotPortableError(f"export_nir: {call.path!r} would need a dense layer on a {len(inp.shape) + 1}-d input; {_REMEDY}")
        n_in, n_out = prod(inp.shape), prod(call.out_shape)
        if n_in * n_out > DENSE_LIMIT:
            raise NotPortableError(
                f"export_nir: {call.path!r} does not fit the portable form: {self.dense_cause or 'its input scale varies over positions'}, "
                f"which a NIR Conv2d (one weight per tap, shared by every position) cannot compute, so from there on each layer "
                f"is one dense matrix, and {call.path!r} needs {n_out}×{n_in} weights, over DENSE_LIMIT = {DENSE_LIMIT}; {_REMEDY}"
            )
        matrix = linear_matrix(linear, inp.shape) * np.broadcast_to(inp.scale, inp.shape).reshape(1, -1)
        if bias is None:
            bias = np.zeros(n_out, np.float32)
        else:
            bias = np.broadcast_to(bias.reshape(-1, *[1] * (len(call.out_shape) - 1)), call.out_shape).reshape(-1).copy()
        if inp.dense:
            weight, hw, padding, stride = matrix[:, :, None, None], (1, 1), (0, 0), (1, 1)
        else:
            channels, height, width = inp.shape
            side = max(height, width)
            hw, stride = (height, width), (side, side)
            weight, padding = square_taps(matrix.reshape(n_out, channels, height, width), (0, 0), stride, hw, (1, 1), call.path)
        node = nir.Conv2d(input_shape=hw, weight=weight, stride=stride, padding=padding, dilation=1, groups=1, bias=bias)
        return _Signal((self.add(call.name, node, inp),), _ONE, call.out_shape, call.exclusive, dense=True)

    def densify(self, sig: _Signal, name: str) -> _Signal:
        return self.dense(_Call(name, name, sig, sig.shape, True), lambda x: x, None)

    # -- the walk --------------------------------------------------------------------
    def run(self) -> None:
        signals: dict[torch.fx.Node, _Signal] = {}
        for node in track(self.graph.nodes, f"export NIR ({'portable' if self.portable else 'metadata'} form)", unit="nodes"):
            exclusive = len(node.users) == 1
            if node.op == "placeholder":
                signals[node] = self.placeholder(node, bool(signals), exclusive)
            elif node.op == "output":
                self.output(node, signals)
            elif node.op == "call_module":
                signals[node] = self.module(node, signals[node.args[0]], exclusive)
            elif (node.op, node.target) in _ADDS:
                signals[node] = self.residual_sum(node, signals, exclusive)
            elif node.op in ("call_function", "call_method") and self.is_flatten(node):
                signals[node] = self.flatten(node, signals[node.args[0]], exclusive)
            else:
                owner = node.meta.get("nn_module_stack")
                where = f" in the forward of {list(owner)[-1]!r}" if owner else ""
                op = getattr(node.target, "__name__", str(node.target))
                raise ExportError(f"export_nir: cannot express {node.op} {op!r}{where} in NIR")
        if self.portable:
            for name, node in self.nodes.items():
                if not isinstance(node, PORTABLE_NODES):
                    raise NotPortableError(f"export_nir: node {name!r} is a {type(node).__name__}, not a portable node type; {_REMEDY}")

    def placeholder(self, node: torch.fx.Node, seen_one: bool, exclusive: bool) -> _Signal:
        if seen_one:
            raise ExportError(f"export_nir: only one network input is supported, found {node.name!r}")
        shape = tuple(node.meta["tensor_meta"].shape[1:])
        name = self.add("input", nir.Input(input_type=np.array(shape)), None)
        return _Signal((name,), _ONE, shape, exclusive)

    def output(self, node: torch.fx.Node, signals: dict) -> None:
        result = node.args[0]
        if not isinstance(result, torch.fx.Node):
            raise ExportError("export_nir: the network must return one tensor (NIR graphs here have one Output)")
        sig = self.to_scale(signals[result], _ONE, "output_scale")
        if sig.dense:
            raise NotPortableError(f"export_nir: the output {result.name!r} would be carried flattened to {sig.nir_shape} "
                                   f"(the portable form is dense since {self.dense_cause}); {_REMEDY}")
        self.add("output", nir.Output(output_type=np.array(sig.nir_shape)), sig)

    def module(self, node: torch.fx.Node, inp: _Signal, exclusive: bool) -> _Signal:
        m = self.modules[node.target]
        call = _Call(node.name, node.target, inp, tuple(node.meta["tensor_meta"].shape[1:]), exclusive)
        handler = self.exact.get(type(m)) or next((self.by_base[c] for c in type(m).__mro__ if c in self.by_base), None)
        if handler is None:
            hint = "; max pooling is not linear in spike rates: use average pooling" if "MaxPool" in type(m).__name__ else ""
            raise ExportError(f"export_nir: module {call.path!r} ({type(m).__name__}) has no NIR equivalent here{hint}")
        return handler(m, call)

    # -- one handler per layer type --------------------------------------------------
    def pass_through(self, m: nn.Module, call: _Call) -> _Signal:
        return replace(call.inp, exclusive=call.inp.exclusive and call.exclusive)

    def unconverted(self, m: nn.Module, call: _Call) -> _Signal:
        raise ExportError(f"export_nir: {call.path!r} is a QCFS activation; export the converted network (qcfs_snntorch.convert)")

    def conv(self, m: nn.Conv1d | nn.Conv2d, call: _Call) -> _Signal:
        if m.padding_mode != "zeros":
            raise ExportError(f"export_nir: {call.path!r} uses padding_mode={m.padding_mode!r}; NIR convolutions pad with zeros")
        if isinstance(m, nn.Conv1d) and self.portable:
            raise NotPortableError(f"export_nir: {call.path!r} is a Conv1d, which norse and snnTorch do not map; {_REMEDY}")
        inp, columns = call.inp, call.inp.columns()
        if self.portable and (inp.dense or columns is None):
            return self.dense(call, _conv_map(m), _bias(m, m.out_channels))
        if columns is None:  # a scale that varies within a channel: a Scale node takes it out first
            inp = self.to_scale(inp, _ONE, f"{call.name}_input_scale")
            columns = inp.columns()
        weight = ungrouped(_np(m.weight), m.groups) * columns.reshape(1, -1, *[1] * (m.weight.dim() - 2))
        common = dict(weight=weight, bias=_bias(m, m.out_channels), groups=1, metadata={"source_module": call.path})
        if isinstance(m, nn.Conv1d):
            padding = m.padding if isinstance(m.padding, str) else m.padding[0]
            node = nir.Conv1d(input_shape=inp.shape[1], stride=m.stride[0], padding=padding, dilation=m.dilation[0], **common)
        else:
            padding = m.padding
            if m.kernel_size[0] != m.kernel_size[1]:
                if m.dilation != (1, 1) or isinstance(padding, str):
                    raise ExportError(f"export_nir: {call.path!r} has a non-square kernel {m.kernel_size} with dilation or string padding; nir 1.0.8 sizes a Conv2d's output by its kernel height alone")
                common["weight"], padding = square_taps(weight, padding, m.stride, inp.shape[1:], call.out_shape[1:], call.path)
            node = nir.Conv2d(input_shape=inp.shape[1:], stride=m.stride, padding=padding, dilation=m.dilation, **common)
        return _Signal((self.add(call.name, node, inp),), _ONE, call.out_shape, call.exclusive)

    def batchnorm(self, m: nn.BatchNorm2d, call: _Call) -> _Signal:
        if not m.track_running_stats:
            raise ExportError(f"export_nir: module {call.path!r} (BatchNorm2d without running statistics) has no NIR equivalent here")
        # It follows no conv of its own (else it was folded): a per-channel 1×1 conv is the same affine map.
        scale = torch.rsqrt(m.running_var + m.eps) * (m.weight if m.affine else 1.0)
        shift = (m.bias if m.affine else 0.0) - m.running_mean * scale
        return self.conv(_per_channel_conv(scale, shift), call)

    def affine(self, m: nn.Linear, call: _Call) -> _Signal:
        inp = call.inp
        if len(inp.shape) != 1:
            raise ExportError(f"export_nir: {call.path!r} is applied to a {len(inp.shape) + 1}-d input; NIR's Affine takes [batch, features]")
        weight = _np(m.weight) * np.broadcast_to(inp.scale, inp.shape).reshape(1, -1)
        node = nir.Affine(weight=weight, bias=_bias(m, m.out_features), metadata={"source_module": call.path})
        return _Signal((self.add(call.name, node, inp),), _ONE, call.out_shape, call.exclusive)

    def neuron(self, m: MultiStepNeuron, call: _Call) -> _Signal:
        spikes_per_step = int(getattr(m, "max_spikes", 1))
        if spikes_per_step > 1 and self.portable:
            raise NotPortableError(
                f"export_nir: {call.path!r} is a graded neuron that sends up to {spikes_per_step} spikes per step "
                f"(snn.max_spikes = {spikes_per_step}), and NIR's IF sends one binary spike per step, so a consumer "
                f"following NIR would run another network; convert with snn.max_spikes = 1 for a portable file, or "
                f"{_REMEDY}, where it is an IF node whose metadata carries max_spikes and spike_unit (simulate_nir honours them)"
            )
        if not isinstance(m, IFNeuron | GradedIFNeuron) and spikes_per_step == 1:
            raise ExportError(f"export_nir: {call.path!r} is a {type(m).__name__}; only IFNeuron (and GradedIFNeuron) map onto nir.IF")
        inp, shape = call.inp, call.inp.shape
        theta = m.threshold.detach().float().cpu()
        threshold = _np(theta.expand(shape))
        # initial_potential is asked rather than assumed: it holds the calibrated offsets.
        v_initial = _np(m.initial_potential(torch.zeros(1, *shape, device=m.threshold.device))[0])
        spike_value = float(theta) if theta.numel() == 1 else _np(theta)
        meta = {
            "source_module": call.path,
            "reset": "subtract",  # v ← v − v_threshold after a spike (NIR: v ← v_reset)
            "fire": "v >= v_threshold",  # NIR: v > v_threshold
            "spike_value": spike_value,  # folded into the consumers
        }
        if not is_one(inp.scale):
            # The input arrives in units of s: the membrane is written in units of s too, so r = 1.
            membrane = np.broadcast_to(inp.scale, shape)
            threshold, v_initial = threshold / membrane, v_initial / membrane
            meta["membrane_scale"] = float(inp.scale) if inp.scale.ndim == 0 else membrane.reshape(inp.nir_shape).copy()
        meta["v_initial"] = v_initial.reshape(inp.nir_shape)  # NIR: 0
        if spikes_per_step > 1:
            meta.update(max_spikes=spikes_per_step, spike_unit=spike_value)
        if self.threshold_factor != 1.0:
            threshold = threshold * np.float32(self.threshold_factor)
            meta["threshold_factor"] = self.threshold_factor  # our rules use v_threshold / threshold_factor
        node = nir.IF(r=np.ones(inp.nir_shape, np.float32), v_threshold=threshold.reshape(inp.nir_shape).astype(np.float32),
                      v_reset=np.zeros(inp.nir_shape, np.float32), metadata=meta)
        return _Signal((self.add(call.name, node, inp),), as_scale(_np(theta)), shape, exclusive=False, dense=inp.dense)

    def avg_pool(self, m: nn.AvgPool2d | nn.AdaptiveAvgPool2d, call: _Call) -> _Signal:
        pool = _Pool.of(m, call)
        if self.portable:
            return self.pool_as_conv(m, call, pool)
        inp = call.inp
        if inp.columns() is None:  # pooling commutes with a per-channel scale, not with one that varies over positions
            inp = self.to_scale(inp, _ONE, f"{call.name}_input_scale")
        meta = {"source_module": call.path}
        if pool.plain:
            node = nir.AvgPool2d(kernel_size=np.array(pool.kernel), stride=np.array(pool.stride), padding=np.array(pool.padding), metadata=meta)
            return _Signal((self.add(call.name, node, inp),), inp.scale, call.out_shape, inp.exclusive and call.exclusive)
        # Otherwise: sum each window, then a Scale divides by what torch divides that window by.
        if not pool.overhang:
            summed = nir.SumPool2d(kernel_size=np.array(pool.kernel), stride=np.array(pool.stride), padding=np.array(pool.padding), metadata=meta)
        else:
            meta["op"] = "ceil_mode average pooling: the sum of each window (the Scale that follows divides)"
            summed = self.window_sums(inp.shape, call, pool, np.ones(inp.shape[0], np.float32), meta)
        name = self.add(call.name, summed, inp)
        scale = np.broadcast_to((1.0 / pool.counts).astype(np.float32), call.out_shape).copy()
        scaled = self.add(f"{name}_scale", nir.Scale(scale=scale, metadata=meta), _Signal((name,), inp.scale, call.out_shape, True))
        return _Signal((scaled,), inp.scale, call.out_shape, call.exclusive)

    def pool_as_conv(self, m: nn.Module, call: _Call, pool: _Pool) -> _Signal:
        """Portable form: a Conv2d with the window's ones on each channel's diagonal, divided by torch's divisor."""
        inp, columns = call.inp, call.inp.columns()
        if inp.dense or columns is None or not pool.uniform:
            if not pool.uniform and not inp.dense:
                self.dense_cause = self.dense_cause or (
                    f"{call.path!r} divides its windows by different counts (count_include_pad=False with padding, or ceil_mode)")
            return self.dense(call, m, None)
        channels = inp.shape[0]
        if channels * channels * prod(pool.kernel) > DENSE_LIMIT:
            raise NotPortableError(f"export_nir: {call.path!r} as a Conv2d is block-diagonal over its {channels} channels "
                                   f"({channels}²×{pool.kernel} weights), over DENSE_LIMIT = {DENSE_LIMIT}; {_REMEDY}")
        node = self.window_sums(inp.shape, call, pool, columns / np.float32(pool.counts.flat[0]), {})
        return _Signal((self.add(call.name, node, inp),), _ONE, call.out_shape, call.exclusive)

    def window_sums(self, in_shape, call: _Call, pool: _Pool, per_channel_weight: np.ndarray, meta: dict) -> nir.Conv2d:
        """A Conv2d whose output is each window's sum (times a weight per channel), with torch's windows and count.

        NIR pads symmetrically and pools by the floor rule: for ceil_mode's overhang the
        kernel is padded by more on both sides, with leading zero taps (``square_taps``).
        """
        channels, height, width = in_shape
        taps = np.ones((channels, 1, *pool.kernel), np.float32) * per_channel_weight.reshape(-1, 1, 1, 1)
        weight, padding = square_taps(ungrouped(taps, channels), pool.padding, pool.stride, (height, width),
                                      tuple(call.out_shape[1:]), call.path)
        return nir.Conv2d(input_shape=(height, width), weight=weight, stride=pool.stride, padding=padding, dilation=1, groups=1,
                          bias=np.zeros(channels, np.float32), metadata=meta)

    # -- flatten and residual sums ---------------------------------------------------
    def flatten_module(self, m: nn.Flatten, call: _Call) -> _Signal:
        return self.flatten_dims(call.name, call.path, call.inp, m.start_dim, m.end_dim, call.exclusive)

    def is_flatten(self, node: torch.fx.Node) -> bool:
        if node.target in (torch.flatten, "flatten"):
            return True
        if node.target in ("view", "reshape"):
            # x.view(B, -1), the usual flatten before a classifier, and nothing else.
            before, after = node.args[0].meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
            return len(after) == 2 and after[0] == before[0] and after[1] == before[1:].numel()
        return False

    def flatten(self, node: torch.fx.Node, inp: _Signal, exclusive: bool) -> _Signal:
        if node.target in ("view", "reshape"):
            start, end = 1, -1
        else:
            args = list(node.args[1:]) + [None, None]
            start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
            end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
        return self.flatten_dims(node.name, node.name, inp, start, end, exclusive)

    def flatten_dims(self, name, path, inp: _Signal, start: int, end: int, exclusive: bool) -> _Signal:
        ndim = len(inp.shape) + 1
        start, end = start % ndim, end % ndim
        if start == 0:
            raise ExportError(f"export_nir: {path!r} flattens the batch dimension")
        if inp.dense:
            if (start, end) != (1, ndim - 1):
                raise NotPortableError(f"export_nir: {path!r} flattens part of a map that the portable form carries "
                                       f"flattened already (since {self.dense_cause}); {_REMEDY}")
            start_dim, end_dim = -len(inp.nir_shape), -1
        else:
            # Counted from the end: a dim of NIR (no batch) and the same dim of batched torch are then one
            # number, so consumers that hand NIR's dims straight to torch.nn.Flatten (norse, snnTorch,
            # nirtorch's default map) flatten the right dims of a batch too.
            start_dim, end_dim = start - ndim, end - ndim
        node = nir.Flatten(input_type={"input": np.array(inp.nir_shape)}, start_dim=start_dim, end_dim=end_dim,
                           metadata={"source_module": path})
        out_shape = tuple(int(n) for n in node.output_type["output"])
        scale = inp.scale if inp.scale.ndim == 0 else np.broadcast_to(inp.scale, inp.shape).reshape(out_shape)
        return _Signal((self.add(name, node, inp),), scale, out_shape, inp.exclusive and exclusive)

    def residual_sum(self, node: torch.fx.Node, signals, exclusive: bool) -> _Signal:
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, torch.fx.Node) for a in node.args):
            raise ExportError(f"export_nir: {node.name!r} adds a constant or scales a summand; only sums of two signals map onto NIR edges")
        summands = [signals[a] for a in node.args]
        if set(summands[0].sources) & set(summands[1].sources):
            raise ExportError(f"export_nir: {node.name!r} adds a signal to itself; NIR edges cannot carry a factor of 2")
        if any(s.dense for s in summands):  # NIR sums edges of one shape
            summands = [s if s.dense else self.densify(s, f"{node.name}_dense{i}") for i, s in enumerate(summands)]
        fixed = [s for s in summands if not self.rescalable(s)]
        target = fixed[0].scale if fixed else _ONE  # keep an IF's spikes as they are when one is summed
        summands = [self.to_scale(s, target, f"{node.name}_rescale{i}") for i, s in enumerate(summands)]
        sources = tuple(src for s in summands for src in s.sources)
        return _Signal(sources, target, summands[0].shape, exclusive and all(s.exclusive for s in summands), summands[0].dense)


def _traced(snn: nn.Module, sample_input: torch.Tensor) -> tuple[nn.Module, torch.fx.Graph]:
    """A BN-folded copy of the network, traced, with the shapes of one sample propagated."""
    source = getattr(snn, "net", snn)
    # A membrane left by a run with autograd is not a leaf, which deepcopy refuses; the copy starts afresh anyway.
    memo = {id(m.mem): torch.zeros(0) for m in source.modules() if isinstance(m, MultiStepNeuron)}
    # NIR holds numpy arrays: export from a host copy, whichever device the network runs on.
    net = copy.deepcopy(source, memo).eval().cpu()
    sample_input = sample_input.cpu()
    fold_batchnorm(net)
    try:
        graph = LeafTracer().trace(net)
    except Exception as exc:
        raise ExportError(f"export_nir: tracing {type(net).__name__} failed: {_one_line(exc)}") from exc
    for m in net.modules():
        if isinstance(m, MultiStepNeuron):
            m.timesteps = 1
            m.reset_state()
    try:
        with torch.no_grad():
            ShapeProp(torch.fx.GraphModule(net, graph)).propagate(sample_input[:1])
    except Exception as exc:
        shape = tuple(sample_input.shape)
        raise ExportError(f"export_nir: running {type(net).__name__} on a sample input of shape {shape} failed: {_one_line(exc)}") from exc
    return net, graph


def _export(net: nn.Module, graph: torch.fx.Graph, portable: bool, threshold_factor: float) -> _Exporter:
    exporter = _Exporter(net, graph, portable, threshold_factor)
    with torch.no_grad():
        exporter.run()
    return exporter


def _refuse_signed(snn: nn.Module) -> None:
    """Signed neurons have no NIR form: NIR's IF emits only positive spikes and has no spike-count state, so a
    consumer could only run another network (and the metadata form would need a node type no consumer has)."""
    signed = [name for name, m in snn.named_modules() if isinstance(m, MultiStepNeuron) and m.signed]
    if signed:
        shown = ", ".join(repr(n) for n in signed[:3]) + (f" and {len(signed) - 3} more" if len(signed) > 3 else "")
        raise ExportError(
            f"export_nir: {shown} {'are signed neurons' if len(signed) > 1 else 'is a signed neuron'} (snn.neuron = signed), "
            "which send negative spikes that take back earlier ones; NIR's IF has no negative spikes and no spike count, so "
            "no NIR graph computes this network. Convert with snn.neuron = if (convert(model, neuron='if')) to export"
        )


def export_nir(snn: nn.Module, path: str | Path, sample_input: torch.Tensor, *, portable: bool | None = None,
               threshold_factor: float = 1.0) -> nir.NIRGraph:
    """Write a converted network as a NIR graph to ``path`` (HDF5) and return the graph.

    Args:
        snn: a :class:`~qcfs_snntorch.SpikingModel` (its ``.net`` is exported) or a network
            whose activations are :class:`~qcfs_snntorch.IFNeuron` modules. Not modified.
        path: the file to write (``.nir`` by convention).
        sample_input: one step's input with a batch dimension, e.g. ``[1, 3, 32, 32]``;
            only its shape matters (NIR types have no batch dimension).
        portable: True: only the node types every public consumer maps, readable by nir
            1.0.4 (raises :class:`NotPortableError` naming the node where that is not
            exact); False: the metadata form with NIR's other node types; None (default):
            portable when it is exact, else the metadata form. The graph's metadata
            ``portable`` says which was written and why.
        threshold_factor: every IF's ``v_threshold`` is written multiplied by it (and the
            factor into its metadata, so :func:`simulate_nir` still runs our rules). For
            consumers that reset to zero, which lose the membrane above threshold at every
            spike and so under-fire: 0.6 measured best on the quickstart (docs/NIR.md).

    Raises:
        ExportError: naming the first module or operation NIR cannot express (also when the
            network cannot be traced or does not run on ``sample_input``, or has signed
            neurons); nothing is written.

    See the module docstring and docs/NIR.md for the mapping and the metadata that
    carries what NIR's IF cannot (subtract reset, v(0), firing on v ≥ θ).
    """
    if not 0 < threshold_factor <= 1:
        raise ValueError(f"export_nir: threshold_factor must be in (0, 1], got {threshold_factor!r}")
    _refuse_signed(snn)
    compensated = compensated_ops(getattr(snn, "net", snn))
    if compensated:
        raise ExportError(_compensated_message(compensated))
    net, graph = _traced(snn, sample_input)
    why_not = "asked for with portable=False"
    exporter = None
    if portable is not False:
        try:
            exporter = _export(net, graph, True, threshold_factor)
        except NotPortableError as exc:
            if portable:
                raise
            why_not = str(exc).removeprefix("export_nir: ")
    if exporter is None:
        exporter = _export(net, graph, False, threshold_factor)
    metadata = {
        "producer": "qcfs_snntorch.export_nir",
        "portable": "yes: Input, Output, Conv2d, Affine, IF and Flatten nodes only; readable by nir 1.0.4"
                    if exporter.portable else f"no: {why_not}",
        "time": "one step of the SNN = one NIR time unit (dt = 1); IF integrates v += r * input per step",
        "encoding": "direct: the same input is fed at every step",
        "readout": "the prediction after T steps is the mean of the Output over the first T steps",
        "if_semantics": "see each IF node's metadata: reset, fire, v_initial, spike_value (folded downstream)",
    }
    if threshold_factor != 1.0:
        metadata["threshold_factor"] = (f"thresholds written x {threshold_factor} for consumers that reset to zero; "
                                        "with our rules (subtract reset) divide them back")
    result = nir.NIRGraph(nodes=exporter.nodes, edges=exporter.edges, metadata=metadata, type_check=True)
    _write(path, result, exporter.portable)
    return result


def _compensated_message(ops: list) -> str:
    where = ", ".join(f"{op.where or '<root>'} ({op.kind}: {op.op_name})" for op in ops[:8])
    more = f" and {len(ops) - 8} more" if len(ops) > 8 else ""
    return (f"export_nir: the network has {len(ops)} compensated operation(s), which NIR has no node for: {where}{more}. "
            "They compute a non-linear function of running means (LayerNorm, gates, attention, …), not IF dynamics; "
            "convert with strict=True (snn.strict=true) to find a network of IF neurons only, or export a network without them")


def _write(path: str | Path, graph: nir.NIRGraph, portable: bool) -> None:
    """``nir.write`` with the nodes kept in the order they were added, which is topological.

    h5py lists a group's members by name unless the group tracks creation order, and
    nir.read builds the graph in the order listed: nirtorch 2.0.2's ``nir_to_torch`` (what
    snnTorch and sinabs' nir pin get) needs the Input first and each node after its inputs.
    """
    config = h5py.get_config()
    before, config.track_order = config.track_order, True
    try:
        nir.write(path, graph)
    finally:
        config.track_order = before
    if portable:
        _drop_v_reset(path)


def _drop_v_reset(path: str | Path) -> None:
    """nir 1.0.4 (sinabs' pin) refuses an IF's ``v_reset``; nir 1.0.8 reads its absence as zeros, what we wrote."""
    with h5py.File(path, "a") as f:
        for group in f["node/nodes"].values():
            if group["type"][()] == b"IF" and "v_reset" in group:
                del group["v_reset"]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
