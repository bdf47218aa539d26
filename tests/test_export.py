"""NIR export: structure of the written file, thresholds, and behaviour against our SNN."""

from __future__ import annotations

import math
from collections import Counter

import nir
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import randomise
from torch import nn

from qcfs_snntorch import QCFS, IFNeuron, SpikingModel, convert, create_model
from qcfs_snntorch.calibration import calibrate_from_data
from qcfs_snntorch.export import ExportError, export_nir, simulate_nir


class SmallResNet(nn.Module):
    """conv-BN-QCFS stem, one residual block (identity or 1×1-conv shortcut), avgpool, linear."""

    def __init__(self, conv_shortcut: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), QCFS(threshold=1.7))
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), QCFS(threshold=0.8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)) if conv_shortcut else nn.Identity()
        self.act2 = QCFS(threshold=1.3)
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        x = self.act2(y + self.shortcut(x))
        return self.fc(self.flatten(self.pool(x)))


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


def test_small_net_file_structure_and_thresholds(small, tmp_path):
    snn, x = small
    path = tmp_path / "small.nir"
    export_nir(snn, path, x)
    graph = nir.read(path)

    types = Counter(type(n).__name__ for n in graph.nodes.values())
    # BN folded away, no Scale needed: the conv branch of the residual absorbs the spike value.
    assert types == Counter(Input=1, Conv2d=3, IF=3, AvgPool2d=1, Flatten=1, Affine=1, Output=1)
    assert _incoming(graph, "act2") == {"conv2", "stem_2"}  # the residual add: two edges into the IF
    assert _incoming(graph, "output") == {"fc"}
    assert graph.nodes["flatten"].start_dim == 0  # NIR shapes have no batch dimension

    neurons = dict(snn.net.named_modules())
    for node in graph.nodes.values():
        if not isinstance(node, nir.IF):
            continue
        theta = neurons[node.metadata["source_module"]].threshold.item()
        assert node.v_threshold.shape == tuple(node.input_type["input"])  # per neuron, full layer shape
        np.testing.assert_allclose(node.v_threshold, theta, rtol=1e-6)
        np.testing.assert_allclose(node.metadata["v_initial"], theta / 2, rtol=1e-6)
        assert node.metadata["reset"] == "subtract" and node.metadata["fire"] == "v >= v_threshold"
        assert np.all(node.v_reset == 0)
        assert node.metadata["spike_value"] == pytest.approx(theta)
    # r carries the scale of the IF's input: the identity summand arrives as stem spikes worth θ_stem.
    np.testing.assert_allclose(graph.nodes["act2"].r, 1.7, rtol=1e-6)
    np.testing.assert_allclose(graph.nodes["act1"].r, 1.0)
    # θ of the stem is folded into the weights of the conv that consumes its spikes (BN folded too).
    folded = snn.net.conv1.weight.detach().numpy() * (snn.net.bn1.weight / torch.sqrt(snn.net.bn1.running_var + snn.net.bn1.eps)).detach().numpy()[:, None, None, None]
    np.testing.assert_allclose(graph.nodes["conv1"].weight, folded * 1.7, rtol=1e-5, atol=1e-6)


def test_exported_graph_reproduces_the_snn(small, tmp_path):
    snn, x = small
    export_nir(snn, tmp_path / "small.nir", x)
    graph = nir.read(tmp_path / "small.nir")
    expected = snn(x, timesteps=8)
    # With the metadata honoured (v(0) = θ/2, v ≥ θ, subtract reset) the NIR graph is our SNN.
    torch.testing.assert_close(simulate_nir(graph, x, 8), expected, atol=1e-5, rtol=1e-5)
    # A consumer that follows NIR's IF alone runs a different network.
    plain = simulate_nir(graph, x, 8, qcfs_semantics=False)
    assert (plain - expected).abs().max() > 0.1


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
    snn, x = resnet
    path = tmp_path / "test_resnet.nir"
    export_nir(snn, path, x)
    graph = nir.read(path)
    types = Counter(type(n).__name__ for n in graph.nodes.values())
    convs = sum(isinstance(m, nn.Conv2d) for m in snn.net.modules())
    assert types["IF"] == len(snn.neurons()) and types["Conv2d"] == convs and types["Affine"] == 1
    assert types["SumPool2d"] == 1 and types["Scale"] == 1  # the padded stem pool (count_include_pad=False)
    sums = {dst for dst, k in Counter(dst for _, dst in graph.edges).items() if k > 1}
    assert sums == {"layer1_0_act2", "layer2_0_act2", "layer3_0_act3", "layer4_0_act2"}  # the four residual adds
    assert _incoming(graph, "layer2_0_act2") == {"layer2_0_conv2", "layer2_0_downsample_1"}
    neurons = dict(snn.net.named_modules())
    for node in graph.nodes.values():
        if isinstance(node, nir.IF):
            np.testing.assert_allclose(node.v_threshold, neurons[node.metadata["source_module"]].threshold.item(), rtol=1e-6)
    torch.testing.assert_close(simulate_nir(graph, x, 4), snn(x, timesteps=4), atol=1e-5, rtol=1e-5)


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
    """snnTorch 1.0.0's import_from_nir (needs nirtorch) on our graphs, as docs/NIR.md records it."""
    pytest.importorskip("nirtorch")
    from snntorch.import_nir import import_from_nir

    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)
    # Identity shortcut: the IF after the add has r = θ_stem ≠ 1, which the importer refuses.
    export_nir(convert(randomise(SmallResNet())), tmp_path / "id.nir", x)
    with pytest.raises(AssertionError, match="r != 1"):
        import_from_nir(nir.read(tmp_path / "id.nir"))
    # Conv shortcut: every r is 1 and the graph loads, but IF becomes Leaky(β = 0.9) returning
    # (spike, membrane) tuples, so the loaded module cannot run.
    snn = convert(randomise(SmallResNet(conv_shortcut=True)))
    export_nir(snn, tmp_path / "conv.nir", x)
    imported = import_from_nir(nir.read(tmp_path / "conv.nir"))
    leaky = imported.get_submodule("act2")
    assert float(leaky.beta) == pytest.approx(0.9)
    assert float(leaky.threshold) == pytest.approx(snn.net.act2.threshold.item())
    with pytest.raises(TypeError):
        imported(x)


def test_per_channel_thresholds_and_padded_pool(tmp_path):
    """Per-channel θ (a Scale after the IF) and a padded average pool (SumPool2d + Scale) stay exact."""
    torch.manual_seed(0)
    theta = torch.tensor([0.3, 0.7, 1.1, 0.5]).view(4, 1, 1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), IFNeuron(theta),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).eval()
    snn, x = SpikingModel(net), torch.rand(2, 3, 8, 8)
    graph = export_nir(snn, tmp_path / "pc.nir", x)
    assert Counter(type(n).__name__ for n in graph.nodes.values())["Scale"] == 2
    (neuron,) = [n for n in graph.nodes.values() if isinstance(n, nir.IF)]
    assert neuron.v_threshold.shape == (4, 8, 8)
    np.testing.assert_allclose(neuron.v_threshold[:, 0, 0], theta.flatten().numpy())
    torch.testing.assert_close(simulate_nir(nir.read(tmp_path / "pc.nir"), x, 6), snn(x, timesteps=6), atol=1e-5, rtol=1e-5)


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
    both sides, leading zero taps) and a Scale holding 1 / torch's divisor per position."""
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
    export_nir(snn, tmp_path / "ceil.nir", x)
    graph = nir.read(tmp_path / "ceil.nir")
    types = Counter(type(n).__name__ for n in graph.nodes.values())
    assert types["Conv2d"] == 3 and types["Scale"] == 1 and types["AvgPool2d"] == types["SumPool2d"] == 0
    (summed,) = [n for n in graph.nodes.values() if isinstance(n, nir.Conv2d) and n.metadata["source_module"] == "4"]
    assert tuple(summed.output_type["output"]) == (4, *ceil)
    assert summed.weight.shape[2] == summed.weight.shape[3]  # square: nir 1.0.8 sizes outputs by the kernel height
    spikes.clear()
    expected = snn(x, timesteps=6)
    rates = torch.cat(spikes).mean((0, 1))  # per position of the map being pooled
    assert 0.05 < rates.mean() < 0.95 and rates[-1].min() > 0 and rates[:, -1].min() > 0  # the last row and column: what the overhanging windows see
    torch.testing.assert_close(simulate_nir(graph, x, 6), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_chans, size", [(1, 8), (3, 32)])
def test_calibrated_test_resnet_round_trips(in_chans, size, tmp_path):
    """The default recipe's network: timm test_resnet, calibrated, on 8×8 digits (where the
    downsample pools of layer3/layer4 are ceil_mode on a 1×1 map) and on 32×32 RGB."""
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=10, in_chans=in_chans)
    calibrate_from_data(model, [torch.randn(32, in_chans, size, size)])
    snn = convert(model)
    export_nir(snn, tmp_path / "resnet.nir", torch.zeros(1, in_chans, size, size))
    graph = nir.read(tmp_path / "resnet.nir")
    as_conv = {n for n in ("layer2_0_downsample_0", "layer3_0_downsample_0", "layer4_0_downsample_0") if isinstance(graph.nodes[n], nir.Conv2d)}
    assert as_conv == ({"layer3_0_downsample_0", "layer4_0_downsample_0"} if size == 8 else set())
    x = torch.randn(4, in_chans, size, size)
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
    export_nir(snn, tmp_path / "g.nir", x)
    graph = nir.read(tmp_path / "g.nir")
    convs = [n for n in graph.nodes.values() if isinstance(n, nir.Conv2d)]
    assert [n.weight.shape for n in convs] == [(6, 3, 3, 3), (6, 6, 3, 3)] and all(int(n.groups) == 1 for n in convs)
    torch.testing.assert_close(simulate_nir(graph, x, 6), snn(x, timesteps=6), atol=1e-5, rtol=1e-5)
    # Stride 1 with kernel sides of different parity: no square kernel keeps the windows and the size.
    odd_even = SpikingModel(nn.Sequential(nn.Conv2d(3, 4, (3, 2)), IFNeuron(0.5)).eval())
    with pytest.raises(ExportError, match="no symmetrically padded NIR Conv2d"):
        export_nir(odd_even, tmp_path / "h.nir", x)
