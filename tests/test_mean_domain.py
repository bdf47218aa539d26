"""Chains of compensated ops on running means: the same function as compensating every op on its own."""

import pytest
import torch
from _helpers import randomise
from torch import nn

from qcfs_snntorch import QCFS, convert, create_model
from qcfs_snntorch.compensation import StepDifference, compensated_ops

T, B = 6, 3


class Attention(nn.Module):
    """softmax(q·kᵀ)·v after a neuron: product → scale → softmax → product, one chain."""

    def __init__(self):
        super().__init__()
        self.act, self.q, self.k, self.v = QCFS(4, 1.0), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = self.act(x)
        attn = (self.q(x) @ self.k(x).transpose(-2, -1) * 8**-0.5).softmax(dim=-1)
        return attn @ self.v(x)


class Branching(nn.Module):
    """``y`` feeds a compensated op (as a running mean) and a neuron (per step) whose spikes feed another op."""

    def __init__(self):
        super().__init__()
        self.act, self.norm, self.proj, self.act2 = QCFS(4, 1.0), nn.LayerNorm(8), nn.Linear(8, 8), QCFS(4, 0.5)
        self.norm2 = nn.LayerNorm(8)

    def forward(self, x):
        y = self.proj(self.norm(self.act(x)))
        return y.softmax(-1) + self.norm2(self.act2(y))


class NormThroughBatchNorm(nn.Module):
    """LayerNorm → linear → BatchNorm → softmax: BatchNorm in training mode is not linear, so no chain through it."""

    def __init__(self):
        super().__init__()
        self.act, self.norm, self.proj, self.bn = QCFS(4, 1.0), nn.LayerNorm(8), nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.proj(self.norm(self.act(x)))).softmax(-1)


BLOCKS = {"attention": Attention, "branching": Branching, "batchnorm": NormThroughBatchNorm}


def _pair(ann, **kwargs):
    """The same network converted with and without chains on running means, in float64."""
    ann = ann.double().eval()
    fused = convert(ann, memory_format=None, **kwargs).eval()
    per_op = convert(ann, memory_format=None, chains_on_means=False, **kwargs).eval()
    return fused, per_op


def _network(name):
    model = create_model(name, num_classes=10, activations=("relu", "gelu", "silu"), levels=4)
    gen = torch.Generator().manual_seed(0)
    for pname, p in model.named_parameters():
        if pname.endswith("gamma"):  # ConvNeXt's layer scale starts at 1e-6: let the blocks matter
            p.data.uniform_(0.5, 1.0, generator=gen)
    return randomise(model, thresholds=(0.5, 1.5))


def _block(name):
    torch.manual_seed(0)
    return BLOCKS[name]()


def test_a_chain_takes_running_means_from_the_op_before():
    fused, per_op = _pair(_block("attention"))
    first, softmax, second = compensated_ops(fused.net)
    assert first.emits_means and not first.mean_signals  # q, k: per-step values from linear layers of spikes
    assert softmax.mean_signals == {0} and softmax.emits_means
    assert second.mean_signals == {0} and not second.emits_means  # attention as a mean, v per step; output per step
    assert not any(op.mean_signals or op.emits_means for op in compensated_ops(per_op.net))


def test_a_value_also_used_per_step_is_turned_back_into_steps():
    fused, _ = _pair(_block("branching"))
    norm, softmax, norm2 = compensated_ops(fused.net)
    differences = [m for m in fused.net.modules() if isinstance(m, StepDifference)]
    assert norm.emits_means and softmax.mean_signals == {0} and not softmax.emits_means
    assert not norm2.mean_signals  # act2's spikes are per-step values
    assert len(differences) == 1 and differences[0].where == "proj"  # before act2, which needs per-step values


def test_no_chain_through_batchnorm():
    fused, _ = _pair(_block("batchnorm"))
    norm, softmax = compensated_ops(fused.net)
    assert not norm.emits_means and not softmax.mean_signals


def _inputs(shape, seed):
    return torch.rand(B, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 0.5


CASES = [("attention", (5, 8)), ("branching", (5, 8)), ("batchnorm", (8,)),
         ("test_vit", (3, 32, 32)), ("test_convnext", (3, 32, 32)), ("test_efficientnet", (3, 32, 32))]


@pytest.mark.parametrize("name,shape", CASES)
def test_chains_compute_the_same_function_folded_chunked_and_stepwise(name, shape):
    fused, per_op = _pair(_block(name) if name in BLOCKS else _network(name))
    x = _inputs(shape, 1)
    with torch.no_grad():
        expected = per_op(x, timesteps=T)
        assert expected.abs().max() > 0  # not a silent network
        torch.testing.assert_close(fused(x, timesteps=T), expected, rtol=1e-9, atol=1e-9)
        fused.chunk_size = 4
        torch.testing.assert_close(fused(x, timesteps=T), expected, rtol=1e-9, atol=1e-9)
        fused.reset()
        torch.testing.assert_close(torch.stack([fused.step(x) for _ in range(T)]), expected, rtol=1e-9, atol=1e-9)


def test_one_step_is_unchanged_bit_for_bit():
    fused, per_op = _pair(_network("test_vit"))
    x = _inputs((3, 32, 32), 2)
    with torch.no_grad():
        assert torch.equal(fused(x, timesteps=1), per_op(x, timesteps=1))


def test_gradients_through_a_chain_are_those_of_the_ops_on_their_own():
    fused, per_op = _pair(_network("test_vit"), learn_threshold=True)
    x = _inputs((3, 32, 32), 3)
    grads = []
    for snn in (fused, per_op):
        snn.train()
        snn.zero_grad()
        snn(x, timesteps=3).mean(0).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in snn.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-7, atol=1e-9, msg=name)


def test_early_exit_drops_the_state_of_finished_samples():
    from qcfs_snntorch.early_exit import exit_scores

    fused, per_op = _pair(_network("test_vit"))
    x = torch.cat([_inputs((3, 32, 32), 4), _inputs((3, 32, 32), 5)])
    with torch.no_grad():
        threshold = exit_scores(per_op.running_means(x, 1)[0], "confidence").median().item()  # half stop at step 1
        early, late = fused.predict_early(x, 6, threshold), per_op.predict_early(x, 6, threshold)
    assert torch.equal(early[1], late[1]) and len(early[1].unique()) > 1  # samples stopped at different steps
    torch.testing.assert_close(early[2], late[2], rtol=1e-9, atol=1e-9)


def test_stats_count_a_chain_as_fewer_macs_and_the_step_difference_apart():
    from qcfs_snntorch.stats import spike_stats

    fused, per_op = _pair(_block("branching"))
    x = _inputs((5, 8), 5).float()
    totals = [spike_stats(snn.float(), x, 4)["totals"]["compensated_macs_by_kind"] for snn in (fused, per_op)]
    assert totals[0]["difference"] > 0 and "difference" not in totals[1]
    assert sum(totals[0].values()) < sum(totals[1].values())


def test_a_vit_attention_takes_q_k_v_as_running_means_of_its_norm():
    fused, _ = _pair(_network("test_vit"))
    ops = {op.where: op for op in compensated_ops(fused.net)}
    attention = [op for op in ops.values() if op.kind == "product"]
    assert attention and all(op.mean_signals == {0, 1, 2} and not op.emits_means for op in attention)
    norms = [op for where, op in ops.items() if where.endswith("norm1") and f"{where[:-len('norm1')]}attn" in ops]
    assert norms and all(op.emits_means for op in norms)  # LayerNorm → qkv → attention: one chain
