"""Spike statistics, synaptic operations, energy estimate, conversion error, rich tables."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from qcfs_snntorch import QCFS, convert
from qcfs_snntorch.pipeline.tables import render
from qcfs_snntorch.stats import PJ_PER_AC, PJ_PER_MAC, conversion_error, spike_stats


def _net(threshold: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        QCFS(levels=4, threshold=threshold),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        QCFS(levels=4, threshold=threshold),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    ).eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(5, 3, 8, 8)


def test_spike_stats_counts(x):
    snn = convert(_net(threshold=0.5))
    stats = spike_stats(snn, x, timesteps=4)
    json.dumps(stats)  # plain data for report.json

    layers = {lay["name"]: lay for lay in stats["layers"]}
    neurons = {n["name"]: n for n in stats["neurons"]}
    assert list(layers) == ["0", "2", "6"] and list(neurons) == ["1", "3"]
    assert [layers[k]["op"] for k in layers] == ["MAC", "AC", "AC"]  # only the first sees analog pixels
    assert layers["0"]["macs"] == 4 * 8 * 8 * 3 * 9
    assert layers["2"]["macs"] == 6 * 8 * 8 * 2 * 9  # groups=2: 2 input channels per output
    assert layers["6"]["macs"] == 3 * 96
    assert neurons["1"]["neurons"] == 4 * 8 * 8 and neurons["3"]["neurons"] == 6 * 8 * 8

    # The firing rate, computed independently from the SNN's outputs.
    out = {}
    hook = snn.net[1].register_forward_hook(lambda m, i, o: out.__setitem__("spikes", o))
    snn(x, timesteps=4)
    hook.remove()
    rate = (out["spikes"] != 0).float().mean().item()
    assert neurons["1"]["firing_rate"] == pytest.approx(rate)
    assert 0 < rate < 1
    assert layers["2"]["input_rate"] == pytest.approx(rate)  # fed directly by neuron layer "1"
    assert layers["0"]["input_rate"] == pytest.approx((x != 0).float().mean().item())
    assert layers["6"]["input_rate"] >= neurons["3"]["firing_rate"]  # avg-pooled spikes: nonzero if any spike

    for lay in stats["layers"]:
        assert lay["ops"] == pytest.approx(lay["input_rate"] * 4 * lay["macs"])
        pj = PJ_PER_MAC if lay["op"] == "MAC" else PJ_PER_AC
        assert lay["energy_uj"] == pytest.approx(lay["ops"] * pj * 1e-6)
    tot = stats["totals"]
    assert tot["ann_macs"] == sum(lay["macs"] for lay in stats["layers"])
    assert tot["ann_energy_uj"] == pytest.approx(tot["ann_macs"] * PJ_PER_MAC * 1e-6)
    assert tot["snn_energy_uj"] == pytest.approx(tot["snn_macs"] * PJ_PER_MAC * 1e-6 + tot["snn_acs"] * PJ_PER_AC * 1e-6)
    assert tot["spikes"] == pytest.approx(sum(n["neurons"] * n["firing_rate"] * 4 for n in stats["neurons"]))
    assert "estimate" in stats["energy_model"]["note"]


def test_silent_network_costs_only_its_first_layer(x):
    stats = spike_stats(convert(_net(threshold=1e6)), x, timesteps=3)
    assert all(n["firing_rate"] == 0 for n in stats["neurons"])
    tot = stats["totals"]
    first = stats["layers"][0]["macs"]
    assert tot["snn_acs"] == 0 and tot["snn_macs"] == pytest.approx(3 * first)
    assert tot["energy_ratio"] == pytest.approx(3 * first / tot["ann_macs"])


class _TwoPaths(nn.Module):
    """A conv on the input that runs after a neuron: still fed analog pixels."""

    def __init__(self):
        super().__init__()
        self.a, self.act_a = nn.Conv2d(3, 4, 1), QCFS(threshold=0.5)
        self.b = nn.Conv2d(3, 4, 1)
        self.c, self.act_c = nn.Conv2d(4, 4, 1), QCFS(threshold=0.5)

    def forward(self, x):
        a = self.act_a(self.a(x))
        return self.act_c(self.c(a) + self.b(x))


def test_analog_inputs_found_by_tracing(x):
    stats = spike_stats(convert(_TwoPaths().eval()), x, timesteps=2)
    assert {lay["name"]: lay["op"] for lay in stats["layers"]} == {"a": "MAC", "b": "MAC", "c": "AC"}


def test_conversion_error_zero_where_the_snn_is_exact(x):
    # One neuron layer fed a constant current: at T = L the IF layer is QCFS exactly.
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), QCFS(levels=4, threshold=0.6), nn.Flatten(), nn.Linear(256, 3)).eval()
    errors = conversion_error(ann, convert(ann), x, [2, 4])
    json.dumps(errors)
    (row,) = errors["layers"]
    assert row["name"] == "1" and row["neurons"] == 256 and row["ann_mean"] > 0
    assert row["mae"][1] == pytest.approx(0.0, abs=1e-6)  # T = 4 = L
    assert row["relative"][0] > 0.01  # T = 2 is QCFS with L = 2: a coarser quantization
    assert errors["output"]["mae"][1] == pytest.approx(0.0, abs=1e-5)
    assert errors["output"]["agreement"][1] == 1.0


def test_conversion_error_per_layer_and_mismatch(x):
    ann = _net(threshold=0.5)
    errors = conversion_error(ann, convert(ann), x, [1, 2, 8])
    assert [row["name"] for row in errors["layers"]] == ["1", "3"]
    assert all(len(row["relative"]) == 3 for row in errors["layers"])
    assert errors["timesteps"] == [1, 2, 8] and len(errors["output"]["agreement"]) == 3
    with pytest.raises(ValueError, match="2 QCFS activations but the SNN has 1"):
        conversion_error(ann, convert(nn.Sequential(nn.Conv2d(3, 3, 1), QCFS()).eval()), x, [1])


def test_render_rich_tables(x):
    from rich.console import Console

    ann = _net(threshold=0.5)
    snn = convert(ann)
    console = Console(file=io.StringIO(), width=160, record=True)
    render(spike_stats(snn, x, 2), conversion_error(ann, snn, x, [1, 2]), console=console)
    text = console.export_text()
    for expected in ("Firing rates", "Synaptic operations", "pJ/MAC", "energy_ratio", "Conversion error", "T=2", "argmax agreement"):
        assert expected in text


def test_chunked_evaluation_gives_the_same_numbers(x):
    """With chunk_size the hooks see several calls per run; counts must add up the same."""
    ann = _net(threshold=0.5)
    whole, chunked = convert(ann), convert(ann, chunk_size=2)
    a, b = spike_stats(whole, x, 5), spike_stats(chunked, x, 5)
    assert [n["firing_rate"] for n in a["neurons"]] == pytest.approx([n["firing_rate"] for n in b["neurons"]])
    assert a["totals"]["snn_energy_uj"] == pytest.approx(b["totals"]["snn_energy_uj"])
    ea, eb = conversion_error(ann, whole, x, [3, 5]), conversion_error(ann, chunked, x, [3, 5])
    for ra, rb in zip(ea["layers"], eb["layers"]):
        assert ra["mae"] == pytest.approx(rb["mae"], abs=1e-6)
