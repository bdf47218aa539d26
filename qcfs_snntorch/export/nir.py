"""export_nir: a converted network → a NIR graph (nir 1.0.8), written to an HDF5 file.

What maps exactly
- Conv1d/Conv2d → ``nir.Conv1d``/``nir.Conv2d``; Linear → ``nir.Affine`` (zero bias when
  the layer has none). BatchNorm is folded into the preceding conv/linear (on a copy); a
  BatchNorm2d that cannot be folded becomes a per-channel 1×1 ``nir.Conv2d``. nir 1.0.8
  types a conv's input by ``weight.shape[1]`` (ignoring ``groups``) and sizes a Conv2d's
  output by the kernel height alone, so ``nir.read`` rejects grouped or non-square
  kernels as such: grouped weights are written block-diagonal (``groups = 1``) and a
  non-square kernel is set in a square one of zeros with a padding that keeps its windows.
- Average pooling without padding (and adaptive average pooling with an integer ratio)
  → ``nir.AvgPool2d``; padded average pooling → ``nir.SumPool2d`` + ``nir.Scale`` holding
  1 / (torch's divisor) per output position, so border windows are exact whatever
  ``count_include_pad`` was. ``ceil_mode`` pooling whose last window overhangs the
  bottom/right edge (NIR pads symmetrically and pools by the floor rule) → a
  ``nir.Conv2d`` of ones per channel, padded by more on both sides with leading zero taps
  so that its windows are torch's and their number is ceil_mode's, + the same ``nir.Scale``
  (the overhang never counts in torch's divisor).
- flatten → ``nir.Flatten`` (NIR shapes have no batch dimension: torch ``start_dim=1`` is
  NIR ``start_dim=0``).
- A residual add has no node: every summand gets an edge into the consumer (NIR sums
  the incoming edges of a node).
- Each IFNeuron → ``nir.IF`` with ``v_threshold = θ``, ``v_reset = 0`` and ``r`` (below),
  as per-neuron arrays of the layer's shape. One step of our SNN is one unit of NIR time
  (dt = 1): ``v += r · input`` per step.

Spike value. A NIR spike is 1; ours is worth θ. The exporter folds θ into whatever
consumes the spikes, so a plain NIR consumer computes the same function. Every signal
carries a scale (its real value = scale × its NIR value): an IF emits scale θ; a
conv/linear multiplies its weights by the scale of its input and emits scale 1; an IF
takes its input scale as ``r``, which keeps its membrane in the source model's units
(threshold θ, v(0) = θ/2). A residual sum needs one scale: summands computed only for
the sum (a conv branch) are rescaled in their weights; a ``nir.Scale`` node is inserted
only where two fixed scales meet. With per-channel thresholds an IF is followed by a
``nir.Scale`` holding θ.

What NIR's IF cannot express is written into each IF node's ``metadata`` (see
docs/NIR.md): ``reset = "subtract"`` (NIR resets to ``v_reset``), ``fire = "v >=
v_threshold"`` (NIR fires on ``>``), ``v_initial`` (θ/2 per neuron; NIR starts at 0),
``spike_value`` (θ, already folded downstream) and ``source_module``. Graph metadata
says the input is fed unchanged at every step and the prediction is the mean of the
output over the steps. :func:`simulate_nir` runs a graph with either semantics.

Whatever cannot be exported (max pooling, concatenation, products, unconverted QCFS,
other neuron types, timm's dynamically padded ``*Same`` layers) raises :class:`ExportError`
(a ``ValueError``) with a one-paragraph message naming the module or operation.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, replace
from pathlib import Path

import nir
import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.utils import _pair

from ..convert import fold_batchnorm
from ..neurons import IFNeuron, MultiStepNeuron
from ..qcfs import QCFS
from ..tracing import LeafTracer

__all__ = ["ExportError", "export_nir"]


class ExportError(ValueError):
    """The network holds something NIR cannot express; nothing was written.

    The message is one paragraph, ``export_nir: …``, naming the first module or operation
    that was refused and why, so a command line can print it as it is. A ``ValueError``,
    so code that caught ``ValueError`` before still catches it.
    """

_ADDS = {("call_function", f) for f in (operator.add, operator.iadd, torch.add)} | {("call_method", "add"), ("call_method", "add_")}
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_RESCALABLE = (nir.Conv1d, nir.Conv2d, nir.Affine, nir.Scale)


@dataclass(frozen=True)
class _Signal:
    """A value of the traced network as NIR sees it: the sum of ``sources``' outputs."""

    sources: tuple[str, ...]
    scale: float  # real value = scale × NIR value
    shape: tuple[int, ...]  # one sample, no batch dimension
    exclusive: bool  # only one consumer: its producing weights may be rescaled


def _window_sizes(n: int, outputs: int, kernel: int, stride: int, padding: int, include_pad: bool) -> np.ndarray:
    """What torch's avg_pool divides each window along one dimension by (floor or ceil mode).

    A window starts at ``i·stride − padding``; it is cut at the end of the right padding
    (ceil_mode's overhang never counts). Without ``count_include_pad`` only input elements count.
    """
    start = np.arange(outputs) * stride - padding
    end = np.minimum(start + kernel, n + padding)
    return end - start if include_pad else np.minimum(end, n) - np.maximum(start, 0)


def _ungrouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's weight ``[C_out, C_in / groups, …]`` as the block-diagonal ``[C_out, C_in, …]``.

    nir 1.0.8 takes a conv's input channels from ``weight.shape[1]`` whatever ``groups``
    is, so a grouped (e.g. depthwise) conv fails the type check of ``nir.read``; the dense
    form computes the same and reads back (its zeros compress away in the HDF5 file).
    """
    if groups == 1:
        return weight
    out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
    dense = np.zeros((weight.shape[0], in_per_group * groups, *weight.shape[2:]), weight.dtype)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group:(g + 1) * in_per_group] = weight[rows]
    return dense


def _square_taps(weight: np.ndarray, padding, stride, in_hw, out_hw, path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """A conv weight ``[…, kh, kw]`` placed in a square ``K×K`` kernel of zeros, with a padding
    that keeps its windows (left padding, then the taps) and gives ``out_hw`` outputs.

    nir 1.0.8 sizes a Conv2d's output by ``weight.shape[2]`` in both dimensions, so a
    non-square kernel would type wrong and fail ``nir.read``. Taps at offset ``a`` under a
    padding ``p + a`` see what they saw under ``p``; ``a`` is chosen per dimension so that
    ``(n + 2(p + a) − K) // s + 1`` outputs come out: the zeros padded at the end stand in
    for torch's asymmetric extra (ceil_mode) and are never weighted.
    """
    kh, kw = weight.shape[-2:]
    for size in range(max(kh, kw), max(kh, kw) + 2 * max(stride) + 2):
        offsets = [
            next((a for a in range(size - k + 1) if (n + 2 * (p + a) - size) // s + 1 == o), None)
            for n, o, k, s, p in zip(in_hw, out_hw, (kh, kw), stride, padding)
        ]
        if None not in offsets:
            (a, b) = offsets
            square = np.zeros((*weight.shape[:-2], size, size), weight.dtype)
            square[..., a:a + kh, b:b + kw] = weight
            return square, (padding[0] + a, padding[1] + b)
    raise ExportError(f"export_nir: {path!r} maps {tuple(in_hw)} to {tuple(out_hw)}, which no symmetrically padded NIR Conv2d reproduces")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


class _Exporter:
    def __init__(self, net: nn.Module, graph: torch.fx.Graph):
        self.modules = dict(net.named_modules())
        self.graph = graph
        self.nodes: dict[str, nir.NIRNode] = {}
        self.edges: list[tuple[str, str]] = []

    # -- helpers ---------------------------------------------------------------------
    def add(self, name: str, node: nir.NIRNode, inp: _Signal | None) -> str:
        """Add ``node`` fed by ``inp``; returns its name (made unique)."""
        while name in self.nodes:
            name += "_"
        self.nodes[name] = node
        if inp is not None:
            self.edges += [(src, name) for src in inp.sources]
        return name

    def rescalable(self, sig: _Signal) -> bool:
        return sig.exclusive and all(isinstance(self.nodes[s], _RESCALABLE) for s in sig.sources)

    def to_scale(self, sig: _Signal, target: float, name: str) -> _Signal:
        """Express ``sig`` in units of ``target``: rescale its producers, or add a nir.Scale."""
        if sig.scale == target:
            return sig
        factor = sig.scale / target
        if self.rescalable(sig):
            for src in sig.sources:
                node = self.nodes[src]
                if isinstance(node, nir.Scale):
                    node.scale = node.scale * np.float32(factor)
                else:
                    node.weight = node.weight * np.float32(factor)
                    node.bias = node.bias * np.float32(factor)
            return replace(sig, scale=target)
        name = self.add(name, nir.Scale(scale=np.full(sig.shape, factor, dtype=np.float32)), sig)
        return _Signal((name,), target, sig.shape, exclusive=True)

    # -- the walk --------------------------------------------------------------------
    def run(self) -> None:
        signals: dict[torch.fx.Node, _Signal] = {}
        for node in self.graph.nodes:
            exclusive = len(node.users) == 1
            if node.op == "placeholder":
                if signals:
                    raise ExportError(f"export_nir: only one network input is supported, found {node.name!r}")
                shape = tuple(node.meta["tensor_meta"].shape[1:])
                name = self.add("input", nir.Input(input_type=np.array(shape)), None)
                signals[node] = _Signal((name,), 1.0, shape, exclusive)
            elif node.op == "output":
                result = node.args[0]
                if not isinstance(result, torch.fx.Node):
                    raise ExportError("export_nir: the network must return one tensor (NIR graphs here have one Output)")
                sig = self.to_scale(signals[result], 1.0, "output_scale")
                self.add("output", nir.Output(output_type=np.array(sig.shape)), sig)
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

    def module(self, node: torch.fx.Node, inp: _Signal, exclusive: bool) -> _Signal:
        m, name, path = self.modules[node.target], node.name, node.target
        out_shape = tuple(node.meta["tensor_meta"].shape[1:])
        meta = {"source_module": path}
        if isinstance(m, _PASS_THROUGH):
            return replace(inp, exclusive=inp.exclusive and exclusive)
        if isinstance(m, QCFS):
            raise ExportError(f"export_nir: {path!r} is a QCFS activation; export the converted network (qcfs_snntorch.convert)")
        if isinstance(m, MultiStepNeuron):
            return self.neuron(m, name, path, inp)
        # Exact types: timm's leaf subclasses (Conv2dSame, AvgPool2dSame, BatchNormAct2d) compute
        # something else (dynamic "same" padding, a fused activation) and are refused below.
        if type(m) in (nn.Conv1d, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise ExportError(f"export_nir: {path!r} uses padding_mode={m.padding_mode!r}; NIR convolutions pad with zeros")
            bias = _np(m.bias) if m.bias is not None else np.zeros(m.out_channels, np.float32)
            common = dict(weight=_ungrouped(_np(m.weight) * np.float32(inp.scale), m.groups), bias=bias, groups=1, metadata=meta)
            if isinstance(m, nn.Conv2d):
                padding = m.padding
                if m.kernel_size[0] != m.kernel_size[1]:
                    if m.dilation != (1, 1) or isinstance(padding, str):
                        raise ExportError(f"export_nir: {path!r} has a non-square kernel {m.kernel_size} with dilation or string padding; nir 1.0.8 sizes a Conv2d's output by its kernel height alone")
                    common["weight"], padding = _square_taps(common["weight"], padding, m.stride, inp.shape[1:], out_shape[1:], path)
                conv = nir.Conv2d(input_shape=inp.shape[1:], stride=m.stride, padding=padding, dilation=m.dilation, **common)
            else:
                conv = nir.Conv1d(input_shape=inp.shape[1], stride=m.stride[0], padding=m.padding if isinstance(m.padding, str) else m.padding[0], dilation=m.dilation[0], **common)
            return _Signal((self.add(name, conv, inp),), 1.0, out_shape, exclusive)
        if isinstance(m, nn.Linear):
            if len(inp.shape) != 1:
                raise ExportError(f"export_nir: {path!r} is applied to a {len(inp.shape) + 1}-d input; NIR's Affine takes [batch, features]")
            bias = _np(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
            affine = nir.Affine(weight=_np(m.weight) * np.float32(inp.scale), bias=bias, metadata=meta)
            return _Signal((self.add(name, affine, inp),), 1.0, out_shape, exclusive)
        if type(m) is nn.BatchNorm2d and m.track_running_stats:
            # Not folded (it follows no conv of its own): a per-channel 1×1 conv is the same affine map.
            scale = torch.rsqrt(m.running_var + m.eps) * (m.weight if m.affine else 1.0)
            shift = (m.bias if m.affine else 0.0) - m.running_mean * scale
            conv = nir.Conv2d(
                input_shape=inp.shape[1:], weight=_ungrouped(_np(scale.reshape(-1, 1, 1, 1)) * np.float32(inp.scale), m.num_features),
                stride=1, padding=0, dilation=1, groups=1, bias=_np(shift), metadata=meta,
            )
            return _Signal((self.add(name, conv, inp),), 1.0, out_shape, exclusive)
        if type(m) in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            return self.avg_pool(m, name, path, inp, out_shape, exclusive)
        if isinstance(m, nn.Flatten):
            return self.flatten_dims(name, path, inp, m.start_dim, m.end_dim, exclusive)
        hint = "; max pooling is not linear in spike rates: use average pooling" if "MaxPool" in type(m).__name__ else ""
        raise ExportError(f"export_nir: module {path!r} ({type(m).__name__}) has no NIR equivalent here{hint}")

    def neuron(self, m: MultiStepNeuron, name: str, path: str, inp: _Signal) -> _Signal:
        if not isinstance(m, IFNeuron):
            raise ExportError(f"export_nir: {path!r} is a {type(m).__name__}; only IFNeuron maps onto nir.IF")
        shape = inp.shape
        theta = m.threshold.detach().float().cpu()
        theta_full = _np(theta.expand(shape))
        # initial_potential is asked rather than assumed, so subclasses with another v(0) export right.
        v_initial = _np(m.initial_potential(torch.zeros(1, *shape, device=m.threshold.device))[0])
        meta = {
            "source_module": path,
            "reset": "subtract",  # v ← v − v_threshold after a spike (NIR: v ← v_reset)
            "fire": "v >= v_threshold",  # NIR: v > v_threshold
            "v_initial": v_initial,  # NIR: 0
            "spike_value": float(theta) if theta.numel() == 1 else _np(theta),  # folded into the consumers
        }
        node = nir.IF(
            r=np.full(shape, inp.scale, dtype=np.float32),
            v_threshold=theta_full,
            v_reset=np.zeros(shape, dtype=np.float32),
            metadata=meta,
        )
        out = _Signal((self.add(name, node, inp),), 1.0, shape, exclusive=False)
        if theta.numel() == 1:
            return replace(out, scale=float(theta))
        # Per-channel θ: one scalar scale cannot carry it, so spikes are scaled by a node.
        scaled = self.add(f"{name}_scale", nir.Scale(scale=theta_full, metadata={"source_module": path}), out)
        return _Signal((scaled,), 1.0, shape, exclusive=False)

    def avg_pool(self, m, name, path, inp, out_shape, exclusive) -> _Signal:
        channels, height, width = inp.shape
        out_hw = tuple(out_shape[1:])
        if isinstance(m, nn.AdaptiveAvgPool2d):
            oh, ow = out_hw
            if height % oh or width % ow:
                raise ExportError(f"export_nir: {path!r} pools {height}×{width} to {oh}×{ow}, not an integer ratio")
            kernel, stride, padding, divisor, include_pad = (height // oh, width // ow), (height // oh, width // ow), (0, 0), None, True
        else:
            kernel, padding = _pair(m.kernel_size), _pair(m.padding)
            stride = _pair(m.stride if m.stride is not None else m.kernel_size)
            divisor, include_pad = m.divisor_override, m.count_include_pad
        dims = list(zip((height, width), out_hw, kernel, stride, padding))
        # ceil_mode's last window overhangs the padded input (NIR's pools follow the floor rule).
        overhang = any((o - 1) * s + k > n + 2 * p for n, o, k, s, p in dims)
        meta = {"source_module": path}
        if not overhang and padding == (0, 0) and divisor is None:
            pool = nir.AvgPool2d(kernel_size=np.array(kernel), stride=np.array(stride), padding=np.array(padding), metadata=meta)
            return _Signal((self.add(name, pool, inp),), inp.scale, out_shape, inp.exclusive and exclusive)
        # Otherwise: sum each window, then a Scale divides by what torch divides that window by.
        if not overhang:
            pool = nir.SumPool2d(kernel_size=np.array(kernel), stride=np.array(stride), padding=np.array(padding), metadata=meta)
        else:
            # NIR pads symmetrically and has no crop: a Conv2d of ones sums each window, and
            # _square_taps pads it by more on both sides, with leading zero taps, so that its
            # windows are torch's and their number is ceil_mode's.
            ones = np.ones((channels, 1, *kernel), np.float32)
            weight, conv_padding = _square_taps(ones, padding, stride, (height, width), out_hw, path)
            pool = nir.Conv2d(
                input_shape=(height, width), weight=_ungrouped(weight, channels), stride=stride, padding=conv_padding,
                dilation=1, groups=1, bias=np.zeros(channels, np.float32),
                metadata={**meta, "op": "ceil_mode average pooling: the sum of each window (the Scale that follows divides)"},
            )
        name = self.add(name, pool, inp)
        if divisor is not None:
            count = np.full(out_hw, float(divisor))
        else:
            count = np.outer(*(_window_sizes(n, o, k, s, p, include_pad) for n, o, k, s, p in dims))
        scale = np.broadcast_to((1.0 / count).astype(np.float32), (channels, *out_hw)).copy()
        summed = _Signal((name,), inp.scale, out_shape, exclusive)
        scaled = self.add(f"{name}_scale", nir.Scale(scale=scale, metadata=meta), summed)
        return replace(summed, sources=(scaled,))

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

    def flatten_dims(self, name, path, inp, start, end, exclusive) -> _Signal:
        ndim = len(inp.shape) + 1
        start, end = start % ndim, end % ndim
        if start == 0:
            raise ExportError(f"export_nir: {path!r} flattens the batch dimension")
        end = -1 if end == ndim - 1 else end - 1
        node = nir.Flatten(input_type={"input": np.array(inp.shape)}, start_dim=start - 1, end_dim=end, metadata={"source_module": path})
        out_shape = tuple(int(n) for n in node.output_type["output"])
        return _Signal((self.add(name, node, inp),), inp.scale, out_shape, inp.exclusive and exclusive)

    def residual_sum(self, node: torch.fx.Node, signals, exclusive: bool) -> _Signal:
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, torch.fx.Node) for a in node.args):
            raise ExportError(f"export_nir: {node.name!r} adds a constant or scales a summand; only sums of two signals map onto NIR edges")
        summands = [signals[a] for a in node.args]
        if set(summands[0].sources) & set(summands[1].sources):
            raise ExportError(f"export_nir: {node.name!r} adds a signal to itself; NIR edges cannot carry a factor of 2")
        fixed = [s for s in summands if not self.rescalable(s)]
        target = fixed[0].scale if fixed else 1.0  # keep an IF's spikes as they are when one is summed
        summands = [self.to_scale(s, target, f"{node.name}_rescale{i}") for i, s in enumerate(summands)]
        sources = tuple(src for s in summands for src in s.sources)
        return _Signal(sources, target, summands[0].shape, exclusive and all(s.exclusive for s in summands))


def export_nir(snn: nn.Module, path: str | Path, sample_input: torch.Tensor) -> nir.NIRGraph:
    """Write a converted network as a NIR graph to ``path`` (HDF5) and return the graph.

    Args:
        snn: a :class:`~qcfs_snntorch.SpikingModel` (its ``.net`` is exported) or a network
            whose activations are :class:`~qcfs_snntorch.IFNeuron` modules. Not modified.
        path: the file to write (``.nir`` by convention).
        sample_input: one step's input with a batch dimension, e.g. ``[1, 3, 32, 32]``;
            only its shape matters (NIR types have no batch dimension).

    Raises:
        ExportError: naming the first module or operation NIR cannot express (also when the
            network cannot be traced or does not run on ``sample_input``); nothing is written.

    See the module docstring and docs/NIR.md for the mapping and the metadata that
    carries what NIR's IF cannot (subtract reset, v(0) = θ/2, firing on v ≥ θ).
    """
    net = copy.deepcopy(getattr(snn, "net", snn)).eval()
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
    exporter = _Exporter(net, graph)
    exporter.run()
    metadata = {
        "producer": "qcfs_snntorch.export_nir",
        "time": "one step of the SNN = one NIR time unit (dt = 1); IF integrates v += r * input per step",
        "encoding": "direct: the same input is fed at every step",
        "readout": "the prediction after T steps is the mean of the Output over the first T steps",
        "if_semantics": "see each IF node's metadata: reset, fire, v_initial, spike_value (folded downstream)",
    }
    result = nir.NIRGraph(nodes=exporter.nodes, edges=exporter.edges, metadata=metadata, type_check=True)
    nir.write(path, result)
    return result


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
