"""The base class of every neuron here: an snnTorch ``Leaky`` that runs many steps per call.

The engine folds time into the batch: stateless layers (conv, BN, pooling, add, linear)
see ``[T·B, …]`` once, and each neuron unfolds it to ``[T, B, …]``, integrates over T and
folds its spikes back. The same code serves one step at a time (``T = 1``), so the
streaming API and the multi-step call share one implementation. The membrane carries
over between calls until :meth:`reset_state`, which is what chunked evaluation over many
steps relies on.

A neuron is defined by its firing rule (:mod:`.fused`): how many spikes a membrane
potential emits in one step. To add one, subclass :class:`MultiStepNeuron`, set ``rule``
in ``__init__``, and give it a file of its own (see :mod:`.if_neuron`, :mod:`.graded_if`,
:mod:`.signed_if`). A signed rule's neuron also carries a tracer (its net spike count so
far) as state beside the membrane: ``self.tracer``, None for the other rules.
"""

from __future__ import annotations

import snntorch
import torch
from snntorch._neurons.neurons import SpikingNeuron

from .fused import BinaryRule, FusedMultiStep, run_inference
from .surrogate import SURROGATES, get_surrogate

__all__ = ["MIN_THRESHOLD", "MultiStepNeuron"]

# θ is clamped here in every computation: a θ ≤ 0 (reached by learning, say) would divide by zero or flip signs.
MIN_THRESHOLD = 1e-4


def usable_threshold(threshold: torch.Tensor) -> torch.Tensor:
    """``threshold`` as fp32, clamped to :data:`MIN_THRESHOLD` with a straight-through gradient,
    so a threshold pushed below it can still be pulled back."""
    theta = threshold.to(torch.float32)
    # θ − θ is exactly 0 (its gradient 1), so the value is exactly the clamped one; adding a correction
    # (clamp(θ) − θ) to θ instead rounds to 0 for a large negative θ (−1e4: 1e4 + 1e-4 is 1e4 in fp32).
    return (theta - theta.detach()) + theta.detach().clamp_min(MIN_THRESHOLD)


class MultiStepNeuron(snntorch.Leaky):
    """A ``snntorch.Leaky`` with β = 1 (no leak), subtract reset and a time-folded forward.

    ``threshold`` θ is the value of one spike; it may be a scalar or any tensor
    broadcastable to one step's input (e.g. ``[C, 1, 1]`` for per-channel thresholds of a
    conv layer). The membrane starts at ``v(0) = shift·θ + initial_offset``: ``shift`` is the
    φ of the QCFS activation the neuron replaces (½ in the paper), ``initial_offset`` what
    calibration adds (:mod:`qcfs_snntorch.calibration.potentials`).

    ``detach_reset`` (default False) cuts the reset from the gradient, as snnTorch does. Kept,
    it bounds the gradient of the rate: detached, each earlier input is counted once per later
    step, a gain near (T + 1)/2 per layer that compounds in deep networks.
    """

    rule = BinaryRule()
    fused = True  # False: the per-step autograd graph (reference; slower, more memory)

    def __init__(
        self,
        threshold: float | torch.Tensor = 1.0,
        *,
        shift: float = 0.5,
        learn_threshold: bool = False,
        surrogate: str = "triangle",
        surrogate_width: float = 1.0,
        detach_reset: bool = False,
    ):
        threshold = torch.as_tensor(threshold, dtype=torch.float32).clone()
        if not bool((threshold > 0).all()):
            raise ValueError(f"{type(self).__name__}: the threshold must be > 0 everywhere, got {threshold.min().item():g}")
        if not 0.0 <= shift < 1.0:
            raise ValueError(f"{type(self).__name__}: shift (v(0) in units of θ) must be in [0, 1), got {shift!r}")
        super().__init__(
            beta=1.0,
            threshold=threshold,
            spike_grad=get_surrogate(surrogate, surrogate_width),
            learn_threshold=learn_threshold,
            reset_mechanism="subtract",
            graded_spikes_factor=1.0,
        )
        # snnTorch keeps every neuron ever built in a class-level list (for its
        # init_hidden API, which we do not use): drop ours so converted nets can be freed.
        SpikingNeuron.instances.remove(self)
        self.shift = float(shift)
        self.surrogate, self.surrogate_width = surrogate, float(surrogate_width)
        self.detach_reset = detach_reset
        self.timesteps = 1  # steps folded into dim 0 of the next input; set by SpikingModel
        self.mem = torch.zeros(0)
        self.tracer: torch.Tensor | None = None  # net spikes sent so far (signed rules only), a plain attribute: state, not saved
        self._fresh = True
        # Added to v(0) by calibration; scalar or broadcastable to one step's input (e.g. [C, 1, 1]).
        self.register_buffer("initial_offset", torch.zeros(()))

    @property
    def max_spikes(self) -> int:
        """Most spikes one step can emit (1: binary)."""
        return self.rule.max_spikes

    @property
    def signed(self) -> bool:
        """Whether the neuron also sends negative spikes (that take back earlier ones)."""
        return self.rule.signed

    # Buffers whose shape is set by what is loaded (calibration makes v(0) offsets per layer or per channel).
    resizable_buffers = ("initial_offset",)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.resizable_buffers:
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_state(self) -> None:
        """Forget the membrane; the next input starts from :meth:`initial_potential`."""
        self.mem = torch.zeros(0, device=self.mem.device)
        self.tracer = None
        self._fresh = True

    def reset_mem(self):  # snnTorch's name for the same thing
        self.reset_state()
        return self.mem

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the membranes of the samples ``rows`` (a boolean mask or indices of the batch) only:
        the others have stopped (early exit) and are not computed any more."""
        if not self._fresh:
            self.mem = self.mem[rows]
            if self.tracer is not None:
                self.tracer = self.tracer[rows]

    def initial_potential(self, like: torch.Tensor) -> torch.Tensor:
        v0 = self.shift * usable_threshold(self.threshold) + self.initial_offset
        return v0.expand(like.shape)  # integrate copies it

    def initial_tracer(self, like: torch.Tensor) -> torch.Tensor | None:
        """The tracer at the start (no spike sent yet), or None for a rule without one."""
        return torch.zeros(like.shape, dtype=torch.float32, device=like.device) if self.rule.signed else None

    def integrate(
        self, currents: torch.Tensor, mem: torch.Tensor, tracer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run ``currents`` of shape ``[T, B, …]`` from ``mem`` (and ``tracer``); return (outputs, last mem, last tracer)."""
        theta = usable_threshold(self.threshold)
        if not (torch.is_grad_enabled() and (currents.requires_grad or mem.requires_grad or theta.requires_grad)):
            return run_inference(self.rule, currents, mem, theta, tracer)
        if self.fused:
            derivative = SURROGATES[self.surrogate]
            return FusedMultiStep.apply(currents, mem, theta, self.rule, derivative, self.surrogate_width, self.detach_reset, tracer)
        return self._integrate_autograd(currents, mem, theta, tracer)

    def _integrate_autograd(self, currents, mem, theta, tracer=None):
        outputs = []
        for current in currents:
            mem = mem + current.float()
            spikes = self.rule.reference_count(mem, theta, self.spike_grad, tracer)
            reset = spikes.detach() if self.detach_reset else spikes
            mem = mem - reset * theta
            if tracer is not None:
                tracer = tracer + spikes.detach()
            outputs.append(spikes * theta)
        return torch.stack(outputs).to(currents.dtype), mem, tracer

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        steps = self.timesteps
        if input_.shape[0] % steps:
            raise RuntimeError(
                f"{type(self).__name__}: leading dim {input_.shape[0]} is not a multiple of "
                f"timesteps={steps}; call the network through SpikingModel"
            )
        currents = input_.reshape(steps, input_.shape[0] // steps, *input_.shape[1:])
        step_shape = currents.shape[1:]
        if self._fresh:
            mem, tracer = self.initial_potential(currents[0]), self.initial_tracer(currents[0])
        elif self.mem.shape != step_shape:
            raise ValueError(
                f"{type(self).__name__}: this step's input has shape {tuple(step_shape)} but the membranes hold "
                f"{tuple(self.mem.shape)} from the previous step; call reset() before a new batch"
            )
        else:
            mem, tracer = self.mem, self.tracer
        out, mem, tracer = self.integrate(currents, mem, tracer)
        self.mem, self.tracer, self._fresh = mem, tracer, False
        return out.reshape(input_.shape)

    def extra_repr(self) -> str:
        t = self.threshold
        theta = f"{t.item():.4g}" if t.numel() == 1 else f"shape={tuple(t.shape)}"
        spikes = f", max_spikes={self.max_spikes}" if self.max_spikes > 1 else ""
        spikes += ", signed" if self.signed else ""
        return f"threshold={theta}{spikes}, shift={self.shift}, surrogate={self.surrogate}(width={self.surrogate_width})"
