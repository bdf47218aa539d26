"""create_model: names, activation and pooling surgery, CIFAR stem, arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import vgg
from torch import nn

from qcfs_snntorch import QCFS, UnknownModelError, check, create_model
from qcfs_snntorch.calibration import calibrate_from_data
from qcfs_snntorch.models import rewrite_activation_calls

TINY_DARKNET_STEM = dict(out_chs=8, kernel_size=3, stride=1, pool="")


def _count(model: nn.Module, classes) -> int:
    return sum(isinstance(m, classes) for m in model.modules())


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownModelError, match="closest timm names: .*resnet18"):
        create_model("resnet181", num_classes=10)


@pytest.mark.parametrize("levels", [0, -1, 2.5, True, "4"])
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="levels must be a positive integer"):
        create_model("test_resnet", num_classes=10, levels=levels)


def test_unknown_activation_group():
    with pytest.raises(ValueError, match="unknown activation group"):
        create_model("test_resnet", num_classes=10, activations=("relu", "swishy"))


def test_relu_and_maxpool_replaced():
    model = create_model("test_resnet", num_classes=10, levels=6, threshold=3.0)
    assert _count(model, nn.ReLU) == 0 and _count(model, nn.MaxPool2d) == 0
    qcfs = [m for m in model.modules() if isinstance(m, QCFS)]
    assert len(qcfs) == model.qcfs_surgery["activations"]["ReLU"] == 12
    assert all(m.levels == 6 and m.threshold.item() == 3.0 for m in qcfs)
    # Same geometry, borders averaged over real pixels only.
    assert isinstance(model.maxpool, nn.AvgPool2d)
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    assert model.maxpool.count_include_pad is False
    assert model.qcfs_surgery["pooling"] == {"MaxPool2d": 1}


def test_residual_network_builds_on_the_meta_device():
    """benchmarks/coverage_census.py builds every timm name on the meta device; a residual
    network's zero-initialised branch BatchNorms have no values there and must be skipped,
    not read (``.any()`` on a meta tensor raises)."""
    with torch.device("meta"):
        model = create_model("test_resnet", num_classes=10)
    assert all(p.is_meta for p in model.parameters())
    assert model.qcfs_surgery["residual_branches_started"] == 0
    assert check(model).convertible
    # On a real device the same branches are started (γ = 1), as training needs.
    assert create_model("test_resnet", num_classes=10).qcfs_surgery["residual_branches_started"] > 0


def test_relu6_replaced():
    model = create_model("mobilenetv2_035", num_classes=10, depth_multiplier=0.01)
    assert _count(model, nn.ReLU6) == 0
    assert model.qcfs_surgery["activations"]["ReLU6"] == _count(model, QCFS) > 0


def test_leaky_relu_replaced():
    import dataclasses

    from timm.models import cspnet

    cfg = cspnet.model_cfgs["darknet17"]
    stages = dataclasses.replace(cfg.stages, out_chs=(8, 8, 8, 8, 8))
    model = create_model("darknet17", num_classes=10, stem=cspnet.CspStemCfg(**TINY_DARKNET_STEM), stages=stages)
    assert _count(model, nn.LeakyReLU) == 0
    assert model.qcfs_surgery["activations"]["LeakyReLU"] == _count(model, QCFS) > 0


def test_hardcoded_block_activations_replaced_when_group_requested():
    # mobilenetv3's squeeze-excite builds its own nn.ReLU (force_act_layer) whatever act_layer is.
    model = create_model("mobilenetv3_small_050", num_classes=10, activations=("relu", "hardswish"))
    assert _count(model, (nn.ReLU, nn.Hardswish)) == 0
    se_acts = [name for name, m in model.named_modules() if ".se." in f"{name}." and isinstance(m, QCFS)]
    assert se_acts, "the SE blocks' internal ReLUs should be QCFS now"
    # The gates are not activations QCFS can stand in for: left as they are, for check() to refuse.
    assert _count(model, nn.Hardsigmoid) > 0
    # Only "relu" requested: the hard-swishes stay.
    relu_only = create_model("mobilenetv3_small_050", num_classes=10)
    assert _count(relu_only, nn.Hardswish) > 0 and _count(relu_only, nn.ReLU) == 0


def test_functional_activation_rewritten_on_nfnet():
    # NF-ResNet with gamma_in_act calls F.relu through GammaAct.act_fn inside forward.
    kwargs = dict(gamma_in_act=True, depths=(1, 1, 1, 1), channels=(8, 8, 16, 16))
    model = create_model("nf_resnet26", num_classes=10, **kwargs)
    assert model.qcfs_surgery["calls"]["stages.0.0.act1"] == ["self.act_fn (relu)"]
    assert check(model).convertible
    untouched = create_model("nf_resnet26", num_classes=10, activations=(), **kwargs)
    assert any(p.path == "forward of stages.0.0.act1" and p.op == "relu" for p in check(untouched).problems)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, skip=None):
        if skip is None:  # data-independent control flow survives the rewrite
            skip = x.sum(1, keepdim=True)
        y = F.relu(self.conv1(x))
        z = self.conv2(y)
        z.relu_()  # a bare in-place call: must become z = ...
        return torch.relu(z + skip)


def test_rewrite_keeps_the_function():
    torch.manual_seed(0)
    module = nn.Sequential(_Functional())
    x = torch.randn(2, 3, 8, 8)
    expected = module(x)
    module, calls = rewrite_activation_calls(module, levels=2**20, threshold=100.0)
    assert calls == {"0": ["F.relu", ".relu_()", "torch.relu"]}
    assert isinstance(module[0], _Functional)  # a subclass: timm's methods and isinstance survive
    assert _count(module, QCFS) == 3
    # QCFS with huge L and λ is ReLU up to 100/2**20 per element.
    torch.testing.assert_close(module(x), expected, atol=1e-3, rtol=0)
    assert check(module).convertible


def test_repeated_activation_call_gets_its_own_qcfs():
    # timm's DLA blocks call one self.relu twice; DLA's own `levels` goes through model_kwargs.
    model = create_model("dla34", num_classes=10, channels=(8, 8, 8, 8, 8, 8), model_kwargs=dict(levels=(1,) * 6))
    assert model.qcfs_surgery["calls"]["level2.tree1"] == ["self.relu (repeated call)"]
    assert model.level2.tree1.qcfs_fn0 is not model.level2.tree1.relu
    report = check(model)
    assert report.convertible, report.summary()


def test_vgg_maxpools_replaced(monkeypatch):
    monkeypatch.setitem(vgg.cfgs, "vgg11", [8, "M", 8, "M", 8, "M"])
    model = create_model("vgg11", num_classes=10, mlp_ratio=1 / 256)
    assert _count(model, nn.MaxPool2d) == 0 and model.qcfs_surgery["pooling"] == {"MaxPool2d": 3}


@pytest.mark.parametrize("pool", ["max", "avgmax", "fastmax", "fastavgmax"])
def test_global_max_pool_becomes_average(pool):
    model = create_model("test_resnet", num_classes=10, global_pool=pool).eval()
    head_pool = next(m for m in model.modules() if isinstance(m, SelectAdaptivePool2d))
    assert "max" not in head_pool.pool_type
    assert check(model).convertible
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_stem():
    model = create_model("test_resnet", num_classes=10, cifar_stem=True).eval()
    first = model.conv1[0]
    assert (first.kernel_size, first.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_stem_refused_outside_resnet():
    with pytest.raises(ValueError, match="ResNet-family"):
        create_model("mobilenetv2_035", num_classes=10, cifar_stem=True)


def test_calibrate_sets_bn_statistics_and_thresholds():
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=10)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    labelled = ((x, torch.zeros(4, dtype=torch.long)) for x in batches)  # a one-pass generator of pairs
    assert calibrate_from_data(model, labelled, percentile=99.0) is model
    assert not model.training
    bn = model.conv1[1]
    assert bn.momentum == 0.1  # restored after the cumulative pass
    with torch.no_grad():  # cumulative statistics: the mean over all batches of the first conv's output
        first = torch.cat([model.conv1[0](x) for x in batches])
    torch.testing.assert_close(bn.running_mean, first.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    # λ of the first QCFS: the 99th percentile of its positive inputs as training sees them: each batch
    # normalised by its own statistics (nothing upstream is quantized).
    act = model.conv1[2]
    with torch.no_grad():
        inputs = torch.cat([F.batch_norm(model.conv1[0](x), None, None, bn.weight, bn.bias, training=True).flatten()
                            for x in batches])
    assert act.threshold.item() == pytest.approx(torch.quantile(inputs[inputs > 0], 0.99).item(), rel=1e-5)
    assert all(m.threshold.item() != 8.0 for m in model.modules() if isinstance(m, QCFS))


def test_pretrained_statistics_are_kept_and_lambda_measured_in_eval_mode():
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=10).eval()
    bn = model.conv1[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    before = bn.running_mean.clone()
    x = torch.randn(8, 3, 32, 32)
    calibrate_from_data(model, [x], percentile=99.0, update_bn=False)
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    with torch.no_grad():
        inputs = bn(model.conv1[0](x)).flatten()
    assert model.conv1[2].threshold.item() == pytest.approx(torch.quantile(inputs[inputs > 0], 0.99).item(), rel=1e-5)


def test_a_silent_layer_takes_the_median_lambda():
    """A layer that is never positive on the calibration data has no evidence: a λ near 0 would block its gradient."""
    from qcfs_snntorch.calibration import silent_layers

    assert silent_layers([3.0, 4.0, None, 2e-9, 3.5]) == [2, 3]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), QCFS(4, 8.0), nn.Linear(8, 8), QCFS(4, 8.0), nn.Linear(8, 8), QCFS(4, 8.0))
    with torch.no_grad():
        net[2].weight.zero_()
        net[2].bias.fill_(-1.0)  # the second QCFS never sees a positive input
    calibrate_from_data(net, [torch.randn(64, 4)])
    first, silent, third = (net[i].threshold.item() for i in (1, 3, 5))
    assert silent == pytest.approx((first + third) / 2)


def test_calibrate_rejects_bad_percentile():
    with pytest.raises(ValueError, match="percentile"):
        calibrate_from_data(create_model("test_resnet", num_classes=10), [torch.randn(2, 3, 32, 32)], percentile=0)

