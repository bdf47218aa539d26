"""Expectation-compensated operations: a non-linear op between spiking layers, exact in the mean.

Between spiking layers a signal is a spike train whose running mean approximates the
ANN's activation. A non-linear op ``f`` (LayerNorm, softmax, a sigmoid gate, a product of
two signals, max, GELU, …) applied step by step would compute the mean of ``f``, not
``f`` of the mean. Expectation compensation (Huang et al., ACM MM 2024) keeps the
running sum of every input instead and emits at step ``t``

    out_t = t·f(m_t) − (t − 1)·f(m_{t−1}),   m_t = (x_1 + … + x_t) / t,

so the outputs up to ``t`` sum to exactly ``t·f(m_t)``: the rest of the network sees ``f``
of the rate, as conversion assumes. A product of two signals is the same rule with ``f``
of two running means. At ``t = 1`` the op *is* ``f`` (bit for bit).

In the engine's time-folded layout (``[T·B, …]``, see :mod:`qcfs_snntorch.spiking`) this
is one ``cumsum`` over time, ``f`` once on ``[T·B, …]`` and a difference along time; the
running sums, the step count and the last ``t·f(m_t)`` are state, carried between chunks
and ``step`` calls and cleared by :meth:`CompensatedOp.reset_state` with the neurons.
Gradients are those of the formula (exact; no surrogate).

One class per kind, all on :class:`CompensatedOp`; they differ only in the cost they
report (multiply-accumulates per evaluation, for :mod:`qcfs_snntorch.stats`).
:data:`COMPENSATED_KINDS` is the table conversion reads. To add a kind: a subclass with
``kind`` and ``ops_per_element`` (or its own :meth:`CompensatedOp.macs`) and one line there.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "COMPENSATED_KINDS",
    "CompensatedElementwise",
    "CompensatedGate",
    "CompensatedMax",
    "CompensatedNorm",
    "CompensatedOp",
    "CompensatedProduct",
    "RunningState",
    "StepDifference",
    "TensorMethod",
    "compensated_ops",
    "running_mean",
    "step_differences",
]


class TensorMethod:
    """``TensorMethod("softmax")(x, -1)`` is ``x.softmax(-1)``: a ``call_method`` node as a function."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, obj, *args, **kwargs):
        return getattr(obj, self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f".{self.name}()"


class RunningState(nn.Module):
    """What the compensation keeps over time steps: a step count, reset with the neurons.

    ``timesteps`` is the number of steps folded into dim 0 of the next call (set by
    :class:`~qcfs_snntorch.spiking.SpikingModel`); :meth:`reset_state` starts a new sample and
    :meth:`keep` drops the samples early exit has finished with.
    """

    def __init__(self, where: str = ""):
        super().__init__()
        self.where = where
        self.timesteps = 1
        self.reset_state()

    def reset_state(self) -> None:
        self.count = 0

    def keep(self, rows: torch.Tensor) -> None:
        pass

    def step_numbers(self, like: torch.Tensor) -> torch.Tensor:
        """``count + 1 … count + timesteps``: the step each folded slice of this call is."""
        return torch.arange(self.count + 1, self.count + self.timesteps + 1, device=like.device, dtype=like.dtype)


class CompensatedOp(RunningState):
    """``f`` of the running means of its signal inputs, emitted as a difference over time.

    Args:
        fn: what the ANN computes: a function, a :class:`TensorMethod` or a module (held
            by reference, not registered: its parameters stay where the network has them,
            so the state dict is unchanged and a module called at several places keeps one
            set of parameters while each place gets its own running sums).
        signals: which arguments are signals (positions of ``args`` and names of
            ``kwargs``); the others (parameters, shapes, dims) pass through unchanged.
        where: the module path the op belongs to, for reports.

    Two attributes let a chain of compensated ops skip the round trips between them (set
    by conversion, see :mod:`qcfs_snntorch.mean_domain`): ``mean_signals``, the signals that
    already arrive as running means (no running sum is taken of them), and ``emits_means``
    (return ``f`` of the running means itself, for the next op of the chain, instead of
    the per-step differences).
    """

    kind = "elementwise"
    ops_per_element = 1  # rough cost of f per output element, in multiply-accumulates

    def __init__(self, fn: Callable, signals: Sequence[int | str], where: str = ""):
        self.__dict__["fn"] = fn  # not a child: see the class docstring
        super().__init__(where)
        self.signals = tuple(signals)
        self.mean_signals: frozenset[int | str] = frozenset()
        self.emits_means = False

    def reset_state(self) -> None:
        """Forget the running sums: the next call is step 1 of a new sample."""
        super().reset_state()
        self.sums: dict[int | str, torch.Tensor] = {}  # per signal argument
        self.last = None  # t·f(m_t) of the last step seen (a tensor, or a tuple for tuple outputs)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the state of the samples ``rows`` only (early exit drops the others)."""
        self.sums = {key: s[rows] for key, s in self.sums.items()}
        self.last = _map_floats(self.last, lambda y: y[rows])

    def forward(self, *args, **kwargs):
        args, kwargs = list(args), dict(kwargs)
        steps = None
        for key in self.signals:
            box = args if isinstance(key, int) else kwargs
            x = box[key]
            if not (isinstance(x, torch.Tensor) and torch.is_floating_point(x)):
                continue  # traced as a signal but not one at run time (an optional mask that is None)
            steps = self.check_folded(x)
            if key not in self.mean_signals:
                box[key], self.sums[key] = running_mean(x, self.step_numbers(x), self.sums.get(key))
        out = self.fn(*args, **kwargs)
        if steps is None:  # no signal reached it (never, as conversion wraps them): f as is
            return out
        if self.emits_means:
            self.count += self.timesteps
            return out
        result, self.last = step_differences(out, self.step_numbers(_first_float(out)), self.last)
        self.count += self.timesteps
        return result

    def check_folded(self, x: torch.Tensor) -> int:
        if x.shape[0] % self.timesteps:
            raise RuntimeError(f"{type(self).__name__} at {self.where!r}: leading dim {x.shape[0]} is not a multiple "
                               f"of timesteps={self.timesteps}: time is folded into the batch dimension, and either the network moved "
                               f"that dimension away from dim 0 before this op (not supported: it cannot be compensated) or the "
                               f"network was called outside SpikingModel")
        return self.timesteps

    def macs(self, inputs: Sequence, output) -> int:
        """Multiply-accumulates of one call on these (folded) tensors: ``f`` and the compensation.

        The compensation adds per element a running sum and a division on each signal
        input that is not a running mean already, and a product by ``t`` and a difference
        on each output unless the op emits running means: 2 + 2 operations.
        """
        outputs = [y for y in _flat(output) if torch.is_floating_point(y)]
        signal_elements = sum(inputs[k].numel() for k in self.signals
                              if isinstance(k, int) and k < len(inputs) and k not in self.mean_signals)
        out_elements = 0 if self.emits_means else sum(y.numel() for y in outputs)
        return int(self.f_macs(inputs, outputs) + 2 * signal_elements + 2 * out_elements)

    def f_macs(self, inputs: Sequence, outputs: list[torch.Tensor]) -> float:
        return self.ops_per_element * sum(y.numel() for y in outputs)

    @property
    def op_name(self) -> str:
        """What it computes, for messages: a module's class, a function's or method's name."""
        return _describe(self.fn)

    def extra_repr(self) -> str:
        return f"{self.kind}: {self.op_name} at {self.where or '<root>'}"


class CompensatedNorm(CompensatedOp):
    """LayerNorm, GroupNorm, RMSNorm, …: statistics of the running means, then the affine map."""

    kind = "norm"
    ops_per_element = 5  # mean, variance, normalise, scale, shift


class CompensatedGate(CompensatedOp):
    """Sigmoid, hard-sigmoid, tanh, softmax: a squashing function of the running mean."""

    kind = "gate"
    ops_per_element = 4  # exp, sum, divide (softmax); sigmoid about the same


class CompensatedMax(CompensatedOp):
    """Max / min (functional, pooling): of the running means, which can change which input wins."""

    kind = "max"
    ops_per_element = 1


class CompensatedElementwise(CompensatedOp):
    """Any other function of one signal left unreplaced (GELU, SiLU, exp, …)."""

    kind = "elementwise"
    ops_per_element = 4


class StepDifference(RunningState):
    """Running means back to per-step values: emits ``t·y_t − (t − 1)·y_{t−1}`` for the running mean ``y_t``.

    The second half of a compensated op on its own: where a chain of compensated ops that
    works on running means (see :mod:`qcfs_snntorch.mean_domain`) hands its value to a neuron,
    to the output or to a layer that also sees per-step values, the per-step outputs up to
    ``t`` must again sum to ``t·y_t``. Values that are not floating-point tensors (shapes,
    indices) pass through.
    """

    kind = "difference"
    op_name = "t·y_t − (t−1)·y_(t−1)"

    def reset_state(self) -> None:
        super().reset_state()
        self.last = None

    def keep(self, rows: torch.Tensor) -> None:
        self.last = _map_floats(self.last, lambda y: y[rows])

    def forward(self, value):
        first = _first_float(value)
        if first is None:
            return value
        result, self.last = step_differences(value, self.step_numbers(first), self.last)
        self.count += self.timesteps
        return result

    def macs(self, inputs: Sequence, output) -> int:
        return 2 * sum(y.numel() for y in _flat(output) if isinstance(y, torch.Tensor) and torch.is_floating_point(y))

    def f_macs(self, inputs: Sequence, outputs: list[torch.Tensor]) -> float:
        return 0.0

    def extra_repr(self) -> str:
        return f"to steps at {self.where or '<root>'}"


def running_mean(x: torch.Tensor, numbers: torch.Tensor, previous_sum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The running means of a folded signal ``[T·B, …]`` at steps ``numbers``, and the running sum after the last."""
    steps = numbers.numel()
    total = running_sums(x.reshape(steps, x.shape[0] // steps, *x.shape[1:]), previous_sum)
    return (total / _column(numbers, x)).reshape(x.shape), total[-1].clone()


def running_sums(seq: torch.Tensor, previous_sum: torch.Tensor | None) -> torch.Tensor:
    """``[T, B, …]`` → the running sums over dim 0, continuing from ``previous_sum`` (the last call's)."""
    total = seq.cumsum(0)
    return total if previous_sum is None else total + previous_sum


def step_differences(value, numbers: torch.Tensor, previous):
    """Folded running means (a tensor or a tuple) → the per-step outputs whose sum through step t is ``t·y_t``,
    and the last ``t·y_t`` (what the next call's first step is a difference from)."""

    def unfold(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(numbers.numel(), y.shape[0] // numbers.numel(), *y.shape[1:]) * _column(numbers, y)

    cumulative = _map_floats(value, unfold)
    result = _map_floats(cumulative, None, _difference, previous)
    return _map_floats(result, lambda d: d.flatten(0, 1), like=value), _map_floats(cumulative, lambda y: y[-1])


def _difference(cumulative: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``cumulative[t] − cumulative[t − 1]`` along dim 0, from ``previous`` (zero at step 1) for the first."""
    if cumulative.requires_grad and torch.is_grad_enabled():
        start = torch.zeros_like(cumulative[:1]) if previous is None else previous.unsqueeze(0)
        return torch.diff(cumulative, dim=0, prepend=start)
    out = torch.empty_like(cumulative)  # written in place: torch.diff's prepend concatenates, a copy of every element
    torch.sub(cumulative[1:], cumulative[:-1], out=out[1:])
    if previous is None:
        out[0] = cumulative[0]
    else:
        torch.sub(cumulative[0], previous, out=out[0])
    return out


def _shifted_product(seq: torch.Tensor, means: torch.Tensor, sums: torch.Tensor, previous_sum, previous_mean) -> torch.Tensor:
    """``a_t·b̄_t + S_{t−1}·(b̄_t − b̄_{t−1})`` over the steps of ``seq`` (``a``), with ``S`` its running sums."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (seq, means, sums)):
        start_sum = torch.zeros_like(sums[:1]) if previous_sum is None else previous_sum.unsqueeze(0)
        start_mean = means[:1] if previous_mean is None else previous_mean.unsqueeze(0)
        sums_before = torch.cat([start_sum, sums[:-1]])
        return seq * means + sums_before * (means - torch.cat([start_mean, means[:-1]]))
    out = seq * means
    if seq.shape[0] > 1:
        out[1:].addcmul_(sums[:-1], means[1:] - means[:-1])
    if previous_sum is not None:
        out[0].addcmul_(previous_sum, means[0] - previous_mean)
    return out


def _first_float(value) -> torch.Tensor | None:
    return next((y for y in _flat(value) if isinstance(y, torch.Tensor) and torch.is_floating_point(y)), None)


_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.baddbmm}


_ELEMENTWISE_PRODUCTS = {operator.mul, torch.mul}


class CompensatedProduct(CompensatedOp):
    """A product of signals (x·gate, q·kᵀ, attention·v, whole scaled-dot-product attention) of their running means.

    An elementwise product ``a·b`` whose output goes back to per-step values (a squeeze-excite
    gate times its feature map) takes a shorter way: with ``S_t`` the running sum of ``a`` and
    ``b̄_t`` the running mean of ``b``, ``t·ā_t·b̄_t = S_t·b̄_t``, so step t emits
    ``a_t·b̄_t + S_{t−1}·(b̄_t − b̄_{t−1})`` — the same value without dividing ``a`` by ``t``,
    multiplying back and taking a difference of the large operand.
    """

    kind = "product"

    def reset_state(self) -> None:
        super().reset_state()
        self.last_mean = None  # b̄ of the last step seen (the shorter way for x·gate)

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        if self.last_mean is not None:
            self.last_mean = self.last_mean[rows]

    def forward(self, *args, **kwargs):
        pair = self.elementwise_operands(args, kwargs)
        if pair is None:
            return super().forward(*args, **kwargs)
        big, small = pair
        a, b = args[big], args[small]
        self.check_folded(a)
        self.check_folded(b)
        numbers = self.step_numbers(a)
        steps = numbers.numel()
        if small not in self.mean_signals:
            b, self.sums[small] = running_mean(b, numbers, self.sums.get(small))
        seq = a.reshape(steps, a.shape[0] // steps, *a.shape[1:])
        means = b.reshape(steps, b.shape[0] // steps, *b.shape[1:])
        previous_sum, previous_mean = self.sums.get(big), self.last_mean
        sums = running_sums(seq, previous_sum)
        out = _shifted_product(seq, means, sums, previous_sum, previous_mean)
        self.sums[big], self.last_mean = sums[-1].clone(), means[-1]
        self.count += steps
        return out.reshape(torch.broadcast_shapes(a.shape, b.shape))

    def elementwise_operands(self, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """(position of the per-step operand to sum, position of the other) for ``a * b`` emitted per step, else None."""
        name = getattr(self.fn, "name", None)
        if self.emits_means or kwargs or len(args) != 2 or not (self.fn in _ELEMENTWISE_PRODUCTS or name == "mul"):
            return None
        if set(self.signals) != {0, 1} or not all(isinstance(x, torch.Tensor) and torch.is_floating_point(x) for x in args):
            return None
        per_step = [i for i in (0, 1) if i not in self.mean_signals]
        if not per_step:
            return None
        big = max(per_step, key=lambda i: args[i].numel())
        if args[big].shape != torch.broadcast_shapes(args[0].shape, args[1].shape):
            return None
        return big, 1 - big

    def f_macs(self, inputs: Sequence, outputs: list[torch.Tensor]) -> float:
        out = sum(y.numel() for y in outputs)
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        if self.fn is F.scaled_dot_product_attention and len(tensors) >= 3:
            q, k, v = tensors[:3]  # softmax(q·kᵀ)·v: two matrix products over the keys, and the softmax
            return out * k.shape[-2] + q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + 4)
        name = getattr(self.fn, "name", None)
        if (self.fn in _MATMULS or name in ("matmul", "bmm")) and tensors:
            return out * tensors[0].shape[-1]  # inner dimension
        if isinstance(self.fn, nn.MultiheadAttention) and tensors:
            return out * (4 + 2 * tensors[0].shape[0])  # projections and the two products, roughly
        return out  # elementwise product / quotient


# The compensation kinds conversion uses (the values of check's COMPENSATION table).
COMPENSATED_KINDS: dict[str, type[CompensatedOp]] = {
    cls.kind: cls for cls in (CompensatedNorm, CompensatedGate, CompensatedProduct, CompensatedMax, CompensatedElementwise)
}


def compensated_ops(model: nn.Module) -> list[CompensatedOp]:
    """The compensated operations of a converted network, in module order."""
    return [m for m in model.modules() if isinstance(m, CompensatedOp)]


def _flat(value) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _map_floats(value, fn, pair=None, other=None, like=None):
    """Apply ``fn`` to every floating-point tensor of ``value`` (a tensor or a tuple of them);
    with ``pair``, apply ``pair(y, o)`` with the matching element of ``other`` instead. The
    other elements (integer indices of ``max``) pass through; ``like`` gives the tuple type."""
    if isinstance(value, (tuple, list)):
        others = other if other is not None else [None] * len(value)
        items = [_map_floats(v, fn, pair, o) for v, o in zip(value, others)]
        kind = type(like if like is not None else value)
        return kind(items) if kind in (tuple, list) or not hasattr(kind, "_fields") else kind(*items)
    if not (isinstance(value, torch.Tensor) and torch.is_floating_point(value)):
        return value
    return pair(value, other) if pair is not None else fn(value)


def _column(counts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The step numbers as a ``[T, 1, …]`` column broadcastable to ``y`` unfolded to ``[T, B, …]``."""
    return counts.to(y.dtype).reshape(-1, *[1] * y.dim())


def _describe(fn) -> str:
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    return getattr(fn, "__name__", repr(fn))

