"""Conversion-time calibration of the SNN's initial membrane potentials (no training).

At low T most of the conversion error of a deep network is a systematic offset: a layer's
rate is, on average, a fraction of a spike above or below what the ANN computes, because
its inputs arrive unevenly in time (Hao et al., "offset spikes", ICLR 2023; Hao et al.,
"residual membrane potential", AAAI 2023). Shifting v(0) cancels it. Two methods, applied
layer by layer in network order so each layer is calibrated on already-calibrated inputs:

- ``"layer"``: one shift per layer, v(0) += T·(ANN mean − SNN mean) over the whole layer,
  which removes the layer's systematic offset to first order (a spike moves a neuron's
  mean output by θ/T);
- ``"channel"``: the same per channel (a finer correction that needs more samples).

(A per-layer grid search of v(0) minimising the layer's squared error was tried and
dropped: at T ≤ 2 it silences layers and cost 40 points on digits.)

Both are for one target T: the shifts are worth a fraction of a spike, so they matter at
the T they were fitted for and fade as T grows.
"""

from __future__ import annotations

import torch
from torch import nn

from .neurons import MultiStepNeuron
from .qcfs import QCFS
from .spiking import SpikingModel

__all__ = ["METHODS", "calibrate_potentials"]

METHODS = ("layer", "channel")


def _layer_outputs(model: nn.Module, layer: nn.Module, run) -> torch.Tensor:
    captured = []
    hook = layer.register_forward_hook(lambda m, args, out: captured.append(out.detach().float()))
    try:
        run()
    finally:
        hook.remove()
    return torch.cat(captured)


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
    (QCFS activations and neurons are paired in module order). Returns, per method, the
    systematic offset (mean absolute per-channel gap) and the mean squared error of every
    layer before and after, for the report.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown calibration method(s) {unknown}; valid: {', '.join(METHODS)}")
    activations = [m for m in ann.modules() if isinstance(m, QCFS)]
    neurons = [m for m in snn.net.modules() if isinstance(m, MultiStepNeuron)]
    if len(activations) != len(neurons):
        raise ValueError(f"{len(activations)} QCFS activations but {len(neurons)} neurons: not a converted pair")
    was_training = ann.training, snn.training
    ann.eval()
    snn.eval()
    steps = timesteps

    def snn_rate(neuron):
        out = _layer_outputs(snn, neuron, lambda: snn(x, timesteps=steps))
        return out.reshape(steps, -1, *out.shape[1:]).mean(0)

    report = {"timesteps": timesteps, "methods": list(methods), "layers": []}
    try:
        targets = [_layer_outputs(ann, act, lambda: ann(x)) for act in activations]
        for index, (neuron, target) in enumerate(zip(neurons, targets)):
            before = _errors(snn_rate(neuron), target)
            for method in methods:
                gap = target - snn_rate(neuron)
                dims = tuple(range(gap.dim())) if method == "layer" else _channel_dims(gap)
                neuron.initial_offset = neuron.initial_offset + steps * gap.mean(dims, keepdim=method == "channel").squeeze(0)
            after = _errors(snn_rate(neuron), target)
            report["layers"].append({"index": index, **{f"{k}_before": v for k, v in before.items()},
                                     **{f"{k}_after": v for k, v in after.items()}})
    finally:
        ann.train(was_training[0])
        snn.train(was_training[1])
    return report
