"""Spike statistics, synaptic operations, an energy estimate and per-layer conversion error.

Everything is returned as plain dicts and lists (JSON-serialisable) so it can go into a
report as is; :func:`qcfs_snntorch.pipeline.tables.render` prints it as ``rich`` tables.

Counting conventions (those of the ANN-SNN conversion literature):
- firing rate: spikes per neuron per step. An IFNeuron outputs spike × θ, so a spike is
  any nonzero output. A signed neuron's events are counted by sign apart too
  (``positive_events``, ``negative_events``): a negative spike costs an event like a positive
  one, and ``spikes`` is the net count Σk.
- synaptic operations of a conv/linear layer, per sample: ``input rate × T × MACs``,
  where MACs is the layer's multiply-accumulates for one step of one sample and the input
  rate is the fraction of its input elements that are nonzero (a spike, or an average of
  spikes after pooling). Layers fed by spikes perform accumulates (AC); a layer fed by the
  analog input (the first conv under direct encoding) performs MACs.
- compensated operations (LayerNorm, softmax, gates, products of two signals, …; see
  :mod:`qcfs_snntorch.compensation`) compute on running means, not on spikes: they are
  counted as the multiply-accumulates they are, per kind, at every step (``f`` and the
  running sums), and once per sample for the ANN (``f`` only).
- energy: 4.6 pJ per MAC and 0.9 pJ per AC (45 nm, Horowitz 2014). An estimate for
  comparing the SNN with the ANN (every layer's MACs once), not a measurement; neuron
  updates and memory traffic are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .compensation import CompensatedOp, StepDifference, compensated_ops
from .neurons import MultiStepNeuron
from .neurons.base import usable_threshold
from .progress import Progress
from .qcfs import QCFS
from .tracing import LeafTracer, eval_mode, forward_hooks, qcfs_layers, spiking_neurons

__all__ = ["PJ_PER_MAC", "PJ_PER_AC", "spike_stats", "conversion_error"]

PJ_PER_MAC = 4.6
PJ_PER_AC = 0.9
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _analog_layers(net: nn.Module) -> set[str] | None:
    """Names of weighted layers whose input does not depend on any neuron, or comes from a compensated op
    (real values, not spikes: multiply-accumulates), None if untraceable."""
    try:
        graph = LeafTracer().trace(net)
    except Exception:
        return None
    modules = dict(net.named_modules())
    spiking: dict[torch.fx.Node, bool] = {}
    compensated: dict[torch.fx.Node, bool] = {}  # carries a compensated op's output: real values, not spikes
    analog = set()
    for node in graph.nodes:
        fed_by_spikes = any(spiking.get(a, False) for a in node.all_input_nodes)
        module = modules.get(node.target) if node.op == "call_module" else None
        neuron = isinstance(module, MultiStepNeuron)
        spiking[node] = fed_by_spikes or neuron
        compensated[node] = not neuron and (isinstance(module, CompensatedOp) or any(compensated.get(a, False) for a in node.all_input_nodes))
        if isinstance(module, _WEIGHTED) and (not fed_by_spikes or any(compensated.get(a, False) for a in node.all_input_nodes)):
            analog.add(node.target)
    return analog


def _count(snn: nn.Module, x: torch.Tensor, timesteps: int):
    """Run ``snn`` on ``x`` with hooks: per neuron [events, spikes, elements, negative events]; per weighted layer
    [nonzero inputs, input elements, MACs per sample]; and the order layers and neurons ran in."""
    net = snn.net
    names = {m: n for n, m in net.named_modules()}
    neuron_counts: dict[str, list[float]] = {}
    layer_counts: dict[str, list[float]] = {}
    compensated_counts: dict[str, list[float]] = {}  # per compensated op: [SNN MACs, f's MACs per step]
    order: list[str | None] = []  # layers in execution order, None for a neuron: the untraceable fallback

    def on_neuron(module, inputs, output):
        order.append(None)
        c = neuron_counts.setdefault(names[module], [0.0, 0.0, 0.0, 0.0])
        c[0] += torch.count_nonzero(output).item()  # a step with k ≠ 0 spikes is one event
        c[1] += (output.float() / usable_threshold(module.threshold)).sum().item()  # k summed: spikes of value θ (net)
        c[2] += output.numel()
        c[3] += torch.count_nonzero(output < 0).item()  # θ > 0: the output has the sign of k

    def on_layer(module, inputs, output):
        name = names[module]
        order.append(name)
        c = layer_counts.setdefault(name, [0.0, 0.0, 0.0])
        c[0] += torch.count_nonzero(inputs[0]).item()
        c[1] += inputs[0].numel()
        # MACs per output element = weight[0].numel() for conv (C_in/groups·kernel) and linear (in_features).
        c[2] = output[0].numel() * module.weight[0].numel()

    def on_compensated(module: CompensatedOp | StepDifference, inputs, output):
        c = compensated_counts.setdefault(names[module], [0.0, 0.0])
        c[0] += module.macs(inputs, output)
        c[1] += module.f_macs(inputs, [y for y in (output if isinstance(output, tuple) else [output])
                                       if torch.is_floating_point(y)]) / module.timesteps

    pairs = [(m, on_neuron) for m in spiking_neurons(net)]
    pairs += [(m, on_compensated) for m in [*compensated_ops(net), *(m for m in net.modules() if isinstance(m, StepDifference))]]
    pairs += [(m, on_layer) for m in net.modules() if isinstance(m, _WEIGHTED)]
    with eval_mode(snn), forward_hooks(pairs):
        snn(x, timesteps=timesteps)
    return neuron_counts, layer_counts, compensated_counts, order


def _compensated_rows(snn, counts: dict, batch: int, pj_per_mac: float) -> list[dict]:
    rows = []
    for name, (macs, f_macs) in counts.items():
        op = snn.net.get_submodule(name)
        rows.append({"name": name, "where": op.where, "kind": op.kind, "op": op.op_name, "macs": macs / batch,
                     "ann_macs": f_macs / batch, "energy_uj": macs / batch * pj_per_mac * 1e-6})
    return rows


def _payload_bits(max_spikes: int, signed: bool = False) -> int:
    """Bits an event carries to say how many spikes it stands for: ⌈log₂⌉ of the values a step can take
    (B + 1: 1 bit for a binary spike; 2B + 1 for a signed neuron, whose spikes carry a sign: 2 bits for a binary one)."""
    values = 2 * max_spikes + 1 if signed else max_spikes + 1
    return max(1, math.ceil(math.log2(values)))


def _neuron_rows(snn, neuron_counts: dict, timesteps: int, batch: int) -> list[dict]:
    rows = []
    for name, (events, spikes, elements, negative) in neuron_counts.items():
        per_sample = elements / (timesteps * batch)
        neuron = snn.net.get_submodule(name)
        bits = _payload_bits(neuron.max_spikes, neuron.signed)
        rows.append({"name": name, "neurons": int(per_sample), "firing_rate": events / elements,
                     "events": events / batch, "positive_events": (events - negative) / batch,
                     "negative_events": negative / batch, "spikes": spikes / batch, "payload_bits": bits * events / batch})
    return rows


def _layer_rows(snn, layer_counts: dict, analog: set, timesteps: int, pj_per_mac: float, pj_per_ac: float) -> list[dict]:
    rows = []
    for name, (nonzero, elements, macs) in layer_counts.items():
        rate = nonzero / elements
        op = "MAC" if name in analog else "AC"
        ops = rate * timesteps * macs
        rows.append({"name": name, "type": type(snn.net.get_submodule(name)).__name__, "macs": int(macs), "input_rate": rate,
                     "op": op, "ops": ops, "energy_uj": ops * (pj_per_mac if op == "MAC" else pj_per_ac) * 1e-6})
    return rows


def _totals(neurons: list[dict], layers: list[dict], compensated: list[dict], timesteps: int, pj_per_mac: float) -> dict:
    total_neurons = sum(n["neurons"] for n in neurons)
    events = sum(n["events"] for n in neurons)
    compensated_macs = sum(c["macs"] for c in compensated)
    snn_energy = sum(lay["energy_uj"] for lay in layers) + sum(c["energy_uj"] for c in compensated)
    ann_macs = sum(lay["macs"] for lay in layers) + sum(c["ann_macs"] for c in compensated)
    by_kind: dict[str, float] = {}
    for c in compensated:
        by_kind[c["kind"]] = by_kind.get(c["kind"], 0.0) + c["macs"]
    ann_energy = ann_macs * pj_per_mac * 1e-6
    return {
        "neurons": total_neurons,
        "events": events,
        "positive_events": sum(n["positive_events"] for n in neurons),
        "negative_events": sum(n["negative_events"] for n in neurons),
        "spikes": sum(n["spikes"] for n in neurons),
        "payload_bits": sum(n["payload_bits"] for n in neurons),
        "firing_rate": events / (total_neurons * timesteps) if total_neurons else 0.0,
        "snn_macs": sum(lay["ops"] for lay in layers if lay["op"] == "MAC") + compensated_macs,
        "compensated_macs": compensated_macs,
        "compensated_macs_by_kind": by_kind,
        "snn_acs": sum(lay["ops"] for lay in layers if lay["op"] == "AC"),
        "snn_energy_uj": snn_energy,
        "ann_macs": ann_macs,
        "ann_energy_uj": ann_energy,
        "energy_ratio": snn_energy / ann_energy if ann_energy else None,
    }


def spike_stats(
    snn: nn.Module,
    x: torch.Tensor,
    timesteps: int,
    *,
    pj_per_mac: float = PJ_PER_MAC,
    pj_per_ac: float = PJ_PER_AC,
) -> dict:
    """Spike events, synaptic operations and an energy estimate of ``snn`` on batch ``x`` over ``timesteps``.

    A neuron sends at most one event per step; a graded neuron's event carries a payload
    (k spikes of value θ, k ≤ B, in ⌈log₂(B+1)⌉ bits); a signed neuron's events are +θ or −θ
    (graded: ±kθ, in ⌈log₂(2B+1)⌉ bits), each one event and, downstream, one accumulate per synapse. Returns a dict (numbers per sample,
    for the whole run of T steps unless named a rate)::

        {"timesteps": T, "batch_size": B,
         "neurons": [{"name", "neurons", "firing_rate", "events", "positive_events", "negative_events", "spikes",
                      "payload_bits"}],
                    # firing_rate: events/neuron/step; spikes: Σk, net of negative spikes (= events for binary IF)
         "layers":  [{"name", "type", "macs", "input_rate", "op", "ops", "energy_uj"}],
                    # macs: one step, one sample; op: "MAC" | "AC"; ops = input_rate·T·macs
         "compensated": [{"name", "where", "kind", "op", "macs", "ann_macs", "energy_uj"}],
                    # macs: all T steps (f and running sums); ann_macs: f once
         "totals":  {"neurons", "events", "positive_events", "negative_events", "spikes", "payload_bits", "firing_rate",
                     "snn_macs", "compensated_macs", "compensated_macs_by_kind", "snn_acs",
                     "snn_energy_uj", "ann_macs", "ann_energy_uj", "energy_ratio"},
         "energy_model": {"pj_per_mac", "pj_per_ac", "note"}}
    """
    analog = _analog_layers(snn.net)
    neuron_counts, layer_counts, compensated_counts, order = _count(snn, x, timesteps)
    if analog is None:  # no trace: a layer that ran before any neuron can only see the input
        analog = set(order[: order.index(None)] if None in order else order)
    neurons = _neuron_rows(snn, neuron_counts, timesteps, x.shape[0])
    layers = _layer_rows(snn, layer_counts, analog, timesteps, pj_per_mac, pj_per_ac)
    compensated = _compensated_rows(snn, compensated_counts, x.shape[0], pj_per_mac)
    return {
        "timesteps": int(timesteps),
        "batch_size": int(x.shape[0]),
        "neurons": neurons,
        "layers": layers,
        "compensated": compensated,
        "totals": _totals(neurons, layers, compensated, timesteps, pj_per_mac),
        "energy_model": {
            "pj_per_mac": pj_per_mac,
            "pj_per_ac": pj_per_ac,
            "note": "estimate (45 nm figures, Horowitz 2014): synaptic operations only, per sample over all steps; "
            "an event of a graded neuron counts as one accumulate per synapse (its payload scales the weight, as on "
            "hardware that carries spike payloads), and its payload bits are reported apart",
        },
    }


def conversion_error(ann: nn.Module, snn: nn.Module, x: torch.Tensor, timesteps: Iterable[int]) -> dict:
    """Per-layer error between the ANN's QCFS outputs and the SNN's rate × θ, for each T.

    Layer k of the SNN (its k-th neuron in module order) is compared with the ANN's k-th
    QCFS: ``mae`` = mean |a_ANN − mean over T steps of the SNN output|, ``relative`` = mae
    / mean(a_ANN). The SNN at T steps approximates QCFS with L = T, so some error remains
    even where T equals the trained L in deep networks (arrival order of spikes); the
    layer where ``relative`` jumps is the one losing accuracy at low T.

    Returns::

        {"timesteps": [T...], "batch_size": B,
         "layers": [{"name", "neurons", "ann_mean", "mae": [per T], "relative": [per T]}],
         "output": {"mae": [per T], "relative": [per T], "agreement": [per T]}}
                    # output: logits vs the SNN's mean output; agreement: same argmax
    """
    timesteps = [int(t) for t in timesteps]
    acts = qcfs_layers(ann)
    names = {m: n for n, m in snn.net.named_modules()}
    neurons = spiking_neurons(snn.net)
    if len(acts) != len(neurons):
        # One QCFS called at several places became one neuron per call (its copies live apart, in
        # ``call_sites``): pair by path, and leave out those whose ANN output is not one tensor.
        # A QCFS on parameters alone (a relative-position MLP) stays a QCFS in the SNN: not paired.
        by_path = dict(ann.named_modules())
        pairs = [(by_path.get(names[n]), n) for n in neurons]
        pairs = [(a, n) for a, n in pairs if isinstance(a, QCFS)]
        kept_as_qcfs = {by_path[name] for name, m in snn.net.named_modules() if isinstance(m, QCFS) and name in by_path}
        if {a for a, _ in pairs} | kept_as_qcfs != set(acts) or not pairs:
            raise ValueError(f"conversion_error: the ANN has {len(acts)} QCFS activations but the SNN has {len(neurons)} neurons")
        acts, neurons = [a for a, _ in pairs], [n for _, n in pairs]
    batch = x.shape[0]
    ann_out: dict[nn.Module, torch.Tensor] = {}
    calls: dict[nn.Module, int] = {}

    def record(mod, inputs, out):
        ann_out[mod], calls[mod] = out.float(), calls.get(mod, 0) + 1

    with eval_mode(ann), forward_hooks((m, record) for m in acts):
        logits = ann(x).float()
    kept = [(a, n) for a, n in zip(acts, neurons) if calls.get(a) == 1]
    acts, neurons = [a for a, _ in kept], [n for _, n in kept]

    layers = [
        {"name": names[n], "neurons": int(ann_out[a][0].numel()), "ann_mean": ann_out[a].mean().item(), "mae": [], "relative": []}
        for a, n in zip(acts, neurons)
    ]
    output = {"mae": [], "relative": [], "agreement": []}
    sums: dict[nn.Module, torch.Tensor] = {}  # per neuron: its output summed over the steps

    def accumulate(module, inputs, out):
        # Time is folded into dim 0: [steps·B, …] → sum over this call's steps (chunks add up).
        step_sum = out.float().reshape(module.timesteps, batch, *out.shape[1:]).sum(0)
        sums[module] = sums[module] + step_sum if module in sums else step_sum

    with Progress("conversion error per layer", sum(timesteps), unit="steps") as progress:  # a run costs its T
        for t in timesteps:
            sums.clear()
            with eval_mode(snn), forward_hooks((n, accumulate) for n in neurons):
                snn_logits = snn(x, timesteps=t).float().mean(0)
            for row, a, n in zip(layers, acts, neurons):
                mae = (ann_out[a] - sums[n] / t).abs().mean().item()
                row["mae"].append(mae)
                row["relative"].append(mae / row["ann_mean"] if row["ann_mean"] > 0 else None)
            mae = (logits - snn_logits).abs().mean().item()
            scale = logits.abs().mean().item()
            output["mae"].append(mae)
            output["relative"].append(mae / scale if scale > 0 else None)
            output["agreement"].append((logits.argmax(-1) == snn_logits.argmax(-1)).float().mean().item())
            progress.advance(t)
    return {"timesteps": timesteps, "batch_size": int(batch), "layers": layers, "output": output}
