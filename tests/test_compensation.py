"""Expectation-compensated operations: exact in the mean at every step, on every engine path, in whole networks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _helpers import randomise
from torch import nn

from qcfs_snntorch import QCFS, ConversionError, check, convert, create_model
from qcfs_snntorch.compensation import COMPENSATED_KINDS, CompensatedNorm, TensorMethod, compensated_ops
from qcfs_snntorch.tracing import spiking_neurons

T, B = 6, 3


class LayerNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):  # [B, N, 8]
        return self.norm(x)


class AttentionBlock(nn.Module):
    """softmax(q·kᵀ/√d)·v written out: products of two signals and a softmax between them."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        attn = (self.q(x) @ self.k(x).transpose(-2, -1) * 8**-0.5).softmax(dim=-1)
        return attn @ self.v(x)


class SEBlock(nn.Module):
    """Squeeze-excite: x · sigmoid(fc(mean over space))."""

    def __init__(self):
        super().__init__()
        self.fc, self.gate = nn.Conv2d(4, 4, 1), nn.Sigmoid()

    def forward(self, x):  # [B, 4, H, W]
        return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))


class MaxBlock(nn.Module):
    def forward(self, x):  # [B, 4, H, W]: functional max pooling, and a max over channels
        return F.max_pool2d(x, 2) + x.amax(dim=1, keepdim=True)[..., ::2, ::2]


class GELUBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.GELU()  # left unreplaced: compensated elementwise

    def forward(self, x):
        return self.act(x) * 2.0


BLOCKS = {"layernorm": (LayerNormBlock, (5, 8)), "attention": (AttentionBlock, (5, 8)), "se": (SEBlock, (4, 4, 4)),
          "max": (MaxBlock, (4, 4, 4)), "gelu": (GELUBlock, (5, 8))}


class Spiking(nn.Module):
    """A QCFS in front of the block: the block then sees spike trains, as inside a converted network."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.act, self.block = QCFS(levels=4, threshold=1.0), block

    def forward(self, x):
        return self.block(self.act(x))


def _converted(name, chunk_size=None):
    torch.manual_seed(0)
    cls, shape = BLOCKS[name]
    ann = Spiking(cls()).eval()
    snn = convert(ann, chunk_size=chunk_size, memory_format=None).eval()
    return ann, snn, shape


def _spikes_and_outputs(snn, x_seq):
    """The block's input (the neuron's output) and output, both ``[T, B, …]``, from one run."""
    seen = []
    handle = spiking_neurons(snn.net)[0].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            out = snn(x_seq)
    finally:
        handle.remove()
    spikes = torch.cat(seen)
    return spikes.reshape(x_seq.shape[0], -1, *spikes.shape[1:]), out


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_cumulative_output_is_t_times_f_of_the_mean_input(name):
    ann, snn, shape = _converted(name)
    assert compensated_ops(snn.net), "nothing was compensated"
    x_seq = torch.rand(T, B, *shape, generator=torch.Generator().manual_seed(1)) * 2 - 0.5  # varies over time
    spikes, out = _spikes_and_outputs(snn, x_seq)
    assert spikes.unique().numel() > 1  # the block really sees spike trains
    with torch.no_grad():
        for t in range(1, T + 1):
            expected = t * ann.block(spikes[:t].mean(0))
            torch.testing.assert_close(out[:t].sum(0), expected, rtol=1e-5, atol=1e-5, msg=f"{name}, t = {t}")


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_folded_chunked_and_stepwise_are_equal(name):
    _, snn, shape = _converted(name)
    _, chunked, _ = _converted(name, chunk_size=4)
    x = torch.rand(B, *shape, generator=torch.Generator().manual_seed(2)) * 2 - 0.5
    with torch.no_grad():
        folded = snn(x, timesteps=10)
        torch.testing.assert_close(chunked(x, timesteps=10), folded, rtol=1e-5, atol=1e-5)
        snn.reset()
        stepwise = torch.stack([snn.step(x) for _ in range(10)])
    torch.testing.assert_close(stepwise, folded, rtol=1e-5, atol=1e-5)


def test_reset_clears_running_sums():
    _, snn, shape = _converted("layernorm")
    x = torch.rand(B, *shape)
    with torch.no_grad():
        first = snn(x, timesteps=3)
        assert torch.equal(snn(x, timesteps=3), first)  # a new call starts from zero sums
        snn.reset()
        assert torch.equal(snn.step(x), first[0])


def test_one_step_is_f_bit_for_bit_and_gradients_are_fs():
    norm = nn.LayerNorm(6)
    op = CompensatedNorm(norm, [0])
    x = torch.randn(4, 6, requires_grad=True)
    y = op(x)
    assert torch.equal(y, norm(x))
    (g_op,) = torch.autograd.grad(y.square().sum(), x)
    (g_f,) = torch.autograd.grad(norm(x).square().sum(), x)
    torch.testing.assert_close(g_op, g_f)


def test_tuple_outputs_keep_integer_indices():
    op = COMPENSATED_KINDS["max"](TensorMethod("max"), [0])
    op.timesteps = 2
    values, indices = op(torch.tensor([[1.0, 3.0], [5.0, 0.0]]), 1)  # steps of one sample: means [1, 3], [3, 1.5]
    assert torch.equal(indices, torch.tensor([1, 0]))
    torch.testing.assert_close(values, torch.tensor([3.0, 2 * 3.0 - 3.0]))


@pytest.mark.parametrize("gate_as_means", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_elementwise_product_takes_a_shorter_way_to_the_same_outputs(gate_as_means, grad):
    """x·gate emitted per step: a_t·b̄_t + S_{t−1}·(b̄_t − b̄_{t−1}) equals the general rule, over chunks."""
    import operator

    from qcfs_snntorch.compensation import CompensatedOp, CompensatedProduct, running_mean

    gen = torch.Generator().manual_seed(0)
    steps, batch = 6, 2
    x = torch.randn(steps * batch, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=grad)
    gate = torch.rand(steps * batch, 4, 1, 1, generator=gen, dtype=torch.float64, requires_grad=grad)
    short, general = CompensatedProduct(operator.mul, [0, 1]), CompensatedOp(operator.mul, [0, 1])
    if gate_as_means:  # the gate arrives as running means (a chain), as in squeeze-excite
        short.mean_signals = frozenset({1})
        numbers = torch.arange(1, steps + 1, dtype=torch.float64)
        gate_in, _ = running_mean(gate, numbers, None)
    else:
        gate_in = gate
    outs = {}
    for name, op in (("short", short), ("general", general)):
        chunks, start = [], 0
        for size in (4, 2):  # two calls: the state carries over
            op.timesteps = size
            rows = slice(start * batch, (start + size) * batch)
            chunks.append(op(x[rows], (gate_in if name == "short" else gate)[rows]))
            start += size
        outs[name] = torch.cat(chunks)
    assert short.last_mean is not None  # it took the shorter way
    torch.testing.assert_close(outs["short"], outs["general"], rtol=1e-12, atol=1e-12)
    if grad:
        g_short = torch.autograd.grad(outs["short"].square().sum(), (x, gate))
        g_general = torch.autograd.grad(outs["general"].square().sum(), (x, gate))
        for gs, gg in zip(g_short, g_general):
            torch.testing.assert_close(gs, gg, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- whole networks

NETWORKS = ["test_vit", "test_convnext", "test_efficientnet"]


def _network(name, levels=4):
    model = create_model(name, num_classes=10, activations=("relu", "gelu", "silu"), levels=levels)
    gen = torch.Generator().manual_seed(0)
    for pname, p in model.named_parameters():
        if pname.endswith("gamma"):  # ConvNeXt's layer scale starts at 1e-6: let the blocks matter
            p.data.uniform_(0.5, 1.0, generator=gen)
    return randomise(model, thresholds=(0.5, 1.5))


@pytest.mark.parametrize("name", NETWORKS)
def test_graded_snn_at_one_step_equals_the_ann_exactly(name):
    levels = 4
    ann = _network(name, levels)
    report = check(ann)
    assert report.convertible and report.compensated, report.summary()
    snn = convert(ann, max_spikes=levels, memory_format=None).eval()  # the ANN's layout: the same conv rounding
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(snn(x, timesteps=1)[0], ann(x))


@pytest.mark.parametrize("name", NETWORKS)
def test_binary_snn_approaches_the_ann_as_t_grows(name):
    ann = _network(name)
    snn = convert(ann).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    errors = {}
    with torch.no_grad():
        means = snn.running_means(x, 64)
        for t in (4, 64):
            reference = copy.deepcopy(ann)
            for act in reference.modules():
                if isinstance(act, QCFS):
                    act.levels = t  # the SNN at T steps approximates QCFS at L = T
            logits = reference(x)
            errors[t] = ((means[t - 1] - logits).abs().mean() / logits.abs().mean()).item()
    assert errors[64] < 0.5 * errors[4], errors


def test_gradients_flow_through_compensated_ops():
    ann = _network("test_vit")
    snn = convert(ann, learn_threshold=True).train()
    x = torch.randn(2, 3, 32, 32)
    snn(x, timesteps=3).mean(0).logsumexp(-1).sum().backward()
    norm = snn.net.blocks[-1].norm1  # compensated LayerNorm: its parameters stay where they were
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert snn.net.patch_embed.proj.weight.grad.abs().sum() > 0  # through every compensated op back to the stem
    assert all(torch.isfinite(p.grad).all() for p in snn.parameters() if p.grad is not None)


def test_state_dict_keeps_the_anns_keys():
    ann = _network("test_vit")
    snn = convert(ann)
    assert set(ann.state_dict()) <= set(snn.net.state_dict())


# ---------------------------------------------------------------- conversion choices


class SharedAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), QCFS(levels=4, threshold=1.0)

    def forward(self, x):
        for conv in (self.conv1, self.conv2):  # one activation module, called in a loop
            x = self.act(conv(x))
        return x


def test_activation_in_a_loop_gets_one_neuron_per_call():
    ann = SharedAct().eval()
    assert check(ann).convertible and not check(ann, strict=True).convertible
    snn = convert(ann, max_spikes=4)
    assert len(spiking_neurons(snn.net)) == 2
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(snn(x, timesteps=1)[0], ann(x))


class OptionalMask(nn.Module):
    """A root forward with an optional argument, as timm's Hiera has (``forward(x, mask=None)``)."""

    def __init__(self):
        super().__init__()
        self.act, self.norm = QCFS(4, 2.0), nn.LayerNorm(6)

    def forward(self, x, mask=None):
        x = self.norm(self.act(x))
        if mask is not None:
            x = x * mask.view(-1, 1)
        return x


def test_optional_root_arguments_trace_at_their_defaults():
    """A symbolic mask is "not None": the masked branch was traced and the SNN failed on the real None."""
    ann = OptionalMask().eval()
    snn = convert(ann, max_spikes=4)
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(snn(x, timesteps=1)[0], ann(x))


def test_strict_refuses_what_would_be_compensated():
    ann = Spiking(LayerNormBlock())
    with pytest.raises(ConversionError, match="block.norm"):
        convert(ann, strict=True)
    assert compensated_ops(convert(ann).net)  # not strict: compensated


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.act, self.norm = QCFS(), nn.LayerNorm(4)

    def forward(self, x):
        x = self.act(x)
        if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
            x = self.norm(x)
        return x


def test_untraceable_network_with_nonlinear_ops_refused_with_reason():
    report = check(DataDependent())
    assert not report.convertible
    assert "does not trace" in report.summary() and "norm" in report.summary()
    assert report.untraceable and "TraceError" in report.untraceable  # the cause, for tools that count causes
    assert check(nn.Sequential(QCFS(), nn.LayerNorm(4))).untraceable is None


class TokenAttention(nn.Module):
    """Single-head attention with scalar q, k, v per token; ``batch_first=False`` writes it on a
    2-D (batch, tokens) tensor as timm's csatv2 does, so q @ kᵀ is (batch × batch)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.act, self.qkv, self.batch_first = QCFS(), nn.Linear(1, 3), batch_first

    def forward(self, x):  # x: (batch, tokens)
        q, k, v = self.qkv(self.act(x).unsqueeze(-1)).unbind(-1)
        if self.batch_first:
            return ((q.unsqueeze(-1) @ k.unsqueeze(-2)).softmax(-1) @ v.unsqueeze(-1)).squeeze(-1)
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v


def test_an_op_whose_input_lost_the_batch_dimension_is_refused_with_an_example():
    ann, x = TokenAttention(batch_first=False).eval(), torch.rand(3, 7)
    assert check(ann).convertible  # statically the graph looks like attention
    with pytest.raises(RuntimeError, match="not a multiple of timesteps"):  # and the SNN fails at run time
        convert(ann, verify=False).eval()(x, timesteps=2)
    report = check(ann, example=x[0])
    assert not report.convertible
    assert [(p.kind, p.op) for p in report.problems] == [("batch", "matmul")]
    assert "shape [7, 5] for a batch of 5" in str(report.problems[0]) and "batch in dim 0" in report.summary()
    refused = report.problems[0]
    assert (refused.path, refused.op) not in {(c.path, c.op) for c in report.compensated}  # listed once, as refused
    assert any(c.op == "matmul" for c in check(ann).compensated)  # the static check compensates it


def test_batch_first_ops_pass_the_example_probe_and_run():
    ann, x = TokenAttention(batch_first=True).eval(), torch.rand(3, 7)
    report = check(ann, example=x[0])
    assert report.convertible, report.summary()
    snn = convert(ann, max_spikes=ann.act.levels).eval()  # graded B = L at T = 1: the ANN exactly
    with torch.no_grad():
        assert torch.allclose(snn(x, timesteps=1)[0], ann(x), atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_sequence_first_multihead_attention_is_refused(batch_first):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.attn = QCFS(), nn.MultiheadAttention(4, 1, batch_first=batch_first)

        def forward(self, x):  # x: (batch, tokens, 4)
            x = self.act(x)
            x = x if batch_first else x.transpose(0, 1)
            y = self.attn(x, x, x, need_weights=False)[0]
            return y if batch_first else y.transpose(0, 1)

    report = check(Block().eval(), example=torch.rand(6, 4))
    assert report.convertible == batch_first, report.summary()
    assert batch_first or report.problems[0].path == "attn" and "[6, 5, 4]" in report.problems[0].reason


def test_timm_csatv2_is_refused_at_its_attention_before_any_training():
    ann = create_model("csatv2", num_classes=10, activations=("relu", "gelu", "silu"))
    report = check(ann, example=torch.rand(3, 64, 64))  # its last stage needs 64 px
    assert not report.convertible
    assert {p.kind for p in report.problems} == {"batch"}
    assert all(p.path.endswith(".attn.attn") and p.op == "matmul" for p in report.problems), report.summary()


def test_windows_folded_into_the_batch_pass_the_probe():
    # Swin partitions each image into windows, dim 0 = batch × windows: time, folded in front of the
    # batch, stays outermost, so the SNN is exact there (a probe that wanted dim 0 = batch refused it).
    ann = create_model("swin_tiny_patch4_window7_224", num_classes=10, activations=("gelu",), img_size=112)
    report = check(ann, example=torch.rand(3, 112, 112))
    assert report.convertible, report.summary()
    assert any(c.kind == "product" for c in report.compensated)


def test_the_probe_runs_on_the_meta_device():
    with torch.device("meta"):  # what the census's stage 1 does: no weights, shapes only
        ann = create_model("csatv2", num_classes=10, activations=("relu", "gelu", "silu"))
    report = check(ann, example=torch.empty(3, 64, 64, device="meta"))
    assert {p.kind for p in report.problems} == {"batch"}


def test_a_failing_example_forward_is_a_note_not_a_refusal():
    report = check(nn.Sequential(QCFS(), nn.LayerNorm(4)), example=torch.rand(5))  # LayerNorm(4) on 5 features fails
    assert report.convertible and any("example input failed" in n for n in report.notes)


def test_network_without_compensated_ops_is_left_as_is():
    model = create_model("resnet18", num_classes=10, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8))
    snn = convert(model)
    assert not compensated_ops(snn.net) and type(snn.net).forward is type(model).forward


# ---------------------------------------------------------------- cost and export


def test_stats_count_compensated_ops_as_macs_per_kind():
    from qcfs_snntorch.stats import spike_stats

    snn = convert(_network("test_efficientnet")).eval()
    stats = spike_stats(snn, torch.randn(2, 3, 32, 32), 4)
    kinds = {row["kind"] for row in stats["compensated"]}
    assert kinds == {"gate", "product"}, stats["compensated"]
    totals = stats["totals"]
    assert totals["compensated_macs"] > 0 and set(totals["compensated_macs_by_kind"]) == kinds
    assert totals["compensated_macs"] == pytest.approx(sum(totals["compensated_macs_by_kind"].values()))
    assert totals["snn_macs"] >= totals["compensated_macs"]
    # every step costs at least f once: over T = 4 more than 4 × the ANN's cost of the same ops
    assert all(row["macs"] > 4 * row["ann_macs"] > 0 for row in stats["compensated"])
    ops = {row["name"]: row["op"] for row in stats["layers"]}
    assert ops["blocks.3.0.conv_pwl"] == "MAC"  # fed by x·gate: real values, not spikes
    assert ops["blocks.3.0.se.conv_expand"] == "AC"  # fed by the SE's own neuron


def test_nir_export_refuses_compensated_ops_by_name(tmp_path):
    from qcfs_snntorch import ExportError, export_nir

    snn = convert(Spiking(LayerNormBlock()))
    with pytest.raises(ExportError, match=r"block\.norm \(norm: LayerNorm\)"):
        export_nir(snn, tmp_path / "x.nir", torch.rand(1, 5, 8))
    assert not (tmp_path / "x.nir").exists()


def test_conversion_error_with_one_neuron_per_call_site():
    from qcfs_snntorch.stats import conversion_error

    ann = SharedAct().eval()
    errors = conversion_error(ann, convert(ann), torch.randn(2, 3, 8, 8), [1, 4])
    assert errors["layers"] == [] and len(errors["output"]["mae"]) == 2  # the shared act is left out, no crash


def test_activation_on_parameters_alone_stays_qcfs():
    """timm's relative-position MLP runs a (now QCFS) activation on a coordinate table, not on the input."""
    ann = create_model("test_vit_relpos", num_classes=10, activations=("relu", "gelu", "silu"), levels=4)
    ann = randomise(ann, thresholds=(0.5, 1.5))
    snn = convert(ann, max_spikes=4, memory_format=None).eval()
    assert any(isinstance(m, QCFS) for m in snn.net.modules()) and snn.neurons()
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(snn(x, timesteps=1)[0], ann(x))
        assert convert(ann).eval()(x, timesteps=2).shape == (2, 2, 10)
