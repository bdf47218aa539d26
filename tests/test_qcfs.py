"""QCFS values and gradients against the formulas of the paper (Bu et al., ICLR 2022, eq. 11 and its straight-through gradient)."""

import pytest
import torch

from qcfs_snntorch import QCFS
from qcfs_snntorch.qcfs import qcfs


def reference(z, lam, levels, shift=0.5):
    """λ·clip(floor(z·L/λ + φ)/L, 0, 1), written with the step s = λ/L as floor((z + φ·s)/s): the same
    number, in the arithmetic a graded neuron does (so that the two agree bit for bit at ties too)."""
    step = lam / levels
    return step * torch.clamp(torch.floor((z + shift * step) / step), 0, levels)


@pytest.mark.parametrize("levels", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("lam", [0.5, 1.0, 8.0])
def test_values_match_formula(levels, lam):
    z = torch.linspace(-2 * lam, 2 * lam, 4001, dtype=torch.float64)
    act = QCFS(levels=levels, threshold=lam).double()
    torch.testing.assert_close(act(z), reference(z, torch.tensor(lam, dtype=torch.float64), levels), rtol=0, atol=0)


def test_output_levels_and_range():
    act = QCFS(levels=4, threshold=2.0)
    out = act(torch.randn(10000) * 3)
    assert set(out.unique().tolist()) <= {0.0, 0.5, 1.0, 1.5, 2.0}


def test_gradient_wrt_input_is_straight_through_inside_range():
    lam, levels = 2.0, 4
    z = torch.tensor([-1.0, -0.1, 0.1, 0.7, 1.3, 1.9, 2.1, 5.0], requires_grad=True)
    QCFS(levels, lam)(z).sum().backward()
    expected = ((z > 0) & (z < lam)).float()
    torch.testing.assert_close(z.grad, expected)


def test_gradient_wrt_threshold():
    lam, levels = 2.0, 4
    z = torch.tensor([-1.0, 0.1, 0.7, 1.3, 1.9, 2.0, 3.0])
    act = QCFS(levels, lam)
    act(z).sum().backward()
    q = torch.clamp(torch.floor(z * levels / lam + 0.5) / levels, 0, 1)
    inside = (z > 0) & (z < lam)
    expected = torch.where(inside, q - z / lam, (z >= lam).float()).sum()
    torch.testing.assert_close(act.threshold.grad, expected)


def test_gradient_matches_autograd_of_straight_through_formula():
    """Same gradients as autograd through the literal formula with floor → identity inside (0, λ)."""
    torch.manual_seed(0)
    z = (torch.rand(500, dtype=torch.float64) * 3 - 0.5).requires_grad_()
    lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    levels = 4
    upstream = torch.randn(500, dtype=torch.float64)
    (qcfs(z, lam, levels) * upstream).sum().backward()
    g_z, g_lam = z.grad.clone(), lam.grad.clone()

    z2, lam2 = z.detach().clone().requires_grad_(), lam.detach().clone().requires_grad_()
    scaled = z2 * levels / lam2 + 0.5
    floored = scaled + (torch.floor(scaled) - scaled).detach()  # straight-through floor
    q = floored / levels
    inside = (z2 > 0) & (z2 < lam2)
    out = torch.where(inside, lam2 * q, torch.where(z2 >= lam2, lam2, torch.zeros_like(z2)))
    (out * upstream).sum().backward()
    torch.testing.assert_close(g_z, z2.grad)
    torch.testing.assert_close(g_lam, lam2.grad)


def test_accepts_inplace_for_timm_and_rejects_bad_levels():
    QCFS(inplace=True)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="levels"):
            QCFS(levels=bad)


def test_bf16_autocast_input():
    act = QCFS(levels=4, threshold=2.0)
    z = torch.linspace(-1, 3, 101).bfloat16()
    out = act(z)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(z.float(), torch.tensor(2.0), 4), atol=0.02, rtol=0)


@pytest.mark.parametrize("bad", [dict(threshold=0.0), dict(threshold=-1.0), dict(shift=1.0), dict(shift=-0.1)])
def test_bad_threshold_or_shift_is_refused(bad):
    with pytest.raises(ValueError, match="threshold|shift"):
        QCFS(**bad)


def test_a_threshold_learned_below_zero_is_clamped_and_can_recover():
    """λ reached ≤ 0 (weight decay, a large step) computes as the minimum, and its gradient still flows."""
    from qcfs_snntorch.qcfs import MIN_THRESHOLD

    act = QCFS(levels=4, threshold=1.0)
    with torch.no_grad():
        act.threshold.fill_(-0.5)
    z = torch.tensor([-1.0, 0.0, 5e-5, 1.0])
    out = act(z)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, MIN_THRESHOLD * 0.5, MIN_THRESHOLD]), rtol=1e-3, atol=0)
    out.sum().backward()
    assert act.threshold.grad is not None and act.threshold.grad.item() > 0  # above the range: ∂a/∂λ = 1 pulls λ up


@pytest.mark.parametrize("learned", [-0.5, -1e4, -1e8])
def test_a_large_negative_threshold_computes_as_exactly_the_minimum(learned):
    """However far below zero λ went, it computes as MIN_THRESHOLD exactly (not as 0: a division by zero),
    with the straight-through gradient of λ itself."""
    from qcfs_snntorch.qcfs import MIN_THRESHOLD

    act = QCFS(levels=4, threshold=1.0)
    with torch.no_grad():
        act.threshold.fill_(learned)
    z = torch.tensor([-1.0, 0.0, 5e-5, 1.0])
    out = act(z)
    expected = QCFS(levels=4, threshold=MIN_THRESHOLD)(z).detach()
    assert torch.equal(out.detach(), expected), (out, expected)
    out.sum().backward()
    assert torch.isfinite(act.threshold.grad).all() and act.threshold.grad.item() > 0


class _PushThresholdDown:
    """A loss that one SGD step answers by sending λ far below zero (every input is above λ: ∂a/∂λ = 1)."""

    def train_mode(self, model):
        model.train()

    def start_epoch(self, model, epoch, first_step):
        pass

    def close(self, model):
        pass

    def __call__(self, model, images, labels, step):
        out = model(images)
        return {"loss": out.sum() * 1e4, "output": out}


@pytest.mark.parametrize("project", [True, False])
def test_training_projects_thresholds_back_to_the_minimum_after_each_update(tmp_path, project):
    from torch.utils.data import DataLoader, TensorDataset

    from qcfs_snntorch.config import TrainConfig
    from qcfs_snntorch.qcfs import MIN_THRESHOLD
    from qcfs_snntorch.training import fit, make_accelerator
    from qcfs_snntorch.training.tasks import Task

    task = _PushThresholdDown()
    if project:
        task.after_update = Task().after_update  # what every task of the package does
    else:
        task.after_update = lambda model: None
    act = QCFS(levels=4, threshold=1.0)
    loader = DataLoader(TensorDataset(torch.full((4, 3), 10.0), torch.zeros(4, dtype=torch.long)), batch_size=4)
    fit(act, loader, task=task, cfg=TrainConfig(epochs=1, lr=0.1, weight_decay=0.0, warmup_epochs=0), accelerator=make_accelerator(),
        checkpoints=tmp_path, log=lambda m: None)
    if project:
        assert act.threshold.item() == pytest.approx(MIN_THRESHOLD)
    else:
        assert act.threshold.item() < -100  # what the projection prevents


# λ's gradient rule (train.threshold_gradient): "lsq" scales λ's gradient and nothing else.

@pytest.mark.parametrize("shape, lam_shape", [((6, 3, 5, 7), ()), ((6, 3, 5, 7), (3, 1, 1)), ((6, 11), ()), ((9,), ())])
@pytest.mark.parametrize("levels", [1, 4, 8])
def test_lsq_rule_scales_lambda_gradient_by_elements_per_sample_and_levels(shape, lam_shape, levels):
    """Same forward and input gradient bit for bit; λ's gradient × 1/√(n·L), n = elements of one sample per λ."""
    torch.manual_seed(1)
    z = torch.randn(shape, dtype=torch.float64) * 2
    upstream = torch.randn(shape, dtype=torch.float64)
    results = {}
    for rule in ("plain", "lsq"):
        act = QCFS(levels=levels, threshold=1.5, threshold_gradient=rule).double()
        if lam_shape:
            act.threshold = torch.nn.Parameter(torch.full(lam_shape, 1.5, dtype=torch.float64))
        x = z.clone().requires_grad_()
        out = act(x)
        (out * upstream).sum().backward()
        results[rule] = out.detach(), x.grad, act.threshold.grad
    assert torch.equal(results["plain"][0], results["lsq"][0])
    assert torch.equal(results["plain"][1], results["lsq"][1])
    lam_elements = max(1, torch.Size(lam_shape).numel())
    per_sample = torch.Size(shape[1:]).numel() if len(shape) > 1 else shape[0]
    expected = results["plain"][2] / (per_sample / lam_elements * levels) ** 0.5
    torch.testing.assert_close(results["lsq"][2], expected, rtol=1e-12, atol=0)


def test_lsq_rule_follows_levels_set_per_batch():
    """L drawn per batch (train.levels_choices) changes the scale with it."""
    z = torch.randn(4, 2, 3, 3)
    grads = {}
    for levels in (2, 8):
        act = QCFS(levels=levels, threshold=1.0, threshold_gradient="lsq")
        plain = QCFS(levels=levels, threshold=1.0)
        act(z).sum().backward()
        plain(z).sum().backward()
        grads[levels] = act.threshold.grad / plain.threshold.grad
    torch.testing.assert_close(grads[2], torch.tensor(1 / (18 * 2) ** 0.5))
    torch.testing.assert_close(grads[8], torch.tensor(1 / (18 * 8) ** 0.5))


def test_threshold_gradient_rule_is_checked_and_set_on_every_layer():
    from qcfs_snntorch import create_model, set_threshold_gradient

    with pytest.raises(ValueError, match=r"threshold_gradient must be one of \['plain', 'lsq'\], got 'adam'"):
        QCFS(threshold_gradient="adam")
    model = create_model("test_resnet", num_classes=10)
    layers = [m for m in model.modules() if isinstance(m, QCFS)]
    assert set_threshold_gradient(model, "lsq") == len(layers) > 1
    assert all(m.threshold_gradient == "lsq" for m in layers) and "threshold_gradient=lsq" in repr(layers[0])
    state = model.state_dict()
    assert not any("gradient" in key for key in state)  # a training rule, not a weight: checkpoints do not change
    with pytest.raises(ValueError, match="threshold_gradient"):
        set_threshold_gradient(model, "LSQ")
