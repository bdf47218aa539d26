"""The fast engine against the slow definitions it replaces.

- outputs: multi-step (time folded, static head computed once, chunks) == ``snn.step`` per step, exactly;
- gradients: the fused IF autograd node == the per-step autograd graph (float tolerance);
- memory: the fused node saves only the pre-spike membrane.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import fused_and_stepwise_gradients, randomise
from torch import nn

from qcfs_snntorch import QCFS, IFNeuron, SpikingModel, convert, create_model
from qcfs_snntorch.neurons import SURROGATES


class ResidualNet(nn.Module):
    """Stem conv-BN-QCFS, a residual block, and a branch from the stem conv that bypasses every neuron."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.act0 = QCFS(threshold=1.1)
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), QCFS(threshold=0.7)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), QCFS(threshold=0.9)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)
        self.bypass = nn.Linear(8, 5)

    def forward(self, x):
        s = self.stem(x)
        h = self.act0(s)
        h = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(h))))) + h)
        return self.fc(self.pool(h).flatten(1)) + self.bypass(self.pool(s).flatten(1))


def _residual():
    torch.manual_seed(0)
    return randomise(ResidualNet(), thresholds=(0.4, 1.0)), torch.rand(3, 3, 8, 8)


def _timm():
    torch.manual_seed(0)
    return randomise(create_model("test_resnet", num_classes=10), thresholds=(0.4, 1.0)), torch.rand(2, 3, 32, 32)


NETS = {"residual": _residual, "test_resnet": _timm}


def _stepwise(snn: SpikingModel, x: torch.Tensor, steps: int) -> torch.Tensor:
    snn.reset()
    return torch.stack([snn.step(x) for _ in range(steps)])


def _set_fused(snn: SpikingModel, fused: bool) -> None:
    for n in snn.neurons():
        n.fused = fused


# Convolutions may round differently at batch T·B than at batch B (oneDNN picks kernels by
# shape: seen with AVX-512, not with AVX2), so the float outputs of the layers after the last
# neuron can differ in the last bit. The spikes themselves must not differ at all.
ROUNDING = dict(rtol=1e-5, atol=1e-6)


def _with_spikes(snn: SpikingModel, run):
    """``run()``'s result and every neuron's output over time, ``[T·B, …]`` step-major, whatever the chunking."""
    trains = {n: [] for n in snn.neurons()}
    hooks = [n.register_forward_hook(lambda m, args, out: trains[m].append(out.detach())) for n in trains]
    try:
        out = run()
    finally:
        for hook in hooks:
            hook.remove()
    return out, [torch.cat(t) for t in trains.values()]


def _assert_same(got, reference):
    (out, spikes), (ref_out, ref_spikes) = got, reference
    for index, (s, r) in enumerate(zip(spikes, ref_spikes)):
        torch.testing.assert_close(s, r, rtol=0, atol=0, msg=f"neuron {index}")
    torch.testing.assert_close(out, ref_out, **ROUNDING)


@pytest.mark.parametrize("name", list(NETS))
def test_multistep_paths_equal_stepwise_exactly(name):
    model, x = NETS[name]()
    snn = convert(model)
    steps = 6
    with torch.no_grad():
        reference = _with_spikes(snn, lambda: _stepwise(snn, x, steps))
        assert snn._split() is not None  # the static head is in use
        _assert_same(_with_spikes(snn, lambda: snn(x, timesteps=steps)), reference)
        snn.static_head = False
        _assert_same(_with_spikes(snn, lambda: snn(x, timesteps=steps)), reference)
        snn.static_head, snn.chunk_size = True, 4  # 4 + 2 steps
        _assert_same(_with_spikes(snn, lambda: snn(x, timesteps=steps)), reference)
        seq = x.unsqueeze(0).expand(steps, *x.shape)  # the same input as a sequence: no static head
        _assert_same(_with_spikes(snn, lambda: snn(seq)), reference)
    # With gradients on (fused autograd node) the forward values are the same too.
    _assert_same(_with_spikes(snn, lambda: snn(x, timesteps=steps).detach()), reference)


def test_static_head_runs_once_on_the_batch():
    model, x = _residual()
    snn = convert(model, chunk_size=3)
    seen = []
    snn.net.stem[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        snn(x, timesteps=8)  # three chunks
    assert seen == [x.shape[0]]


def test_static_head_reaches_into_a_vit_whose_forward_has_default_arguments():
    # Compensation gives a ViT's forward `attn_mask=None, is_causal=False`: constants, not inputs.
    torch.manual_seed(0)
    model = randomise(create_model("test_vit", num_classes=10, activations=("gelu",)), thresholds=(0.4, 1.0))
    snn = convert(model.eval())
    x = torch.rand(2, 3, 32, 32)
    seen = {}
    for path in ("patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"):
        module = snn.net.get_submodule(path)
        module.register_forward_hook(lambda m, i, o, path=path: seen.setdefault(path, []).append(i[0].shape[0]))
    with torch.no_grad():
        fast = _with_spikes(snn, lambda: snn(x, timesteps=5))
        # once on the batch up to the first neuron (blocks.0.mlp.act), then folded over the 5 steps
        assert seen == {"patch_embed.proj": [2], "blocks.0.attn.qkv": [2], "blocks.0.mlp.fc1": [2], "blocks.0.mlp.fc2": [10]}
        snn.static_head = False
        _assert_same(fast, _with_spikes(snn, lambda: snn(x, timesteps=5)))


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_large_T_equals_unchunked(chunk):
    model, x = _timm()
    snn = convert(model)
    with torch.no_grad():
        full = snn(x, timesteps=64)
        snn.chunk_size = chunk
        chunked = snn(x, timesteps=64)
        preds = snn.cumulative_predictions(x, [1, 5, 64, 16])
    torch.testing.assert_close(chunked, full, **ROUNDING)
    mean = full.cumsum(0) / torch.arange(1, 65).reshape(-1, 1, 1)
    assert torch.equal(preds, mean[[0, 4, 63, 15]].argmax(-1))


class ReadsBatchSize(nn.Module):
    """The head's only output towards the neurons is an int (x.shape[0]): must fall back."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(1, 2, 3), IFNeuron(0.5), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        batch = x.shape[0]
        return self.fc(self.act(self.conv(x)).reshape(batch, -1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(4, 4), IFNeuron(0.5)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this
            x = x * 2
        return self.act(self.lin(x))


@pytest.mark.parametrize("cls,shape", [(ReadsBatchSize, (2, 1, 6, 6)), (DataDependent, (3, 4))])
def test_falls_back_where_the_head_cannot_be_split(cls, shape):
    torch.manual_seed(0)
    snn = SpikingModel(cls().eval())
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(snn(x, timesteps=5), _stepwise(snn, x, 5), rtol=0, atol=0)
    assert snn._split() is None or not snn._split().usable


def test_batchnorm_training_in_head_runs_folded():
    model, x = _residual()
    snn = convert(model.train())
    assert snn._split() is None  # batch statistics over T·B, as without the static head
    snn.eval()
    assert snn._split() is not None


def _grads(snn: SpikingModel, x: torch.Tensor, steps: int, stepwise: bool):
    snn.zero_grad()
    out = _stepwise(snn, x, steps) if stepwise else snn(x, timesteps=steps)
    (out.mean(0) * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in snn.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("detach_reset", [True, False])
def test_fused_training_gradients_equal_autograd_loop(name, detach_reset):
    model, x = NETS[name]()
    snn = convert(model, learn_threshold=True, surrogate="triangle", surrogate_width=1.0)
    snn.train()
    for m in snn.modules():  # frozen BN, as fine-tuning does by default
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    for n in snn.neurons():
        n.detach_reset = detach_reset
    _set_fused(snn, False)
    snn.static_head = False
    ref_out, ref = _grads(snn, x, 4, stepwise=True)
    _set_fused(snn, True)
    snn.static_head = True
    out, fast = _grads(snn, x, 4, stepwise=False)
    torch.testing.assert_close(out, ref_out, **ROUNDING)
    assert ref.keys() == fast.keys() and any(k.endswith("threshold") for k in ref)
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("surrogate", list(SURROGATES))
@pytest.mark.parametrize("detach_reset", [True, False])
def test_fused_neuron_gradients_per_channel_theta_across_chunks(surrogate, detach_reset):
    torch.manual_seed(3)
    theta = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    x = (torch.randn(7, 2, 3, 4, 4) * 0.8).requires_grad_()
    grads = fused_and_stepwise_gradients(
        lambda: IFNeuron(theta, learn_threshold=True, surrogate=surrogate, surrogate_width=0.7, detach_reset=detach_reset),
        x, [3, 4])
    for ref, fast in zip(grads[False], grads[True]):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_fused_node_saves_only_the_membrane():
    n = IFNeuron(1.0, learn_threshold=True)
    x = torch.randn(8 * 4, 16, requires_grad=True)
    n.timesteps = 8
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        n(x)
    assert sorted(saved) == [1, x.numel()]  # θ and v: [T, B, …] fp32, nothing per step



class WithConv3d(nn.Module):
    """A 2-D conv network with a Conv3d inside (timm's lambda layers have one): 5-D weights."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), QCFS(4, 1.0)
        self.conv3d = nn.Conv3d(1, 1, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = self.conv3d(x.unsqueeze(1)).squeeze(1)
        return self.head(x.mean((2, 3)))


def test_channels_last_leaves_five_dimensional_weights_alone():
    """`.to(memory_format=channels_last)` raises on a 5-D weight; conversion changes only the 4-D ones."""
    ann = WithConv3d().eval()
    snn = convert(ann, max_spikes=4)  # memory_format="auto": channels-last for a 2-D conv network
    assert snn.net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert snn.net.conv3d.weight.dim() == 5 and snn.net.conv3d.weight.is_contiguous()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(snn(x, timesteps=1)[0], ann(x))
