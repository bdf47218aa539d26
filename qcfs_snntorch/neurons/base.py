"""The base class of every neuron here: an snnTorch ``Leaky`` that runs many steps per call.

The engine folds time into the batch: stateless layers (conv, BN, pooling, add, linear)
see ``[T·B, …]`` once, and each neuron unfolds it to ``[T, B, …]``, integrates over T and
folds its spikes back. The same code serves one step at a time (``T = 1``), so the
streaming API and the multi-step call share one implementation. The membrane carries
over between calls until :meth:`reset_state`, which is what chunked evaluation over many
steps relies on.
"""

from __future__ import annotations

import snntorch
import torch
from snntorch._neurons.neurons import SpikingNeuron

from .surrogate import get_surrogate

__all__ = ["MultiStepNeuron"]


class MultiStepNeuron(snntorch.Leaky):
    """A ``snntorch.Leaky`` with β = 1 (no leak), subtract reset and a time-folded forward.

    Subclasses define :meth:`initial_potential` and :meth:`integrate`.
    ``threshold`` may be a scalar or any tensor broadcastable to one step's input
    (e.g. ``[C, 1, 1]`` for per-channel thresholds of a conv layer).
    """

    def __init__(
        self,
        threshold: float | torch.Tensor = 1.0,
        *,
        learn_threshold: bool = False,
        surrogate: str = "triangle",
        surrogate_width: float = 1.0,
        detach_reset: bool = True,
    ):
        threshold = torch.as_tensor(threshold, dtype=torch.float32).clone()
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
        self.surrogate, self.surrogate_width = surrogate, float(surrogate_width)
        self.detach_reset = detach_reset
        self.timesteps = 1  # steps folded into dim 0 of the next input; set by SpikingModel
        self.mem = torch.zeros(0)
        self._fresh = True
        # Added to v(0); set by conversion-time calibration (qcfs_snntorch.calibrate_snn).
        # Scalar or broadcastable to one step's input (e.g. [C, 1, 1]).
        self.register_buffer("initial_offset", torch.zeros(()))

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
        self._fresh = True

    def reset_mem(self):  # snnTorch's name for the same thing
        self.reset_state()
        return self.mem

    def initial_potential(self, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def integrate(self, currents: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``currents`` of shape ``[T, B, …]`` from ``mem``; return (outputs, last mem)."""
        raise NotImplementedError

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        steps = self.timesteps
        if input_.shape[0] % steps:
            raise RuntimeError(
                f"{type(self).__name__}: leading dim {input_.shape[0]} is not a multiple of "
                f"timesteps={steps}; call the network through SpikingModel"
            )
        currents = input_.reshape(steps, input_.shape[0] // steps, *input_.shape[1:])
        step_shape = currents.shape[1:]
        if self._fresh or self.mem.shape != step_shape:
            mem = self.initial_potential(currents[0])
        else:
            mem = self.mem
        out, mem = self.integrate(currents, mem)
        self.mem, self._fresh = mem, False
        return out.reshape(input_.shape)

    def extra_repr(self) -> str:
        t = self.threshold
        theta = f"{t.item():.4g}" if t.numel() == 1 else f"shape={tuple(t.shape)}"
        return f"threshold={theta}, surrogate={self.surrogate}(width={self.surrogate_width})"
