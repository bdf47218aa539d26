"""Exact neuron semantics: the IF neuron at T steps equals QCFS with L = T."""

import pytest
import snntorch
import torch
from torch import nn

from qcfs_snntorch import QCFS, IFNeuron, SpikingModel, convert
from qcfs_snntorch.neurons import get_surrogate


def single_layer(theta=2.0):
    act = QCFS(levels=4, threshold=theta)
    return act, convert(nn.Sequential(act))


def test_is_an_snntorch_leaky_without_leak():
    n = IFNeuron(1.5)
    assert isinstance(n, snntorch.Leaky)
    assert n.beta.item() == 1.0 and n.reset_mechanism == "subtract"
    assert n not in snntorch.SpikingNeuron.instances  # no class-level leak


@pytest.mark.parametrize("timesteps", [1, 2, 3, 4, 7, 8, 16, 64])
@pytest.mark.parametrize("theta", [0.5, 2.0, 8.0])
def test_one_layer_equals_qcfs_with_levels_T(timesteps, theta):
    act, snn = single_layer(theta)
    act.levels = timesteps
    x = torch.linspace(-theta, 2 * theta, 3001)
    rate = snn(x, timesteps=timesteps).mean(0)
    torch.testing.assert_close(rate, act(x).detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("timesteps,theta", [(1, 2.0), (2, 2.0), (4, 2.0), (8, 2.0), (3, 3.0), (5, 5.0), (7, 7.0)])
def test_exact_on_rounding_ties(timesteps, theta):
    """Inputs with T·x/θ + 1/2 an integer: the paper's rule v ≥ θ fires, snnTorch's v > θ would not.

    θ and T are chosen so that the tie inputs are exact in floating point; elsewhere a
    "tie" is decided by rounding in both computations alike.
    """
    act, snn = single_layer(theta)
    act.levels = timesteps
    k = torch.arange(0, timesteps + 2, dtype=torch.float32)
    x = (k - 0.5) * theta / timesteps
    rate = snn(x, timesteps=timesteps).mean(0)
    torch.testing.assert_close(rate, act(x).detach(), rtol=0, atol=0)
    assert (rate[1:timesteps + 1] > 0).all()


def test_negative_input_never_fires_and_keeps_potential():
    n = IFNeuron(1.0)
    snn = SpikingModel(nn.Sequential(n))
    out = snn(torch.full((3,), -0.2), timesteps=10)
    assert (out == 0).all()
    torch.testing.assert_close(n.mem, torch.full((3,), 0.5 - 10 * 0.2))


def test_initial_potential_half_threshold_and_subtract_reset():
    n = IFNeuron(1.0)
    snn = SpikingModel(nn.Sequential(n))
    out = snn(torch.tensor([0.5]), timesteps=3)
    # v: 0.5+0.5=1.0 → fire (≥), 0 → 0.5 → 1.0 fire → 0
    assert out.flatten().tolist() == [1.0, 0.0, 1.0]
    assert n.mem.item() == 0.0


def test_spike_is_worth_theta():
    n = IFNeuron(3.0)
    out = SpikingModel(nn.Sequential(n))(torch.tensor([10.0]), timesteps=2)
    assert out.flatten().tolist() == [3.0, 3.0]


def test_per_channel_threshold():
    theta = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    n = IFNeuron(theta)
    snn = SpikingModel(nn.Sequential(n))
    x = torch.rand(2, 3, 4, 4) * 2
    T = 8
    rate = snn(x, timesteps=T).mean(0)
    expected = theta * torch.clamp(torch.floor(T * x / theta + 0.5), 0, T) / T
    torch.testing.assert_close(rate, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("neuron,max_spikes", [("if", 1), ("signed", 2)])
def test_streaming_equals_multistep_and_chunks(neuron, max_spikes):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), QCFS(4, 1.0), nn.Linear(8, 5), QCFS(4, 1.0), nn.Linear(5, 3))
    snn = convert(net, neuron=neuron, max_spikes=max_spikes)
    x = torch.randn(32, 6)
    full = snn(x, timesteps=9)
    snn.reset()
    streamed = torch.stack([snn.step(x) for _ in range(9)])
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-6)
    snn.chunk_size = 4
    torch.testing.assert_close(snn(x, timesteps=9), full, rtol=0, atol=1e-6)


def test_time_varying_input_sequence():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), QCFS(4, 1.0), nn.Linear(6, 2))
    snn = convert(net)
    seq = torch.randn(5, 3, 4)
    out = snn(seq)
    snn.reset()
    streamed = torch.stack([snn.step(seq[t]) for t in range(5)])
    torch.testing.assert_close(out, streamed, rtol=0, atol=1e-6)


def test_state_reset_between_calls():
    act, snn = single_layer(1.0)
    x = torch.rand(16)
    torch.testing.assert_close(snn(x, timesteps=3), snn(x, timesteps=3))


def test_training_path_matches_inference_path():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 7), QCFS(4, 1.0), nn.Linear(7, 3))
    snn = convert(net, learn_threshold=True)
    x = torch.randn(8, 5)
    with torch.no_grad():
        fast = snn(x, timesteps=6)
    slow = snn(x, timesteps=6)
    torch.testing.assert_close(slow.detach(), fast, rtol=0, atol=1e-6)
    slow.mean(0).sum().backward()
    assert snn.net[1].threshold.grad is not None
    # the surrogate carries the gradient through the neuron to the layer before it
    assert snn.net[0].weight.grad is not None and snn.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["triangle", "rectangle", "atan", "sigmoid"])
def test_surrogates_fire_on_ge_and_integrate_to_one(name):
    spike = get_surrogate(name, width=0.5)
    u = (torch.arange(-200_000, 200_001) * 1e-4).requires_grad_()
    out = spike(u)
    assert out[u.detach() == 0].item() == 1.0 and out[u.detach() < 0].sum() == 0
    out.sum().backward()
    area = (u.grad * (u[1] - u[0]).detach()).sum().item()
    assert area == pytest.approx(1.0, abs=0.03)


def test_bad_surrogate_names_valid_ones():
    with pytest.raises(ValueError, match="triangle"):
        get_surrogate("nope")


def test_initial_offset_shifts_v0():
    n = IFNeuron(1.0)
    n.initial_offset = torch.tensor(0.25)
    snn = SpikingModel(nn.Sequential(n))
    # v(0) = 0.75: an input of 0.25 reaches θ at the first step
    assert snn(torch.tensor([0.25]), timesteps=1).item() == 1.0
    assert "initial_offset" in n.state_dict()


@pytest.mark.parametrize("neuron", ["binary", "graded"])
@pytest.mark.parametrize("learned", [-0.5, -1e4, -1e8])
def test_a_threshold_learned_below_zero_computes_as_the_minimum(neuron, learned):
    """θ pushed below zero by fine-tuning acts as MIN_THRESHOLD exactly, in v(0), the spikes and the reset:
    the same outputs and membrane as a neuron built with that θ, finite gradients, and θ can recover."""
    from qcfs_snntorch.neurons import MIN_THRESHOLD, GradedIFNeuron

    make = (lambda theta: IFNeuron(theta, learn_threshold=True)) if neuron == "binary" else (
        lambda theta: GradedIFNeuron(theta, max_spikes=2, learn_threshold=True))
    pushed, reference = make(1.0), make(MIN_THRESHOLD)
    with torch.no_grad():
        pushed.threshold.fill_(learned)
    x = torch.tensor([-2e-4, 0.0, 3e-5, 2e-4, 1.0]).requires_grad_()
    out = SpikingModel(nn.Sequential(pushed))(x, timesteps=4)
    expected = SpikingModel(nn.Sequential(reference))(x.detach(), timesteps=4)
    assert torch.equal(out.detach(), expected), (out, expected)
    torch.testing.assert_close(pushed.mem, reference.mem, rtol=0, atol=0)
    out.sum().backward()
    assert torch.isfinite(pushed.threshold.grad).all() and torch.isfinite(x.grad).all()


def _gradient_norms_of_a_deep_stack(timesteps: list[int], **convert_args) -> tuple[list[float], float]:
    """‖d Σ(mean output) / d input‖ of 8 near-identity Linear + QCFS layers converted, and of their linear part alone."""
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        linear = nn.Linear(32, 32)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(32) + 0.05 * torch.randn(32, 32))
            linear.bias.zero_()
        layers += [linear, QCFS(levels=4, threshold=1.0)]
    model = nn.Sequential(*layers)
    x0 = torch.rand(256, 32) * 0.8 + 0.1
    snn = convert(model, **convert_args).train()
    norms = []
    for t in timesteps:
        x = x0.clone().requires_grad_()
        (grad,) = torch.autograd.grad(snn(x, timesteps=t).mean(0).sum(), x)
        norms.append(grad.norm().item())
    x = x0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(nn.Sequential(*layers[::2])(x).sum(), x)
    return norms, grad.norm().item()


def test_surrogate_gradient_of_a_deep_stack_stays_below_its_linear_slope_at_every_T():
    """With the reset in the graph (the default) the gradient of a deep stack stays near the slope it approximates.

    Detaching the reset (snnTorch's rule) counts each earlier input once per later step, a gain of
    about (T + 1)/2 per layer: over 8 layers at T = 8 the gradient is many times the linear slope,
    which is how ResNet-18 fine-tuned at T = 4 collapsed to chance.
    """
    norms, slope = _gradient_norms_of_a_deep_stack([2, 4, 8, 16])
    assert all(0 < n <= slope for n in norms), (norms, slope)
    detached, _ = _gradient_norms_of_a_deep_stack([8], detach_reset=True)
    assert detached[0] > 5 * slope, (detached, slope)
