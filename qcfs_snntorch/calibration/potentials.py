"""The converted SNN's initial membrane potentials, calibrated against the ANN (no training).

At low T most of the conversion error of a deep network is a systematic offset: a layer's
rate is, on average, a fraction of a spike above or below what the ANN computes, because
its inputs arrive unevenly in time (Hao et al., "offset spikes", ICLR 2023; Hao et al.,
"residual membrane potential", AAAI 2023). Shifting v(0) cancels it. Two methods, applied
layer by layer in network order so each layer is calibrated on already-calibrated inputs:

- ``"layer"``: one shift per layer, v(0) += T·(ANN mean − SNN mean) over the whole layer,
  which removes the layer's systematic offset to first order (a unit of potential moves a
  neuron's total output over T steps by about one unit, its mean by 1/T);
- ``"channel"``: the same per channel (a finer correction that needs more samples).

(A per-layer grid search of v(0) minimising the layer's squared error was tried and
dropped: at T ≤ 2 it silences layers and cost 40 points on digits.)

Both are for one target T: the shifts are worth a fraction of a spike, so they matter at
the T they were fitted for and fade as T grows. Each layer costs one SNN run per method,
stopped as soon as that layer's output is in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..progress import Progress
from ..spiking import SpikingModel
from ..tracing import eval_mode, forward_hooks, qcfs_layers, spiking_neurons

__all__ = ["METHODS", "calibrate_potentials"]

METHODS = ("layer", "channel")


class _Captured(Exception):
    """Raised by the capture hook once every wanted output is in: the rest of the network is not needed."""


def _capture(layers: list[nn.Module], rows: int, run) -> list[torch.Tensor]:
    """The outputs of ``layers`` during ``run()`` (``rows`` rows each, over however many
    calls a chunked run makes), stopping the run as soon as all are complete."""
    captured: dict[nn.Module, list[torch.Tensor]] = {layer: [] for layer in layers}

    def hook(module, args, out):
        captured[module].append(out.detach().float())
        if all(sum(len(c) for c in chunks) >= rows for chunks in captured.values()):
            raise _Captured

    with forward_hooks((layer, hook) for layer in layers):
        try:
            run()
        except _Captured:
            pass
    return [torch.cat(captured[layer]) for layer in layers]


def _channel_dims(x: torch.Tensor) -> tuple[int, ...]:
    # [N, C, ...]: average over samples and every dim after the channel one.
    return (0, *range(2, x.dim()))


def _errors(rate: torch.Tensor, target: torch.Tensor) -> dict:
    """The layer's systematic offset (mean |per-channel mean gap|, what calibration removes) and its MSE."""
    gap = (target - rate).mean(_channel_dims(target))
    return {"offset": gap.abs().mean().item(), "mse": ((rate - target) ** 2).mean().item()}


@torch.no_grad()
def calibrate_potentials(
    ann: nn.Module,
    snn: SpikingModel,
    x: torch.Tensor,
    timesteps: int,
    methods: list[str] | tuple[str, ...] = ("channel",),
) -> dict:
    """Fit each neuron's ``initial_offset`` so the SNN at ``timesteps`` matches the ANN on ``x``.

    ``ann`` and ``snn`` must be the network before and after :func:`qcfs_snntorch.convert`
    (QCFS activations and neurons are paired in module order). ``x`` should be a
    representative sample (every class; see :func:`qcfs_snntorch.data.sample_batch`).
    Returns, per layer, the systematic offset (mean absolute per-channel gap) and the mean
    squared error before and after, for the report.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown calibration method(s) {unknown}; valid: {', '.join(METHODS)}")
    activations, neurons = qcfs_layers(ann), spiking_neurons(snn.net)
    if len(activations) != len(neurons):
        raise ValueError(f"{len(activations)} QCFS activations but {len(neurons)} neurons: not a converted pair")
    steps, batch = int(timesteps), x.shape[0]

    def snn_rates(*layers) -> list[torch.Tensor]:
        outs = _capture(list(layers), steps * batch, lambda: snn(x, timesteps=steps))
        return [out.reshape(steps, batch, *out.shape[1:]).mean(0) for out in outs]

    report = {"timesteps": steps, "methods": list(methods), "layers": []}
    progress = Progress(f"calibrate v(0) for T={steps}", len(neurons), unit="layers")
    with eval_mode(ann, snn), progress:
        targets = _capture(activations, batch, lambda: ann(x))
        previous = None  # the layer calibrated last: its "after" is read in the next layer's run
        for index, (neuron, target) in enumerate(zip(neurons, targets)):
            if previous is None:
                (rate,) = snn_rates(neuron)
            else:
                prev_rate, rate = snn_rates(neurons[index - 1], neuron)
                previous.update({f"{k}_after": v for k, v in _errors(prev_rate, targets[index - 1]).items()})
            previous = {"index": index, **{f"{k}_before": v for k, v in _errors(rate, target).items()}}
            report["layers"].append(previous)
            for i, method in enumerate(methods):
                if i:
                    (rate,) = snn_rates(neuron)
                gap = target - rate
                dims = tuple(range(gap.dim())) if method == "layer" else _channel_dims(gap)
                neuron.initial_offset = neuron.initial_offset + steps * gap.mean(dims, keepdim=method == "channel").squeeze(0)
            progress.advance()
        if previous is not None:
            (rate,) = snn_rates(neurons[-1])
            previous.update({f"{k}_after": v for k, v in _errors(rate, targets[-1]).items()})
    return report
