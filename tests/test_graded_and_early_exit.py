"""Graded spikes (up to B per step) and per-sample early exit.

Exactness where it is exact: one graded layer at T steps is QCFS with L = B·T (ties
included), and with B = L the whole network at T = 1 is the QCFS network bit for bit.
Gradients: the fused BPTT node equals autograd through the per-step reference. Early
exit: hand-made running means stop the right samples at the right step, the engine's
running early exit equals that computation, and a sample that ran to T_max keeps the
full run's prediction.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import fused_and_stepwise_gradients, randomise
from torch import nn

import qcfs_snntorch as qs
from qcfs_snntorch import QCFS, GradedIFNeuron, SpikingModel, convert, create_model
from qcfs_snntorch.early_exit import exit_scores, exit_steps
from qcfs_snntorch.neurons import SURROGATES
from qcfs_snntorch.stats import spike_stats


def graded_layer(theta: float, spikes: int, timesteps: int):
    act = QCFS(levels=spikes * timesteps, threshold=theta)
    return act, convert(nn.Sequential(act), max_spikes=spikes)


@pytest.mark.parametrize("spikes", [2, 3, 4])
@pytest.mark.parametrize("timesteps", [1, 2, 3, 5])
@pytest.mark.parametrize("theta", [0.5, 2.0, 8.0])
def test_one_graded_layer_equals_qcfs_with_levels_B_times_T(spikes, timesteps, theta):
    act, snn = graded_layer(theta, spikes, timesteps)
    x = torch.linspace(-theta, 2 * theta, 3001)
    # Within float rounding of a tie (T·x/θ_s + ½ an integer) the two computations may round apart;
    # exact ties are tested on their own below, with inputs that are exact in floating point.
    position = timesteps * x.double() * spikes / theta + 0.5
    away_from_ties = (position - position.round()).abs() > 1e-4
    rate = snn(x, timesteps=timesteps).mean(0)
    torch.testing.assert_close(rate[away_from_ties], act(x).detach()[away_from_ties], rtol=0, atol=1e-6)
    assert away_from_ties.float().mean() > 0.9  # the grid lands on some ties; nearly all inputs are compared
    assert isinstance(snn.neurons()[0], GradedIFNeuron) and snn.neurons()[0].max_spikes == spikes


@pytest.mark.parametrize("spikes,timesteps", [(2, 1), (2, 2), (4, 1), (4, 2), (3, 4)])
def test_graded_exact_on_rounding_ties(spikes, timesteps):
    """Inputs with T·x/θ_s + ½ an integer (θ_s = λ/B), chosen exact in floating point: k steps up exactly there."""
    unit = float(timesteps)  # θ_s = T makes every tie (k − ½)·θ_s/T = k − ½ exact
    act, snn = graded_layer(unit * spikes, spikes, timesteps)
    k = torch.arange(0, spikes * timesteps + 2, dtype=torch.float32)
    x = k - 0.5
    rate = snn(x, timesteps=timesteps).mean(0)
    torch.testing.assert_close(rate, act(x).detach(), rtol=0, atol=0)
    assert (rate[1:] > rate[:-1])[: spikes * timesteps].all()  # every tie is a step up


def test_graded_net_at_B_equal_L_and_T_1_is_the_qcfs_network_bit_for_bit():
    torch.manual_seed(0)
    ann = randomise(create_model("test_resnet", num_classes=10, levels=4), thresholds=(0.4, 1.0))
    snn = convert(ann, max_spikes=4)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(snn(x, timesteps=1)[0], ann(x))


def test_binary_neurons_at_T_equal_L_are_not_the_network():
    """The counterpart: binary neurons at T = L = 4 only approximate the deep network (unevenness)."""
    torch.manual_seed(0)
    ann = randomise(create_model("test_resnet", num_classes=10, levels=4), thresholds=(0.4, 1.0))
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(convert(ann)(x, timesteps=4).mean(0), ann(x))


def test_any_shift_converts_to_the_same_function():
    """QCFS with φ ≠ ½: the neuron starts at v(0) = φ·θ, so one layer at T steps is QCFS(L = T, φ)."""
    for shift in (0.0, 0.25, 0.75):
        act = QCFS(levels=4, threshold=2.0, shift=shift)
        snn = convert(nn.Sequential(act))
        x = torch.linspace(-2, 4, 2001)
        torch.testing.assert_close(snn(x, timesteps=4).mean(0), act(x).detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("surrogate", list(SURROGATES))
@pytest.mark.parametrize("detach_reset", [True, False])
def test_graded_fused_gradients_equal_autograd_reference(surrogate, detach_reset):
    torch.manual_seed(3)
    theta = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    x = (torch.randn(5, 2, 3, 4, 4) * 1.5).requires_grad_()
    grads = fused_and_stepwise_gradients(
        lambda: GradedIFNeuron(theta, max_spikes=3, learn_threshold=True, surrogate=surrogate, surrogate_width=0.7,
                               detach_reset=detach_reset),
        x, [2, 3])
    for ref, fast in zip(grads[False], grads[True]):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert grads[True][1].abs().sum() > 0  # the staircase's surrogate passes gradient


def test_graded_spike_statistics_count_events_and_payload():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), QCFS(4, 1.0), nn.Linear(16, 3)).eval()
    x = torch.rand(8, 4) * 3
    snn = convert(net, max_spikes=4)
    out = {}
    snn.net[1].register_forward_hook(lambda m, i, o: out.__setitem__("o", o))
    stats = spike_stats(snn, x, timesteps=2)
    (row,) = stats["neurons"]
    counts = out["o"] / snn.net[1].threshold  # k per neuron and step
    assert row["events"] == pytest.approx((counts > 0).sum().item() / 8)
    assert row["spikes"] == pytest.approx(counts.sum().item() / 8)
    assert row["spikes"] > row["events"]  # some events carry more than one spike
    assert row["payload_bits"] == pytest.approx(3 * row["events"])  # k ∈ {0…4}: 3 bits
    assert "graded" in stats["energy_model"]["note"]


def test_early_exit_stops_the_right_samples_at_the_right_step():
    """Hand-made running means [T=4, 3 samples, 2 classes]."""
    confident = torch.tensor([4.0, 0.0])  # softmax max ≈ 0.98
    unsure = torch.tensor([0.1, 0.0])  # ≈ 0.52
    means = torch.stack([
        torch.stack([confident, unsure, unsure]),
        torch.stack([confident, unsure.flip(0) * 40, unsure]),  # sample 1 turns confident for class 1 at t = 2
        torch.stack([confident, unsure, unsure]),
        torch.stack([confident, unsure, unsure * -1]),
    ])
    steps, predictions = exit_steps(means, 0.9)
    assert steps.tolist() == [1, 2, 4]  # sample 2 never reaches τ: it runs to T_max
    assert predictions.tolist() == [0, 1, 1]  # at its last step sample 2's mean favours class 1
    assert exit_scores(means[0], "margin")[0] > 0.9 and exit_scores(means[0], "margin")[1] < 0.1
    steps, _ = exit_steps(means, 0.999)
    assert steps.tolist() == [4, 4, 4]


def test_running_early_exit_equals_the_offline_computation_and_keeps_full_run_predictions():
    torch.manual_seed(0)
    ann = create_model("test_resnet", num_classes=10)
    qs.calibrate_from_data(ann, [torch.randn(32, 3, 32, 32)])
    snn = convert(ann, chunk_size=3)
    x = torch.randn(16, 3, 32, 32)
    means = snn.running_means(x, 8)
    for tau in (0.15, 0.2, 0.3, 0.99):
        offline_steps, offline_predictions = exit_steps(means, tau)
        predictions, steps, _ = snn.predict_early(x, 8, tau)
        assert torch.equal(steps, offline_steps) and torch.equal(predictions, offline_predictions), tau
        ran_out = steps == 8
        assert torch.equal(predictions[ran_out], means[-1].argmax(-1)[ran_out])
    assert (exit_steps(means, 0.15)[0] < 8).any()  # some samples did stop early


def test_running_early_exit_computes_only_the_samples_still_running():
    net = nn.Sequential(nn.Linear(4, 8), QCFS(4, 1.0), nn.Linear(8, 3))
    with torch.no_grad():  # large inputs fire every neuron and favour class 0 at once; zeros never fire (uniform output)
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[2].weight.zero_()
        net[2].weight[0] = 10.0
        net[2].bias.zero_()
    snn = convert(net)
    seen = []
    snn.net[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x = torch.cat([torch.full((4, 4), 5.0), torch.zeros(4, 4)])
    snn.static_head = False
    _, steps, _ = snn.predict_early(x, 6, 0.9)
    assert steps.tolist() == [1] * 4 + [6] * 4
    assert seen == [8] + [4] * 5  # after the first step only the four undecided samples are computed


def test_step_with_another_batch_size_is_refused_and_timesteps_must_be_whole():
    snn = SpikingModel(nn.Sequential(qs.IFNeuron(1.0)))
    snn.reset()
    snn.step(torch.ones(3))
    with pytest.raises(ValueError, match="call reset"):
        snn.step(torch.ones(5))
    with pytest.raises(ValueError, match="positive integer"):
        snn(torch.ones(3), timesteps=2.7)
    assert snn(torch.ones(3), timesteps=2.0).shape[0] == 2
