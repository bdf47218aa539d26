"""SpikingModel: runs a converted network over time steps.

Two ways in:
- multi-step: ``snn(x, timesteps=T)`` feeds a static ``x`` at every step (direct
  encoding), ``snn(x_seq)`` feeds a time-varying ``[T, B, …]`` input (event data); both
  reset the state first and return the per-step outputs ``[T, B, …]``.
- streaming: ``snn.reset()`` then ``snn.step(x_t)`` per step, one output per call.

Internally a call folds time into the batch (see :mod:`qcfs_snntorch.neurons.base`),
``chunk_size`` steps at a time so memory does not grow with T.
"""

from __future__ import annotations

import torch
from torch import nn

from .neurons import MultiStepNeuron

__all__ = ["SpikingModel"]


class SpikingModel(nn.Module):
    """A converted network whose activations are :class:`MultiStepNeuron` modules.

    Args:
        net: the network; its neurons are found by walking ``net.modules()``.
        chunk_size: most steps folded into one forward (``None``: all at once).
    """

    def __init__(self, net: nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.net = net
        self.chunk_size = chunk_size
        if not self.neurons():
            raise ValueError("SpikingModel: the network contains no spiking neuron")

    def neurons(self) -> list[MultiStepNeuron]:
        return [m for m in self.net.modules() if isinstance(m, MultiStepNeuron)]

    def reset(self) -> None:
        """Reset every neuron to its initial potential (start of a new sample)."""
        for neuron in self.neurons():
            neuron.reset_state()

    def _run(self, folded: torch.Tensor, steps: int) -> torch.Tensor:
        for neuron in self.neurons():
            neuron.timesteps = steps
        out = self.net(folded)
        return out.reshape(steps, out.shape[0] // steps, *out.shape[1:])

    def step(self, x_t: torch.Tensor) -> torch.Tensor:
        """Advance one time step with input ``x_t`` ``[B, …]``; state persists between calls."""
        return self._run(x_t, 1)[0]

    def forward(self, x: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        """Per-step outputs ``[T, B, …]``; the prediction after t steps is their mean over the first t."""
        static = timesteps is not None
        total = int(timesteps) if static else x.shape[0]
        if total <= 0:
            raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
        chunk = self.chunk_size or total
        self.reset()
        outputs = []
        for start in range(0, total, chunk):
            steps = min(chunk, total - start)
            if static:
                folded = x.unsqueeze(0).expand(steps, *x.shape).reshape(steps * x.shape[0], *x.shape[1:])
            else:
                folded = x[start : start + steps].reshape(steps * x.shape[1], *x.shape[2:])
            outputs.append(self._run(folded, steps))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @torch.no_grad()
    def cumulative_predictions(self, x: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
        """Class predictions after each T in ``timesteps`` from one run of ``max(timesteps)`` steps.

        Returns ``[len(timesteps), B]`` (argmax of the mean output over the first T steps).
        """
        total = max(timesteps)
        chunk = self.chunk_size or total
        self.reset()
        wanted = sorted(set(timesteps))
        found: dict[int, torch.Tensor] = {}
        running = None
        done = 0
        while done < total:
            steps = min(chunk, total - done)
            folded = x.unsqueeze(0).expand(steps, *x.shape).reshape(steps * x.shape[0], *x.shape[1:])
            partial = self._run(folded, steps).float().cumsum(0)
            if running is not None:
                partial += running
            for t in wanted:
                if done < t <= done + steps:
                    found[t] = partial[t - done - 1].argmax(-1)
            running = partial[-1]
            done += steps
        return torch.stack([found[t] for t in timesteps])
