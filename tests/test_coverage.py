"""Which timm families convert, checked end to end on tiny instances.

For each convertible family: build with QCFS (L = 4), set BN statistics and λ from
structured random images, convert, and compare the SNN's mean output after T steps with
the same network at QCFS L = T (what an SNN at T steps approximates; Bu et al., ICLR 2022). At
T = 256 (more for the deepest random nets) the relative error of the logits must be ≤ 0.12, and
not larger than at T = 32; one run gives both (the output after 32 steps is the mean of the
first 32). The classifier's rows are made zero-sum so that the network's predictions differ
between inputs (a random head on non-negative rates predicts one class for everything, and a
relative error against such logits says little). Refused families must be refused with the
module paths that cause it.

Sizes are cut through timm's own kwargs (depths, widths) so the file runs in about a
minute on one core; the architecture of each family (stem, block type, pooling, residual
or dense wiring) is unchanged.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from timm.models import byobnet, cspnet, vgg

from qcfs_snntorch import QCFS, ConversionError, check, convert, create_model
from qcfs_snntorch.calibration import calibrate_from_data

BATCH, SIZE, T_SHORT = 8, 32, 32


def structured_images(n_batches: int, seed: int) -> list[torch.Tensor]:
    """Smoothed noise with per-image colour offsets: spatially correlated like images, not white noise."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
        for _ in range(2):
            x = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        x = x / x.std(dim=(1, 2, 3), keepdim=True) + 0.5 * torch.randn(BATCH, 3, 1, 1, generator=g)
        batches.append(x)
    return batches


def _tiny_vgg(monkeypatch):
    # VGG's widths are a config list, not a kwarg: swap vgg11's list for a narrow one.
    monkeypatch.setitem(vgg.cfgs, "vgg11", [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"])
    return dict(mlp_ratio=1 / 128)


def _tiny_darknet(monkeypatch):
    cfg = cspnet.model_cfgs["darknet17"]
    return dict(
        stem=dataclasses.replace(cfg.stem, out_chs=8),
        stages=dataclasses.replace(cfg.stages, out_chs=(8, 16, 16, 32, 32)),
    )


def _tiny_cspdarknet(monkeypatch):
    cfg = cspnet.model_cfgs["cspdarknet53"]
    return dict(
        stem=dataclasses.replace(cfg.stem, out_chs=8),
        stages=dataclasses.replace(
            cfg.stages, depth=(1, 1, 1), out_chs=(16, 32, 64), expand_ratio=(2.0, 1.0, 1.0),
            bottle_ratio=(0.5, 1.0, 1.0), block_ratio=(1.0, 0.5, 0.5),
        ),
    )


def _tiny_repvgg(monkeypatch):
    return dict(blocks=byobnet._rep_vgg_bcfg(d=(1, 2, 2, 1), wf=(0.125, 0.125, 0.125, 0.125)), stem_chs=8)


# family -> (timm name, kwargs or a function(monkeypatch) -> kwargs, T for the final comparison)
CONVERTIBLE = {
    "resnet": ("test_resnet", {}, 1024),
    "resnet-d": ("resnet18d", dict(layers=(1, 1, 1, 1), stem_width=8, channels=(16, 16, 32, 32)), 1024),
    "resnet-t": ("resnet10t", dict(stem_width=8, channels=(16, 16, 32, 32)), 1024),
    "resnext": ("resnext50_32x4d", dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), cardinality=4, base_width=16), 1024),
    "wide_resnet": ("wide_resnet50_2", dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16)), 256),
    "vgg": ("vgg11", _tiny_vgg, 256),
    "regnetx": ("regnetx_002", dict(depth=5, w0=8, wa=10.0, wm=2.0, group_size=8, stem_width=8), 1024),
    "densenet": ("densenet121", dict(growth_rate=8, block_config=(1, 2, 2, 1)), 256),
    "repvgg": ("repvgg_a0", _tiny_repvgg, 256),
    "darknet": ("darknet17", _tiny_darknet, 1024),
    "cspdarknet": ("cspdarknet53", _tiny_cspdarknet, 2048),
    # Random weights amplify the per-layer (unevenness) error by ~1.1-1.2 per layer, and with
    # every residual branch started (create_model gives timm's zero-initialised last BatchNorms
    # γ = 1) the random nets are effectively deeper: the relative error falls about 4× per 4× T,
    # and the deeper families are compared at a larger T (measured at 256 / 1024 / 2048: resnet
    # 0.12 / 0.03 / 0.02, regnetx 0.30 / 0.08 / 0.04, cspdarknet 0.44 / 0.13 / 0.07, dla 0.41 / 0.10
    # / 0.06, mobilenetv2 0.59 / 0.19 / 0.09). Trained networks match their ANN at far lower T (the
    # paper's SNNs at T ≥ 32 match their L = 4 ANNs).
    # DLA: one tree level per stage (its `levels` collides with create_model's, hence model_kwargs).
    "dla": ("dla34", dict(channels=(8, 8, 16, 16, 32, 32), model_kwargs=dict(levels=(1,) * 6)), 2048),
    "mobilenetv2": ("mobilenetv2_035", dict(depth_multiplier=0.01), 2048),  # one block per stage
}


def _build(name, kwargs, monkeypatch, **create_kwargs):
    if callable(kwargs):
        kwargs = kwargs(monkeypatch)
    return create_model(name, num_classes=10, **kwargs, **create_kwargs)


def _set_levels(model, levels):
    for m in model.modules():
        if isinstance(m, QCFS):
            m.levels = levels


@torch.no_grad()
def _classifier_without_common_mode(model) -> None:
    """Zero-sum classifier rows: rates are non-negative, so a random classifier's logits are ruled by
    the mean feature and it predicts one class for every input; without that common mode the
    predictions depend on the features, and agreeing on them means something."""
    head = model.get_classifier()
    head.weight -= head.weight.mean(1, keepdim=True)
    if head.bias is not None:
        head.bias.zero_()


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CONVERTIBLE))
@torch.no_grad()
def test_snn_matches_ann_at_L_equal_T(family, monkeypatch):
    torch.manual_seed(0)
    name, kwargs, t_long = CONVERTIBLE[family]
    model = _build(name, kwargs, monkeypatch, levels=4)
    report = check(model)
    assert report.convertible, report.summary()
    calibrate_from_data(model, structured_images(4, seed=1))
    _classifier_without_common_mode(model)
    x = structured_images(1, seed=2)[0]

    snn = convert(model, chunk_size=32)  # memory bounded by 32 steps, whatever T
    outputs = snn(x, timesteps=t_long)
    errors = {}
    for t in (T_SHORT, t_long):
        _set_levels(model, t)
        errors[t] = _relative_error(outputs[:t].mean(0), model(x))
    reference = model(x).argmax(-1)
    # The comparison means something only where the network tells inputs apart.
    assert reference.unique().numel() >= 2, (family, reference.tolist())
    agree = (outputs.mean(0).argmax(-1) == reference).float().mean().item()
    assert errors[t_long] <= 0.12, (family, errors, agree)
    assert errors[t_long] <= errors[T_SHORT], (family, errors)
    # The SNN at t_long predicts what the ANN at L = t_long predicts: measured 6 to 8 of the 8 images
    # across the families (densenet and cspdarknet 6; at T_SHORT as few as 0), where chance is 1/classes.
    assert agree >= 0.75, (family, agree, errors)


# family -> (timm name, create_model kwargs, {problem kind: a path it must name})
REFUSED = {
    "seresnet": ("seresnet18", dict(layers=(1, 1, 1, 1), channels=(8, 8, 8, 8)), {"gate": "layer1.0.se.gate"}),
    "efficientnet": (
        "efficientnet_b0",
        dict(activations=("relu", "silu")),
        {"gate": "forward of blocks.1.0.se"},
    ),
    "mobilenetv3": (
        "mobilenetv3_small_050",
        dict(activations=("relu", "hardswish")),
        {"gate": "blocks.0.0.se.gate"},
    ),
    "vit": ("test_vit", dict(activations=("gelu",)), {"norm": "blocks.0.norm1", "attention": "forward of blocks.0.attn"}),
    "convnext": ("test_convnext", dict(activations=("gelu",)), {"norm": "stages.0.blocks.0.norm"}),
    "inception_v3": ("inception_v3", {}, {"max": "forward of Mixed_6a"}),  # F.max_pool2d in forward
    "res2net": ("res2net50_14w_8s", dict(layers=(1, 1, 1, 1)), {"shared": "layer1.0.qcfs_fn0"}),  # self.relu in a loop
    "hrnet": ("hrnet_w18_small", {}, {"shared": "stage2.0.fuse_act"}),  # fuse_act in a loop, untraceable forward
}


@pytest.mark.parametrize("family", list(REFUSED))
def test_refused_families_name_the_modules(family):
    """strict=True: a network of IF neurons only, as before compensation existed."""
    name, kwargs, expected = REFUSED[family]
    report = check(name, strict=True, **kwargs)
    assert not report.convertible
    found = {(p.kind, p.path) for p in report.problems}
    for kind, path in expected.items():
        assert (kind, path) in found, report.summary()
    # The requested groups were replaced: only structural problems remain.
    assert all(p.kind != "activation" for p in report.problems), report.summary()
    with pytest.raises(ConversionError):
        convert(create_model(name, num_classes=10, **kwargs), strict=True)


# Not strict, the same families convert: their gates, norms, attention and max are compensated
# where they sit after a neuron, an activation in a loop gets one neuron per call (HRNet's
# modules do not trace alone, the whole network does). Untraceable networks stay refused
# (tests/test_compensation.py).
COMPENSATED = {family: REFUSED[family] for family in ("seresnet", "mobilenetv3", "vit", "convnext", "res2net", "hrnet")}


@pytest.mark.parametrize("family", list(COMPENSATED))
def test_refused_families_convert_with_compensated_ops(family):
    name, kwargs, _ = COMPENSATED[family]
    report = check(name, **kwargs)
    assert report.convertible, report.summary()
    assert report.compensated or any("one neuron per call" in n for n in report.notes), report.summary()
