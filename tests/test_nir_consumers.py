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
    return nn.Flatten(int(node.start_dim) + 1, int(node.end_dim) + 1 if int(node.end_dim) >= 0 else -1)


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
