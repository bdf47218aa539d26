"""check refuses what IF neurons cannot compute, by path; convert raises; fold_bn is exact."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models import vgg
from torch import nn

from qcfs_snntorch import QCFS, ConversionError, check, convert, create_model, fold_batchnorm
from qcfs_snntorch.calibration import calibrate_from_data
from qcfs_snntorch.models import replace_activations


def _paths(report, kind):
    return {p.path for p in report.problems if p.kind == kind}


def test_convertible_resnet():
    report = check("test_resnet")
    assert report.convertible and report.activations == 12 and not report.problems


def test_seresnet_gating_refused_at_se_paths():  # strict: a network of neurons only, as before compensation
    report = check("seresnet18", layers=(1, 1, 1, 1), channels=(8, 8, 8, 8), strict=True)
    assert not report.convertible
    gates = _paths(report, "gate")
    for block in ("layer1.0", "layer2.0", "layer3.0", "layer4.0"):
        assert f"{block}.se.gate" in gates  # the sigmoid module
        assert f"forward of {block}.se" in gates  # x * gate(x_se)
    assert {p.kind for p in report.problems} == {"gate"}, report.summary()


def test_vit_refused_for_layernorm_and_attention():
    report = check("test_vit", strict=True)
    assert "blocks.0.norm1" in _paths(report, "norm") and "norm" in _paths(report, "norm")
    assert "forward of blocks.0.attn" in _paths(report, "attention")
    assert "blocks.0.mlp.act" in _paths(report, "activation")  # GELU not requested
    assert "blocks.0.mlp.act" not in _paths(check("test_vit", activations=("gelu",), strict=True), "activation")


def test_efficientnet_with_silu_replaced_still_refused_for_se():
    report = check("efficientnet_b0", activations=("relu", "silu"), strict=True)
    assert not _paths(report, "activation"), report.summary()
    gates = _paths(report, "gate")
    assert gates and all(".se" in path for path in gates), gates
    assert "forward of blocks.0.0.se" in gates


def test_maxpool_left_in_model_refused():
    model, _ = replace_activations(timm.create_model("test_resnet", num_classes=10))
    report = check(model, strict=True)
    assert _paths(report, "max") == {"maxpool"}
    assert "use average pooling" in report.summary()


def test_functional_maxpool_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3), QCFS()

        def forward(self, x):
            return torch.nn.functional.max_pool2d(self.act(self.conv(x)), 2)

    report = check(Net(), strict=True)
    assert [(p.path, p.op, p.kind) for p in report.problems] == [("forward", "max_pool2d", "max")]


def test_shared_activation_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), QCFS()

        def forward(self, x):
            return self.act(self.conv2(self.act(self.conv1(x))))

    report = check(Net(), strict=True)
    assert _paths(report, "shared") == {"act"}


def test_products_with_parameters_are_linear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3), QCFS()
            self.scale = nn.Parameter(torch.ones(4, 1, 1))

        def forward(self, x):
            w = self.conv.weight / self.conv.weight.std()  # parameter arithmetic (weight standardisation)
            y = torch.nn.functional.conv2d(x, w) * self.scale.exp() / x.shape[1]
            return self.act(y)

    report = check(Net())
    assert report.convertible, report.summary()


def test_no_qcfs_is_not_convertible():
    report = check(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    assert not report.convertible and "no QCFS activation" in report.summary()


def test_convert_raises_conversion_error_with_report():
    model = create_model("seresnet18", num_classes=10, layers=(1, 1, 1, 1), channels=(8, 8, 8, 8))
    with pytest.raises(ConversionError, match="layer1.0.se.gate") as info:
        convert(model, strict=True)
    assert not info.value.report.convertible


def _images(n=3, batch=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.avg_pool2d(torch.randn(batch, 3, size, size, generator=g), 3, 1, 1) for _ in range(n)]


def _tiny_vgg_bn(monkeypatch):
    monkeypatch.setitem(vgg.cfgs, "vgg11", [8, "M", 16, "M", 16, "M", 16, "M"])
    return create_model("vgg11_bn", num_classes=10, mlp_ratio=1 / 128)


@pytest.mark.parametrize(
    "build",
    [
        lambda mp: create_model("test_resnet", num_classes=10),
        _tiny_vgg_bn,
        lambda mp: create_model("mobilenetv2_035", num_classes=10, depth_multiplier=0.01),  # timm BatchNormAct2d
    ],
    ids=["test_resnet", "vgg11_bn", "mobilenetv2"],
)
def test_fold_bn_keeps_ann_outputs(build, monkeypatch):
    torch.manual_seed(0)
    # float64: a float32 rounding difference can move a value across a QCFS step, which
    # would be a change of λ/L, not of the folding's arithmetic.
    model = calibrate_from_data(build(monkeypatch), _images()).double()
    x = _images(1, seed=1)[0].double()
    folded = copy.deepcopy(model)
    count = fold_batchnorm(folded)
    assert count > 0 and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert sum(isinstance(m, QCFS) for m in folded.modules()) == sum(isinstance(m, QCFS) for m in model.modules())
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_fold_bn_skips_weight_standardised_convs():
    # NF-ResNet's ScaledStdConv2d re-standardises its weight in forward: a folded scale would vanish.
    model = create_model("nf_resnet26", num_classes=10, depths=(1, 1, 1, 1), channels=(8, 8, 16, 16))
    assert fold_batchnorm(copy.deepcopy(model)) == 0


def test_a_network_whose_only_qcfs_acts_on_parameters_does_not_convert():
    """ReLU-only swin-v2: its one ReLU is in the relative-position MLP, which sees parameters alone and stays
    an ANN activation, so no neuron would see the input; with GELU replaced too it converts."""
    with torch.device("meta"):
        relu_only = check("swinv2_cr_tiny_224", activations=("relu",))
        with_gelu = check("swinv2_cr_tiny_224", activations=("relu", "silu", "gelu"))
    assert not relu_only.convertible and relu_only.activations == 0
    assert any("parameters alone" in note for note in relu_only.notes)
    assert with_gelu.convertible and with_gelu.activations > 0
