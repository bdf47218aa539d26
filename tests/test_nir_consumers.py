"""The exported NIR file in a consumer that is not ours: nirtorch's current loader (``nir_to_torch``).

The node map is what any consumer can write from the file alone: NIR's IF with the rules its
metadata states (v(0) = ``v_initial``, firing on ``v >= v_threshold``, subtract reset), and
nirtorch's default maps for the rest except two it gets wrong (tested below). The graph is
built by nirtorch in the order the file lists its nodes, which is topological.
"""

from __future__ import annotations

import nir
import nirtorch
import numpy as np
import pytest
import torch
from _helpers import SmallResNet, randomise
from torch import nn

from qcfs_snntorch import convert, create_model
from qcfs_snntorch.calibration import calibrate_from_data
from qcfs_snntorch.export import export_nir


class SubtractIF(nn.Module):
    def __init__(self, node: nir.IF):
        super().__init__()
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self.r, self.threshold = as_tensor(node.r), as_tensor(node.v_threshold)
        self.start = as_tensor(node.metadata["v_initial"])

    def forward(self, x, state=None):
        v = (self.start.expand_as(x) if state is None else state) + self.r * x
        spikes = (v >= self.threshold).float()
        return spikes, v - spikes * self.threshold


def _affine(node: nir.Affine) -> nn.Linear:
    linear = nn.Linear(node.weight.shape[1], node.weight.shape[0])
    linear.weight.data, linear.bias.data = torch.as_tensor(node.weight), torch.as_tensor(node.bias)
    return linear


def _flatten(node: nir.Flatten) -> nn.Flatten:
    # NIR's dims exclude the batch: one counted from the start moves past it, one from the end stays.
    shift = lambda d: int(d) + 1 if int(d) >= 0 else int(d)  # noqa: E731
    return nn.Flatten(shift(node.start_dim), shift(node.end_dim))


NODE_MAP = {nir.IF: SubtractIF, nir.Affine: _affine, nir.Flatten: _flatten}


def _run(module, x: torch.Tensor, steps: int) -> torch.Tensor:
    outputs, state = [], None
    with torch.no_grad():
        for _ in range(steps):
            out, state = module(x, state)
            outputs.append(out)
    return torch.stack(outputs)


def _small():
    torch.manual_seed(0)
    return convert(randomise(SmallResNet())), torch.rand(16, 3, 8, 8)


def _quickstart_network():
    """timm's test_resnet on 8×8 one-channel digits, as the quickstart recipe builds it (untrained, calibrated)."""
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=10, in_chans=1)
    calibrate_from_data(model, [torch.randn(32, 1, 8, 8)])
    return convert(model), torch.randn(16, 1, 8, 8)


@pytest.mark.parametrize("build", [_small, _quickstart_network])
def test_nir_to_torch_with_a_plain_map_runs_our_snn(build, tmp_path):
    snn, x = build()
    path = tmp_path / "snn.nir"
    export_nir(snn, path, x[:1])
    graph = nir.read(path)
    assert graph.metadata["portable"].startswith("yes")
    assert list(graph.nodes)[0] == "input"
    module = nirtorch.nir_to_torch(graph, NODE_MAP)
    steps = 16
    with torch.no_grad():
        ours = snn(x, timesteps=steps)
    theirs = _run(module, x, steps)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    for t in (4, 8, 16):  # the same prediction for every sample, so the same accuracy
        assert torch.equal(theirs[:t].mean(0).argmax(-1), ours[:t].mean(0).argmax(-1))


def test_nirtorch_default_maps_the_plain_map_replaces():
    """Why NODE_MAP has Affine and Flatten entries (docs/NIR.md): nirtorch 2.6's defaults lose the
    Affine bias and read NIR's Flatten dims (which exclude the batch) as torch's."""
    bias = np.array([1.0, 2.0], np.float32)
    linear = nirtorch.nir_to_torch(nir.Affine(weight=np.eye(2, dtype=np.float32), bias=bias), {})
    assert not torch.equal(linear.bias.detach(), torch.as_tensor(bias))
    flatten = nirtorch.nir_to_torch(nir.Flatten(input_type={"input": np.array([2, 3])}, start_dim=0, end_dim=-1), {})
    assert flatten(torch.zeros(4, 2, 3)).shape == (24,)


@pytest.mark.parametrize("build", [_small, _quickstart_network])
def test_flatten_dims_mean_the_same_batched_in_consumers_that_pass_them_to_torch(build, tmp_path):
    """norse, snnTorch and nirtorch's default map hand NIR's Flatten dims straight to
    torch.nn.Flatten. Written from the end (start_dim=-3, end_dim=-1 for [C, H, W]) they flatten
    the right dims of a batch: the whole file with nirtorch's own Flatten map is our SNN on a
    batch of 16, and snnTorch's import_from_nir runs the file's Flatten and classifier batched."""
    from snntorch.import_nir import import_from_nir

    snn, x = build()
    path = tmp_path / "snn.nir"
    export_nir(snn, path, x[:1])
    graph = nir.read(path)
    flatten = next(node for node in graph.nodes.values() if isinstance(node, nir.Flatten))
    assert int(flatten.start_dim) < 0 and int(flatten.end_dim) < 0

    default_flatten = {key: value for key, value in NODE_MAP.items() if key is not nir.Flatten}
    steps = 8
    with torch.no_grad():
        ours = snn(x, timesteps=steps)
    torch.testing.assert_close(_run(nirtorch.nir_to_torch(graph, default_flatten), x, steps), ours, atol=1e-5, rtol=1e-5)

    # snnTorch maps IF to a leaky neuron returning tuples (docs/NIR.md), so only the tail after the
    # last neuron goes through its importer: Flatten and the classifier, as the file has them.
    name = next(name for name, node in graph.nodes.items() if node is flatten)
    (classifier,) = [dst for src, dst in graph.edges if src == name]
    tail = nir.NIRGraph.from_list(flatten, graph.nodes[classifier])
    features = torch.rand(len(x), *(int(n) for n in flatten.input_type["input"]))
    with torch.no_grad():
        out = import_from_nir(tail)(features)
    out = out[0] if isinstance(out, tuple) else out
    expected = features.flatten(1) @ torch.as_tensor(graph.nodes[classifier].weight).T + torch.as_tensor(graph.nodes[classifier].bias)
    torch.testing.assert_close(out, expected)
