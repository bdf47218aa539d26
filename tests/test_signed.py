"""Signed IF neurons (snn.neuron=signed): +θ spikes as IF neurons, −θ spikes that take back earlier ones.

Exactness where it is exact: one signed layer at T steps with a constant input is QCFS with
L = B·T, ties included (it never sends a negative spike then); with inputs that vary over
time, a signed neuron's count after T steps depends on the sum of its inputs alone (each
step's input below B·θ in magnitude), which an IF neuron's does not. The tracer keeps the
net count in [0, B·T]. Every path supports it: fused, no-grad and per-step kernels (same
outputs and gradients), streaming, early exit, calibration of v(0), statistics by sign,
config and load_run; NIR export refuses it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _helpers import fused_and_stepwise_gradients, randomise
from torch import nn

import qcfs_snntorch as qs
from qcfs_snntorch import QCFS, IFNeuron, SignedIFNeuron, SpikingModel, convert, create_model
from qcfs_snntorch.config import NEURON_NAMES, ConfigError, load_config
from qcfs_snntorch.early_exit import exit_steps
from qcfs_snntorch.export import ExportError, export_nir
from qcfs_snntorch.neurons import NEURON_KINDS, SURROGATES, make_neuron
from qcfs_snntorch.stats import spike_stats


def signed_layer(theta: float, spikes: int, timesteps: int):
    act = QCFS(levels=spikes * timesteps, threshold=theta)
    return act, convert(nn.Sequential(act), max_spikes=spikes, neuron="signed")


def run(neuron: nn.Module, currents: torch.Tensor) -> torch.Tensor:
    """Spike counts k per step of one neuron fed ``currents`` ``[T, …]``."""
    return SpikingModel(nn.Sequential(neuron))(currents) / neuron.threshold


@pytest.mark.parametrize("spikes", [1, 2, 3])
@pytest.mark.parametrize("timesteps", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("theta", [0.5, 2.0, 8.0])
def test_one_signed_layer_equals_qcfs_with_levels_B_times_T(spikes, timesteps, theta):
    act, snn = signed_layer(theta, spikes, timesteps)
    x = torch.linspace(-theta, 2 * theta, 3001)
    rate = snn(x, timesteps=timesteps).mean(0)
    expected = act(x).detach()
    if spikes == 1:  # the binary rule compares v ≥ θ as QCFS rounds: equal everywhere
        torch.testing.assert_close(rate, expected, rtol=0, atol=1e-6)
    else:  # graded: within float rounding of a tie the two may round apart (exact ties: below)
        position = timesteps * x.double() * spikes / theta + 0.5
        away = (position - position.round()).abs() > 1e-4
        torch.testing.assert_close(rate[away], expected[away], rtol=0, atol=1e-6)
        assert away.float().mean() > 0.9
    neuron = snn.neurons()[0]
    assert isinstance(neuron, SignedIFNeuron) and neuron.signed and neuron.max_spikes == spikes


@pytest.mark.parametrize("spikes,timesteps", [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (3, 4)])
def test_signed_exact_on_rounding_ties(spikes, timesteps):
    """Inputs with T·x/θ_s + ½ an integer, exact in floating point: the count steps up exactly there."""
    unit = float(timesteps)  # θ_s = T makes every tie (k − ½)·θ_s/T = k − ½ exact
    act, snn = signed_layer(unit * spikes, spikes, timesteps)
    x = torch.arange(0, spikes * timesteps + 2, dtype=torch.float32) - 0.5
    rate = snn(x, timesteps=timesteps).mean(0)
    torch.testing.assert_close(rate, act(x).detach(), rtol=0, atol=0)
    assert (rate[1:] > rate[:-1])[: spikes * timesteps].all()


def test_negative_spikes_by_hand():
    # θ = 1, v(0) = ½: +1 → v 1.5 fires +1 (v ½); −1 → v −½ < 0 with one spike sent: −1 (v ½);
    # −1 → v −½, nothing left to take back: silent; +0.3 → v −0.2.
    n = SignedIFNeuron(1.0)
    assert run(n, torch.tensor([[1.0], [-1.0], [-1.0], [0.3]])).flatten().tolist() == [1.0, -1.0, 0.0, 0.0]
    assert n.tracer.item() == 0.0 and n.mem.item() == pytest.approx(-0.2)
    # graded B = 2: +3 → v 3.5 sends 2 (v 1.5); −2.75 → v −1.25: ⌊−1.25⌋ = −2, two to take back: −2 (v 0.75)
    g = SignedIFNeuron(1.0, max_spikes=2)
    assert run(g, torch.tensor([[3.0], [-2.75], [-1.0]])).flatten().tolist() == [2.0, -2.0, 0.0]
    # v = 0 exactly is not below the lower threshold: no negative spike
    z = SignedIFNeuron(1.0)
    assert run(z, torch.tensor([[0.5], [0.0], [-0.25]])).flatten().tolist() == [1.0, 0.0, -1.0]  # v: 1 → 0, 0, −¼


@pytest.mark.parametrize("spikes", [1, 2, 3])
def test_net_count_stays_in_0_to_B_times_t_and_matches_the_tracer(spikes):
    torch.manual_seed(0)
    n = SignedIFNeuron(torch.tensor(0.7), max_spikes=spikes)
    counts = run(n, torch.randn(40, 500) * 2.0)
    net = counts.round().cumsum(0)
    t = torch.arange(1, 41).reshape(-1, 1)
    assert (net >= 0).all() and (net <= spikes * t).all()
    assert (counts < 0).any() and (counts.abs() <= spikes).all()
    torch.testing.assert_close(n.tracer, net[-1])


@pytest.mark.parametrize("spikes", [1, 2])
def test_count_depends_only_on_the_sum_of_inputs(spikes):
    """After T steps a signed neuron has sent clip(⌊Σx/θ + ½⌋, 0, B·T) net spikes, whatever the order of its
    inputs (each |x_t| < B·θ); an IF neuron keeps spikes sent early and does not."""
    torch.manual_seed(1)
    timesteps = 8
    # multiples of 1/16 (exact sums) in (−B, B), θ = 1; no sum lands on a tie
    x = (torch.randint(-16 * spikes + 1, 16 * spikes, (timesteps, 4000)) / 16.0)
    x = x[:, ((x.sum(0) + 0.5) % 1 != 0)]
    expected = torch.clamp(torch.floor(x.sum(0) + 0.5), 0, spikes * timesteps)
    signed = run(SignedIFNeuron(1.0, max_spikes=spikes), x).sum(0)
    torch.testing.assert_close(signed, expected, rtol=0, atol=0)
    unsigned = run(make_neuron("if", torch.tensor(1.0), spikes), x).sum(0)
    assert (unsigned != expected).float().mean() > 0.05  # binary/graded IF neurons differ on many orders


@pytest.mark.parametrize("spikes", [1, 3])
@pytest.mark.parametrize("surrogate", list(SURROGATES))
@pytest.mark.parametrize("detach_reset", [True, False])
def test_fused_gradients_equal_the_stepwise_reference_across_chunks(spikes, surrogate, detach_reset):
    torch.manual_seed(3)
    theta = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    x = (torch.randn(7, 2, 3, 4, 4) * 1.5).requires_grad_()
    grads = fused_and_stepwise_gradients(
        lambda: SignedIFNeuron(theta, max_spikes=spikes, learn_threshold=True, surrogate=surrogate, surrogate_width=0.7,
                               detach_reset=detach_reset),
        x, [3, 1, 3])
    for ref, fast in zip(grads[False], grads[True]):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    assert (grads[True][0] < 0).any()  # negative spikes happened
    assert grads[True][1].abs().sum() > 0 and grads[True][2].abs().sum() > 0


def test_negative_thresholds_carry_gradient_only_while_spikes_can_be_taken_back():
    # v(0) = ½, input −0.6: v = −0.1, just below the lower threshold; nothing sent yet, so no bump there
    x = torch.tensor([[-0.6]], requires_grad=True)
    n = SignedIFNeuron(1.0, surrogate="rectangle", surrogate_width=0.5)
    n(x.flatten(0, 1)).sum().backward()
    assert x.grad.item() == 0.0
    # after one +1 spike the same membrane sits at the −θ spike's threshold: a gradient
    y = torch.tensor([[0.6], [-0.2]], requires_grad=True)  # v: 1.1 → fires (0.1), −0.1 → takes it back
    m = SignedIFNeuron(1.0, surrogate="rectangle", surrogate_width=0.5)
    m.timesteps = 2
    out = m(y.flatten(0, 1))
    assert out.detach().flatten().tolist() == [1.0, -1.0]
    out[1].sum().backward()
    assert y.grad[1].item() > 0


def test_no_grad_fused_and_stepwise_outputs_agree_in_a_network():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 9), QCFS(4, 1.0), nn.Linear(9, 7), QCFS(4, 0.8), nn.Linear(7, 3))
    snn = convert(net, neuron="signed", learn_threshold=True)
    x = torch.randn(16, 5)
    with torch.no_grad():
        fast = snn(x, timesteps=6)
    fused = snn(x, timesteps=6)
    for n in snn.neurons():
        n.fused = False
    stepwise = snn(x, timesteps=6)
    torch.testing.assert_close(fused.detach(), fast, rtol=0, atol=1e-6)
    torch.testing.assert_close(stepwise.detach(), fast, rtol=0, atol=1e-6)
    fused.mean(0).sum().backward()
    assert snn.net[0].weight.grad.abs().sum() > 0 and snn.net[1].threshold.grad is not None


def test_the_spike_tracer_is_state_that_reset_clears():
    # streaming == multi-step == chunks for signed neurons: tests/test_neurons.py (parametrized by neuron)
    net = nn.Sequential(nn.Linear(6, 8), QCFS(4, 1.0), nn.Linear(8, 3))
    snn = convert(net, neuron="signed", max_spikes=2)
    snn.chunk_size = 4
    snn(torch.randn(32, 6), timesteps=9)
    assert all(n.tracer is not None for n in snn.neurons())
    snn.reset()
    assert all(n.tracer is None for n in snn.neurons())


def test_running_early_exit_keeps_the_tracer_of_the_running_samples():
    torch.manual_seed(0)
    ann = create_model("test_resnet", num_classes=10)
    qs.calibrate_from_data(ann, [torch.randn(32, 3, 32, 32)])
    snn = convert(ann, neuron="signed")
    x = torch.randn(16, 3, 32, 32)
    means = snn.running_means(x, 6)
    stopped_some = False
    for tau in (0.15, 0.2, 0.3, 0.99):
        offline_steps, offline_predictions = exit_steps(means, tau)
        predictions, steps, _ = snn.predict_early(x, 6, tau)
        assert torch.equal(steps, offline_steps) and torch.equal(predictions, offline_predictions), tau
        stopped_some |= bool(((steps < 6).any() & (steps == 6).any()).item())
    assert stopped_some  # some samples stopped while others ran on: the tracers of those were kept


def test_signed_differs_from_if_in_a_deep_network_and_sends_negative_spikes():
    torch.manual_seed(0)
    ann = randomise(create_model("test_resnet", num_classes=10, levels=4), thresholds=(0.4, 1.0))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        signed, unsigned = convert(ann, neuron="signed")(x, timesteps=4), convert(ann)(x, timesteps=4)
    assert not torch.equal(signed, unsigned)
    stats = spike_stats(convert(ann, neuron="signed"), x, timesteps=4)
    assert stats["totals"]["negative_events"] > 0


def test_statistics_count_positive_and_negative_events_apart():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), QCFS(4, 1.0), nn.Linear(16, 16), QCFS(4, 0.5), nn.Linear(16, 3)).eval()
    x = torch.randn(8, 4) * 3
    snn = convert(net, neuron="signed")
    outs = {}
    neuron = snn.net[3]
    neuron.register_forward_hook(lambda m, i, o: outs.__setitem__("o", o))
    stats = spike_stats(snn, x, timesteps=6)
    row = stats["neurons"][1]
    k = outs["o"] / neuron.threshold
    assert row["negative_events"] == pytest.approx((k < 0).sum().item() / 8) and row["negative_events"] > 0
    assert row["positive_events"] == pytest.approx((k > 0).sum().item() / 8)
    assert row["events"] == pytest.approx(row["positive_events"] + row["negative_events"])
    assert row["spikes"] == pytest.approx(k.sum().item() / 8)  # net: negative spikes subtract
    assert row["payload_bits"] == pytest.approx(2 * row["events"])  # k ∈ {−1, 0, 1}: 2 bits
    totals = stats["totals"]
    assert totals["negative_events"] == pytest.approx(sum(n["negative_events"] for n in stats["neurons"]))
    # a negative spike is an accumulate downstream like a positive one: the next layer's input rate counts both
    layer = next(lay for lay in stats["layers"] if lay["name"] == "4")
    assert layer["op"] == "AC" and layer["input_rate"] == pytest.approx(row["events"] / (6 * 16))
    unsigned = spike_stats(convert(net), x, timesteps=6)
    assert unsigned["totals"]["negative_events"] == 0 and unsigned["neurons"][0]["payload_bits"] == unsigned["neurons"][0]["events"]


def test_calibration_of_v0_works_on_signed_neurons():
    from qcfs_snntorch.calibration import calibrate_potentials

    torch.manual_seed(0)
    ann = create_model("test_resnet", num_classes=10)
    qs.calibrate_from_data(ann, [torch.randn(32, 3, 32, 32)])
    snn = convert(ann.eval(), neuron="signed")
    fitted = calibrate_potentials(ann, snn, torch.randn(32, 3, 32, 32), 2, ["layer"])
    first = fitted["layers"][0]
    assert first["offset_after"] < first["offset_before"]
    assert any(n.initial_offset.abs().sum() > 0 for n in snn.neurons())


def test_nir_export_refuses_signed_neurons_with_the_reason(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), QCFS(4, 1.0), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(ExportError, match="negative spikes.*snn.neuron = if"):
        export_nir(convert(net, neuron="signed"), tmp_path / "x.nir", torch.zeros(1, 1, 8, 8))
    assert not (tmp_path / "x.nir").exists()
    export_nir(convert(net), tmp_path / "y.nir", torch.zeros(1, 1, 8, 8))  # the same network with IF neurons exports


def test_option_in_api_and_config_with_clear_errors():
    assert set(NEURON_NAMES) == set(NEURON_KINDS)
    net = nn.Sequential(nn.Linear(3, 4), QCFS(4, 1.0), nn.Linear(4, 2))
    assert type(convert(net).neurons()[0]) is IFNeuron  # "if" stays the default
    assert type(convert(net, neuron="signed", max_spikes=2).neurons()[0]) is SignedIFNeuron
    with pytest.raises(ValueError, match="valid: if, signed"):
        convert(net, neuron="bipolar")
    assert load_config(["snn.neuron=signed", "stages=[train,convert,eval]"]).snn.neuron == "signed"
    assert load_config([]).snn.neuron == "if"
    with pytest.raises(ConfigError, match="snn.neuron='bipolar' is not valid; choose one of: if, signed"):
        load_config(["snn.neuron=bipolar"])
    with pytest.raises(ConfigError, match="drop the export stage"):
        load_config(["snn.neuron=signed", "stages=[train,convert,export]"])


def test_signed_neurons_come_back_signed_from_load_run(tmp_path):
    from qcfs_snntorch.data import DatasetInfo
    from qcfs_snntorch.pipeline.load import weights_metadata
    from qcfs_snntorch.training import save_weights

    cfg = load_config(["snn.neuron=signed", "snn.max_spikes=2", "stages=[train,convert,eval]"])
    info = DatasetInfo("digits", 10, 1, 8, tuple("0123456789"), (0.3,), (0.4,))
    torch.manual_seed(0)
    ann = qs.create_model("test_resnet", num_classes=10, in_chans=1, levels=4, threshold=1.0).eval()
    snn = qs.convert(ann, neuron="signed", max_spikes=2).eval()
    save_weights(snn, tmp_path / "snn.safetensors", weights_metadata(SimpleNamespace(cfg=cfg, data=SimpleNamespace(info=info)), "snn"))
    loaded = qs.load_run(tmp_path / "snn.safetensors")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.snn(x, timesteps=3), snn(x, timesteps=3))
    neuron = loaded.snn.neurons()[0]
    assert type(neuron) is SignedIFNeuron and neuron.max_spikes == 2
