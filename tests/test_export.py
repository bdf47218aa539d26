"""NIR export: structure of the written file, thresholds, and behaviour against our SNN."""

from __future__ import annotations

import math
from collections import Counter

import nir
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import SmallResNet, randomise
from torch import nn

from qcfs_snntorch import QCFS, IFNeuron, SpikingModel, convert, create_model
from qcfs_snntorch.calibration import calibrate_from_data
from qcfs_snntorch.export import ExportError, NotPortableError, export_nir, simulate_nir
from qcfs_snntorch.export import nir as nir_export

PORTABLE = {"Input", "Output", "Conv2d", "Affine", "IF", "Flatten"}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    snn = convert(randomise(SmallResNet()))
    return snn, torch.rand(3, 3, 8, 8)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = randomise(create_model("test_resnet", num_classes=10))
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, QCFS):
            m.threshold.data = torch.empty(()).uniform_(0.4, 1.0, generator=gen)
    return convert(model), torch.rand(2, 3, 32, 32)


def _incoming(graph: nir.NIRGraph, name: str) -> set[str]:
    return {src for src, dst in graph.edges if dst == name}


def _types(graph: nir.NIRGraph) -> Counter:
    return Counter(type(n).__name__ for n in graph.nodes.values())


def _round_trip(snn, x, path, steps=6, **options) -> nir.NIRGraph:
    """Export, read back, and check that simulate_nir with our rules is the SNN."""
    export_nir(snn, path, x, **options)
    graph = nir.read(path)
    with torch.no_grad():
        expected = snn(x, timesteps=steps)
    torch.testing.assert_close(simulate_nir(graph, x, steps), expected, atol=1e-5, rtol=1e-5)
    return graph


def test_small_net_file_structure_and_thresholds(small, tmp_path):
    snn, x = small
    graph = _round_trip(snn, x, tmp_path / "small.nir", portable=False)
    # BN folded away, no Scale needed: the conv branch of the residual absorbs the spike value.
    assert _types(graph) == Counter(Input=1, Conv2d=3, IF=3, AvgPool2d=1, Flatten=1, Affine=1, Output=1)
    assert _incoming(graph, "act2") == {"conv2", "stem_2"}  # the residual add: two edges into the IF
    assert _incoming(graph, "output") == {"fc"}
    # NIR shapes have no batch dimension; dims counted from the end mean the same with one (batched torch).
    flatten = graph.nodes["flatten"]
    assert (flatten.start_dim, flatten.end_dim) == (-len(flatten.input_type["input"]), -1)
    assert graph.metadata["portable"] == "no: asked for with portable=False"

    neurons = dict(snn.net.named_modules())
    for node in graph.nodes.values():
        if not isinstance(node, nir.IF):
            continue
        theta = neurons[node.metadata["source_module"]].threshold.item()
        s = node.metadata.get("membrane_scale", 1.0)  # the membrane is written in units of the input's scale
        assert node.v_threshold.shape == tuple(node.input_type["input"])  # per neuron, full layer shape
        np.testing.assert_array_equal(node.r, 1.0)
        np.testing.assert_allclose(node.v_threshold * s, theta, rtol=1e-6)
        np.testing.assert_allclose(node.metadata["v_initial"] * s, theta / 2, rtol=1e-6)
        assert node.metadata["reset"] == "subtract" and node.metadata["fire"] == "v >= v_threshold"
        assert np.all(node.v_reset == 0)
        assert node.metadata["spike_value"] == pytest.approx(theta)
    # The identity summand arrives as stem spikes worth θ_stem = 1.7: act2's membrane is in those units.
    assert graph.nodes["act2"].metadata["membrane_scale"] == pytest.approx(1.7)
    assert "membrane_scale" not in graph.nodes["act1"].metadata
    # θ of the stem is folded into the weights of the conv that consumes its spikes (BN folded too).
    folded = snn.net.conv1.weight.detach().numpy() * (snn.net.bn1.weight / torch.sqrt(snn.net.bn1.running_var + snn.net.bn1.eps)).detach().numpy()[:, None, None, None]
    np.testing.assert_allclose(graph.nodes["conv1"].weight, folded * 1.7, rtol=1e-5, atol=1e-6)


def test_portable_form_is_the_default_and_what_nir_1_0_4_reads(small, tmp_path):
    """Only the node types every consumer maps; no IF v_reset and metadata only on IF/Affine/Flatten (nir 1.0.4
    refuses the rest: sinabs pins it); nodes stored in topological order (nirtorch 2.0.2 needs it)."""
    import h5py

    snn, x = small
    path = tmp_path / "portable.nir"
    graph = _round_trip(snn, x, path)
    assert graph.metadata["portable"].startswith("yes")
    assert _types(graph) == Counter(Input=1, Conv2d=4, IF=3, Flatten=1, Affine=1, Output=1)  # the pool is a Conv2d
    pool = graph.nodes["pool"]
    assert pool.weight.shape == (8, 8, 2, 2) and tuple(pool.stride) == (2, 2)
    np.testing.assert_allclose(pool.weight[0, 0], snn.net.act2.threshold.item() / 4, rtol=1e-6)  # θ / window size
    assert np.count_nonzero(pool.weight[0, 1:]) == 0  # each channel's window on the diagonal only
    with h5py.File(path) as f:
        groups = f["node/nodes"]
        assert list(groups)[0] == "input" and list(groups)[-1] == "output"
        for group in groups.values():
            kind = group["type"][()].decode()
            assert kind in PORTABLE
            assert "v_reset" not in group
            assert ("metadata" in group) == (kind in ("IF", "Affine", "Flatten"))
    with pytest.raises(ValueError, match="threshold_factor"):
        export_nir(snn, tmp_path / "bad.nir", x, threshold_factor=1.5)


def test_r_is_one_and_simulation_unchanged_bit_for_bit(small, tmp_path):
    """Writing the membrane in units of the IF's input scale (r = 1) is the same neuron: simulate_nir gives
    bit for bit what it gives for the same graph with r = that scale and the source thresholds and v(0)."""
    snn, x = small
    neurons = dict(snn.net.named_modules())
    for portable in (True, False):
        graph = export_nir(snn, tmp_path / f"r{portable}.nir", x, portable=portable)
        assert all(np.all(n.r == 1) for n in graph.nodes.values() if isinstance(n, nir.IF))
        with_r = {}
        for name, node in graph.nodes.items():
            if isinstance(node, nir.IF):
                neuron = neurons[node.metadata["source_module"]]
                shape = node.v_threshold.shape
                v0 = neuron.initial_potential(torch.zeros(1, *shape))[0].numpy()
                node = nir.IF(r=np.full(shape, node.metadata.get("membrane_scale", 1.0), np.float32),
                              v_threshold=np.full(shape, neuron.threshold.item(), np.float32), v_reset=node.v_reset,
                              metadata={**node.metadata, "v_initial": v0})
            with_r[name] = node
        rescaled = nir.NIRGraph(nodes=with_r, edges=graph.edges)
        assert torch.equal(simulate_nir(graph, x, 16), simulate_nir(rescaled, x, 16))


def test_exported_graph_reproduces_the_snn(small, tmp_path):
    snn, x = small
    with torch.enable_grad():
        snn(x, timesteps=2)  # a membrane left with autograd history: the export copies the network all the same
    for portable in (True, False):
        # With the metadata honoured (v(0) = θ/2, v ≥ θ, subtract reset) the NIR graph is our SNN.
        graph = _round_trip(snn, x, tmp_path / "small.nir", steps=8, portable=portable)
        # A consumer that follows NIR's IF alone runs a different network.
        plain = simulate_nir(graph, x, 8, qcfs_semantics=False)
        assert (plain - snn(x, timesteps=8)).abs().max() > 0.1


def test_if_node_semantics_documented_relationship():
    """One IF layer fed a constant x: the closed forms docs/NIR.md gives for both semantics."""
    theta, steps = 1.0, 16
    xs = torch.tensor([[0.05, 0.13, 0.3, 0.51, 0.77, 0.9, 1.2, -0.4]])
    n = xs.shape[1]
    graph = nir.NIRGraph.from_list(
        nir.Affine(weight=np.eye(n, dtype=np.float32), bias=np.zeros(n, np.float32)),
        nir.IF(r=np.ones(n, np.float32), v_threshold=np.full(n, theta, np.float32), v_reset=np.zeros(n, np.float32),
               metadata={"reset": "subtract", "fire": "v >= v_threshold", "v_initial": np.full(n, theta / 2, np.float32)}),
    )
    ours = simulate_nir(graph, xs, steps).sum(0)[0]
    plain = simulate_nir(graph, xs, steps, qcfs_semantics=False).sum(0)[0]
    for x, a, b in zip(xs[0].tolist(), ours.tolist(), plain.tolist()):
        assert a == min(max(math.floor(steps * x / theta + 0.5), 0), steps)  # QCFS with L = T
        assert b == (steps // (math.floor(theta / x) + 1) if x > 0 else 0)  # v(0)=0, v > θ, reset to 0
        assert b <= a


def test_timm_test_resnet(resnet, tmp_path):
    """At 32×32 the stem pool (count_include_pad=False) written dense is over the limit: the default writes
    the metadata form and says why; portable=True refuses, naming the pool."""
    snn, x = resnet
    path = tmp_path / "test_resnet.nir"
    graph = _round_trip(snn, x, path, steps=4)
    assert graph.metadata["portable"].startswith("no: 'maxpool' does not fit the portable form")
    types = _types(graph)
    convs = sum(isinstance(m, nn.Conv2d) for m in snn.net.modules())
    assert types["IF"] == len(snn.neurons()) and types["Conv2d"] == convs and types["Affine"] == 1
    assert types["SumPool2d"] == 1 and types["Scale"] == 1  # the padded stem pool (count_include_pad=False)
    sums = {dst for dst, k in Counter(dst for _, dst in graph.edges).items() if k > 1}
    assert sums == {"layer1_0_act2", "layer2_0_act2", "layer3_0_act3", "layer4_0_act2"}  # the four residual adds
    assert _incoming(graph, "layer2_0_act2") == {"layer2_0_conv2", "layer2_0_downsample_1"}
    neurons = dict(snn.net.named_modules())
    for node in graph.nodes.values():
        if isinstance(node, nir.IF):
            s = node.metadata.get("membrane_scale", 1.0)
            np.testing.assert_allclose(node.v_threshold * s, neurons[node.metadata["source_module"]].threshold.item(), rtol=1e-6)
    with pytest.raises(NotPortableError, match=r"'maxpool'.*different counts.*DENSE_LIMIT.*portable=False") as info:
        export_nir(snn, tmp_path / "refused.nir", x, portable=True)
    assert "\n" not in str(info.value) and not (tmp_path / "refused.nir").exists()


class _MaxPoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act, self.pool = nn.Conv2d(3, 4, 3), QCFS(), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.act(self.conv(x)))


class _CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act = nn.Conv2d(3, 4, 1), QCFS()

    def forward(self, x):
        y = self.act(self.a(x))
        return torch.cat([y, y], dim=1)


def test_refuses_what_nir_cannot_express(tmp_path):
    """Every refusal is an ExportError (a ValueError) with a one-line message and no file written."""
    assert issubclass(ExportError, ValueError)
    x = torch.rand(1, 3, 8, 8)
    maxpool_snn = _MaxPoolNet().eval()
    maxpool_snn.act = convert(nn.Sequential(QCFS())).net[0]
    cases = [
        (maxpool_snn, x, "'pool'.*MaxPool2d"),
        (convert(_CatNet().eval()), x, "cat"),
        (_CatNet().eval(), x, "'act'.*QCFS"),
        (convert(_CatNet().eval()), torch.rand(1, 5, 8, 8), r"sample input of shape \(1, 5, 8, 8\)"),  # wrong channels
    ]
    for i, (net, sample, pattern) in enumerate(cases):
        with pytest.raises(ExportError, match=pattern) as info:
            export_nir(net, tmp_path / f"{i}.nir", sample)
        assert str(info.value).startswith("export_nir: ") and "\n" not in str(info.value)
        assert not (tmp_path / f"{i}.nir").exists()


def test_snntorch_importer_documented_behaviour(tmp_path):
    """snnTorch 1.0.0's import_from_nir (needs nirtorch) on the portable file, as docs/NIR.md records it:
    r = 1 passes its check, the graph loads, but IF becomes Leaky(β = 0.9) returning (spike, membrane)
    tuples that the next layer cannot take."""
    from snntorch.import_nir import import_from_nir  # nirtorch is a dev dependency: no skip that cannot trigger

    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)
    snn = convert(randomise(SmallResNet()))  # identity shortcut: the IF after the add used to have r = θ_stem
    export_nir(snn, tmp_path / "id.nir", x)
    imported = import_from_nir(nir.read(tmp_path / "id.nir"))
    leaky = imported.get_submodule("act2")
    assert float(leaky.beta) == pytest.approx(0.9)
    assert float(leaky.threshold) == pytest.approx(snn.net.act2.threshold.item() / 1.7)
    with pytest.raises(TypeError):
        imported(x)


def test_per_channel_thresholds_and_padded_pool(tmp_path):
    """Per-channel θ (folded into the weights that read the spikes) and a padded average pool with
    count_include_pad=False stay exact: SumPool2d + Scale, or (portable) one dense layer from the pool on."""
    torch.manual_seed(0)
    theta = torch.tensor([0.3, 0.7, 1.1, 0.5]).view(4, 1, 1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), IFNeuron(theta),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).eval()
    snn, x = SpikingModel(net), torch.rand(2, 3, 8, 8)
    graph = _round_trip(snn, x, tmp_path / "pc.nir", portable=False)
    assert _types(graph)["Scale"] == 1  # the divisor per window; θ per channel needs no node
    (neuron,) = [n for n in graph.nodes.values() if isinstance(n, nir.IF)]
    assert neuron.v_threshold.shape == (4, 8, 8)
    np.testing.assert_allclose(neuron.v_threshold[:, 0, 0], theta.flatten().numpy())
    graph = _round_trip(snn, x, tmp_path / "pc_portable.nir", portable=True)
    assert set(_types(graph)) <= PORTABLE
    dense = graph.nodes["_2"]  # the pool, reading the whole 4×8×8 map: 4·4·4 outputs as [64, 1, 1]
    assert tuple(dense.output_type["output"]) == (64, 1, 1) and dense.weight.shape[:2] == (64, 4)


def test_refuses_timm_same_padding_pool(tmp_path):
    """timm's AvgPool2dSame (a leaf subclass of AvgPool2d) pads dynamically: refused, not mis-exported."""
    from timm.layers.pool2d_same import AvgPool2dSame

    net = nn.Sequential(nn.Conv2d(3, 4, 3), QCFS(), AvgPool2dSame(3, 2))
    with pytest.raises(ExportError, match="AvgPool2dSame"):
        export_nir(convert(net.eval()), tmp_path / "same.nir", torch.rand(1, 3, 9, 9))


@pytest.mark.parametrize(
    "size, pool",
    [
        ((5, 5), nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)),  # timm's avg_down at an odd size
        ((7, 6), nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=True)),  # overhang in W only
        ((6, 7), nn.AvgPool2d((3, 2), stride=(2, 3), padding=(1, 0), ceil_mode=True, count_include_pad=False)),
        ((6, 6), nn.AvgPool2d(3, stride=2, ceil_mode=True, divisor_override=4)),
    ],
)
def test_ceil_mode_average_pooling(size, pool, tmp_path):
    """ceil_mode's extra bottom/right window: a Conv2d summing each window (padding + overhang on
    both sides, leading zero taps) and a Scale holding 1 / torch's divisor per position; portable:
    the same Conv2d divided by the one divisor, or (divisors differing) one dense layer."""
    floor = F.avg_pool2d(torch.zeros(1, 1, *size), pool.kernel_size, pool.stride, pool.padding).shape[-2:]
    ceil = pool(torch.zeros(1, 1, *size)).shape[-2:]
    assert ceil != floor  # the case export_nir used to refuse
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), IFNeuron(0.6),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), IFNeuron(0.4),  # depthwise: written dense, so nir.read types it
        pool, nn.Flatten(), nn.Linear(4 * ceil.numel(), 3),
    ).eval()
    with torch.no_grad():  # default init leaves the second IF silent, which would test nothing
        net[0].weight.uniform_(-0.05, 0.15)
        net[2].weight.uniform_(0.0, 0.3)
    spikes = []
    net[3].register_forward_hook(lambda module, args, out: spikes.append(out.detach()))
    snn, x = SpikingModel(net), torch.rand(2, 3, *size)
    graph = _round_trip(snn, x, tmp_path / "ceil.nir", portable=False)
    types = _types(graph)
    assert types["Conv2d"] == 3 and types["Scale"] == 1 and types["AvgPool2d"] == types["SumPool2d"] == 0
    (summed,) = [n for n in graph.nodes.values() if isinstance(n, nir.Conv2d) and n.metadata["source_module"] == "4"]
    assert tuple(summed.output_type["output"]) == (4, *ceil)
    assert summed.weight.shape[2] == summed.weight.shape[3]  # square: nir 1.0.8 sizes outputs by the kernel height
    spikes.clear()
    snn(x, timesteps=6)
    rates = torch.cat(spikes).mean((0, 1))  # per position of the map being pooled
    assert 0.05 < rates.mean() < 0.95 and rates[-1].min() > 0 and rates[:, -1].min() > 0  # the last row and column: what the overhanging windows see
    graph = _round_trip(snn, x, tmp_path / "ceil_portable.nir", portable=True)
    assert set(_types(graph)) <= PORTABLE


@pytest.mark.parametrize("in_chans, size", [(1, 8), (3, 32)])
def test_calibrated_test_resnet_round_trips(in_chans, size, tmp_path):
    """The default recipe's network: timm test_resnet, calibrated, on 8×8 digits (where the
    downsample pools of layer3/layer4 are ceil_mode on a 1×1 map, and the portable form is exact)
    and on 32×32 RGB."""
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=10, in_chans=in_chans)
    calibrate_from_data(model, [torch.randn(32, in_chans, size, size)])
    snn = convert(model)
    x = torch.randn(4, in_chans, size, size)
    graph = _round_trip(snn, x, tmp_path / "resnet.nir", portable=False)
    as_conv = {n for n in ("layer2_0_downsample_0", "layer3_0_downsample_0", "layer4_0_downsample_0") if isinstance(graph.nodes[n], nir.Conv2d)}
    assert as_conv == ({"layer3_0_downsample_0", "layer4_0_downsample_0"} if size == 8 else set())
    graph = _round_trip(snn, x, tmp_path / "default.nir")
    assert graph.metadata["portable"].startswith("yes" if size == 8 else "no")
    for steps in range(4, 9):
        expected = snn(x, timesteps=steps)
        assert expected.std() > 0
        torch.testing.assert_close(simulate_nir(graph, x, steps), expected, atol=1e-5, rtol=1e-5)


def test_grouped_and_non_square_convs_read_back(tmp_path):
    """nir 1.0.8 types a Conv2d by weight.shape[1] (ignoring groups) and by the kernel height alone:
    grouped weights are written block-diagonal and non-square kernels square, so nir.read accepts them."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, (1, 3), stride=(2, 1), padding=(0, 1)), IFNeuron(0.5),
        nn.Conv2d(6, 6, (3, 1), padding=(1, 0), groups=3), IFNeuron(0.3),
        nn.Flatten(), nn.Linear(6 * 4 * 7, 3),
    ).eval()
    snn, x = SpikingModel(net), torch.rand(2, 3, 8, 7)
    graph = _round_trip(snn, x, tmp_path / "g.nir")
    assert graph.metadata["portable"].startswith("yes")
    convs = [n for n in graph.nodes.values() if isinstance(n, nir.Conv2d)]
    assert [n.weight.shape for n in convs] == [(6, 3, 3, 3), (6, 6, 3, 3)] and all(int(n.groups) == 1 for n in convs)
    # Stride 1 with kernel sides of different parity: no square kernel keeps the windows and the size.
    odd_even = SpikingModel(nn.Sequential(nn.Conv2d(3, 4, (3, 2)), IFNeuron(0.5)).eval())
    with pytest.raises(ExportError, match="no symmetrically padded NIR Conv2d"):
        export_nir(odd_even, tmp_path / "h.nir", x)


class _GradedIF(IFNeuron):
    """Stands in for a graded neuron (up to B spikes per step): the exporter looks at ``max_spikes``."""

    max_spikes = 2


def test_graded_neurons_are_refused_portably_and_carried_in_metadata(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), _GradedIF(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    snn, x = SpikingModel(net), torch.rand(1, 3, 8, 8)
    with pytest.raises(NotPortableError, match=r"'1' is a graded neuron.*snn\.max_spikes = 2.*one binary spike per step") as info:
        export_nir(snn, tmp_path / "graded.nir", x, portable=True)
    assert "\n" not in str(info.value) and not (tmp_path / "graded.nir").exists()
    graph = export_nir(snn, tmp_path / "graded.nir", x)  # the default falls back to the metadata form and says why
    assert graph.metadata["portable"].startswith("no: '1' is a graded neuron")
    (node,) = [n for n in graph.nodes.values() if isinstance(n, nir.IF)]
    assert node.metadata["max_spikes"] == 2 and node.metadata["spike_unit"] == pytest.approx(0.5)
    # The package's graded neuron, in the metadata form: simulate_nir runs it as the SNN does.
    from qcfs_snntorch.neurons import GradedIFNeuron

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), GradedIFNeuron(0.3, max_spikes=3), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    with torch.no_grad():
        net[0].weight.uniform_(-0.1, 0.4)  # bursts of several spikes per step
    graph = _round_trip(SpikingModel(net), torch.rand(2, 3, 8, 8), tmp_path / "graded_if.nir", portable=False)
    assert [n.metadata["max_spikes"] for n in graph.nodes.values() if isinstance(n, nir.IF)] == [3]


def test_simulate_nir_graded_node_closed_form():
    """A graded IF node (metadata max_spikes = B) fed a constant x for T steps: QCFS with L = B·T."""
    theta, steps, b = 1.0, 8, 3
    xs = torch.tensor([[0.05, 0.3, 0.77, 1.2, 2.4, 3.5, -0.4]])
    n = xs.shape[1]
    graph = nir.NIRGraph.from_list(
        nir.Affine(weight=np.eye(n, dtype=np.float32), bias=np.zeros(n, np.float32)),
        nir.IF(r=np.ones(n, np.float32), v_threshold=np.full(n, theta, np.float32), v_reset=np.zeros(n, np.float32),
               metadata={"reset": "subtract", "fire": "v >= v_threshold", "v_initial": np.full(n, theta / 2, np.float32),
                         "max_spikes": b, "spike_unit": theta}),
    )
    counts = simulate_nir(graph, xs, steps).sum(0)[0]
    for x, k in zip(xs[0].tolist(), counts.tolist()):
        assert k == min(max(math.floor(steps * x / theta + 0.5), 0), b * steps)


def test_dense_limit_and_conv1d_fall_back_with_a_reason(tmp_path, monkeypatch):
    snn = SpikingModel(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), IFNeuron(0.5), nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval())
    x = torch.rand(1, 3, 8, 8)
    monkeypatch.setattr(nir_export, "DENSE_LIMIT", 1000)  # the pool needs 64 × 256 weights written dense
    with pytest.raises(NotPortableError, match=r"'2' does not fit the portable form.*64×256 weights, over DENSE_LIMIT = 1000"):
        export_nir(snn, tmp_path / "p.nir", x, portable=True)
    assert _types(export_nir(snn, tmp_path / "p.nir", x))["SumPool2d"] == 1
    conv1d = SpikingModel(nn.Sequential(nn.Conv1d(2, 3, 3), IFNeuron(0.5), nn.Flatten(), nn.Linear(3 * 6, 2)).eval())
    graph = export_nir(conv1d, tmp_path / "c.nir", torch.rand(1, 2, 8))
    assert graph.metadata["portable"].startswith("no: '0' is a Conv1d, which norse and snnTorch do not map")


def test_threshold_factor_for_reset_to_zero_consumers(small, tmp_path):
    """Thresholds written × c for consumers that reset to zero; our rules divide c back out."""
    snn, x = small
    plain = export_nir(snn, tmp_path / "a.nir", x)
    scaled = _round_trip(snn, x, tmp_path / "b.nir", threshold_factor=0.6)
    for name, node in scaled.nodes.items():
        if isinstance(node, nir.IF):
            np.testing.assert_allclose(node.v_threshold, plain.nodes[name].v_threshold * 0.6, rtol=1e-6)
            assert node.metadata["threshold_factor"] == 0.6


def test_v_initial_is_the_calibrated_potential(tmp_path):
    """The file's v_initial is the neuron's v(0): θ/2 plus its calibrated offset, per channel."""
    torch.manual_seed(0)
    snn = convert(randomise(SmallResNet()))
    offset = torch.linspace(-0.2, 0.3, 8).view(8, 1, 1)
    snn.net.act1.initial_offset = offset.clone()
    x = torch.rand(2, 3, 8, 8)
    graph = _round_trip(snn, x, tmp_path / "calibrated.nir", steps=4)
    expected = (snn.net.act1.threshold.item() / 2 + offset).expand(8, 8, 8).numpy()
    np.testing.assert_allclose(graph.nodes["act1"].metadata["v_initial"], expected, rtol=1e-6)
